"""The PR-MoE layer against a naive per-token reference, DeepSpeed's MoE layer, and the aux formula."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moe_convert.model.layout import expert_capacity
from moe_convert.model.routing import moe_forward, route
from moe_convert.model.moe import Experts, PRMoELayer


def make_layer(kind="mlp", E=5, d=24, f=37, top_k=1, residual=True, capacity_factor=None, min_capacity=4, seed=0):
    torch.manual_seed(seed)
    act = ACT2FN["gelu_new" if kind == "mlp" else "silu"]
    experts = Experts(kind, E, d, f, act, init_std=0.2)
    for name, p in experts.named_parameters():  # non-zero biases so they are exercised
        if name.startswith("b_"):
            torch.nn.init.normal_(p, std=0.1)
    dense = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(), torch.nn.Linear(f, d)) if residual else None
    layer = PRMoELayer(d, experts, dense, top_k, capacity_factor, min_capacity)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    if residual:
        torch.nn.init.normal_(layer.coefficient.weight, std=0.3)
        torch.nn.init.normal_(layer.coefficient.bias, std=0.3)
    return layer.eval()


def naive_expert(layer, e, x):
    """One expert on one token vector, straight from the formulas in DESIGN.md section 2."""
    w = {k: v[e] for k, v in layer.experts.stacked().items()}
    act = layer.experts.act
    if "w_gate" in w:
        return (act(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_out"]
    return act(x @ w["w_in"] + w["b_in"]) @ w["w_out"] + w["b_out"]


def naive_moe(layer, x):
    """Loop over tokens; capacity filled in priority order (first choices first, then seconds)."""
    T, _ = x.shape
    E, k = layer.router.weight.shape[0], layer.top_k
    probs = F.linear(x.float(), layer.router.weight.float()).softmax(-1)  # the gate itself, in fp32
    choices = [probs[t].argsort(descending=True)[:k].tolist() for t in range(T)]
    cap = None if layer.capacity_factor is None else expert_capacity(T, E, k, layer.capacity_factor, layer.min_capacity)
    used, kept = [0] * E, set()
    for j in range(k):
        for t in range(T):
            e = choices[t][j]
            if cap is None or used[e] < cap:
                used[e] += 1
                kept.add((t, j))
    out = torch.zeros_like(x)
    for t in range(T):
        sel = [(j, e) for j, e in enumerate(choices[t]) if (t, j) in kept]
        norm = 1.0 if k == 1 else sum(probs[t, e] for _, e in sel)
        for _, e in sel:
            out[t] += probs[t, e] / max(norm, 1e-12) * naive_expert(layer, e, x[t])
        if layer.residual:
            c = layer.coefficient(x[t]).softmax(-1)
            out[t] = c[0] * out[t] + c[1] * layer.mlp(x[t])
    return out


@pytest.mark.parametrize("kind", ["mlp", "gated"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_layer_matches_naive_reference(kind, top_k, residual, capacity_factor):
    seed = zlib.crc32(repr((kind, top_k, residual, capacity_factor)).encode())
    layer = make_layer(kind, top_k=top_k, residual=residual, capacity_factor=capacity_factor, min_capacity=2, seed=seed)
    x = torch.randn(3, 11, 24)
    with torch.no_grad():
        y = layer(x)
        ref = naive_moe(layer, x.reshape(-1, 24)).reshape_as(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if capacity_factor is not None:  # the capacity case really dropped something
        r = route(torch.nn.functional.linear(x.reshape(-1, 24), layer.router.weight), top_k, capacity_factor, 2)
        assert r.token.numel() < x.shape[0] * x.shape[1] * top_k


def test_only_experts_with_tokens_are_touched():
    layer = make_layer(E=8)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0  # every token that points along +1 goes to expert 3
        x = torch.rand(10, 24) + 0.1
        layer.experts.w_in[torch.arange(8) != 3] = float("nan")  # reading any other expert would poison the output
        assert torch.isfinite(layer(x)).all()


def test_capacity_keeps_first_tokens_in_order():
    logits = torch.tensor([[2.0, 0.0]] * 5 + [[0.0, 2.0]])  # 5 tokens want expert 0, capacity 3
    r = route(logits, top_k=1, capacity_factor=1.0, min_capacity=0)
    assert r.counts.tolist() == [3, 1]
    assert r.token.tolist() == [0, 1, 2, 5]
    torch.testing.assert_close(r.weight, torch.full((4,), math.exp(2) / (1 + math.exp(2))))


def test_aux_loss_hand_checked():
    # p = (0.75, 0.25) for tokens 0, 1, 3 and (0.25, 0.75) for token 2
    l3 = math.log(3.0)
    logits = torch.tensor([[l3, 0.0], [l3, 0.0], [0.0, l3], [l3, 0.0]])
    r = route(logits, top_k=1)
    # mean p = (0.625, 0.375), fraction routed = (0.75, 0.25): 2 * (0.625*0.75 + 0.375*0.25) = 1.125
    assert r.aux_loss.item() == pytest.approx(1.125, abs=1e-6)
    r2 = route(logits, top_k=2)  # first choices only, as DeepSpeed's top2gating
    assert r2.aux_loss.item() == pytest.approx(1.125, abs=1e-6)


def test_gradients_reach_every_part():
    layer = make_layer(top_k=1, E=4).train()
    layer(torch.randn(4, 16, 24)).pow(2).mean().add(layer.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    per_expert = layer.experts.w_in.grad.abs().sum(dim=(1, 2))
    assert (per_expert > 0).all(), per_expert


# --- DeepSpeed's own layer as the oracle ------------------------------------------------------


@pytest.mark.parametrize("k, capacity_factor", [(1, None), (2, None), (2, 0.5), (3, None), (3, 0.5)])
def test_equals_deepspeed_moe_layer(deepspeed_moe, k, capacity_factor):
    """DeepSpeed's top-1, top-2 (second choice not sampled) and top-k gates, dropless and over capacity
    (not top-1's: DeepSpeed keeps a random set there)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    d, f, E = 24, 37, 6
    cfg = GPT2Config(n_embd=d, resid_pdrop=0.0)
    torch.manual_seed(1)
    cap = {} if capacity_factor is None else dict(capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                                                   min_capacity=1)
    ds = deepspeed_moe(d, GPT2MLP(f, cfg), num_experts=E, k=k, use_residual=True, drop_tokens=capacity_factor is not None,
                       top2_2nd_expert_sampling=False, **cap).eval()
    for p in ds.parameters():  # DeepSpeed deep-copies one expert: make every tensor distinct
        torch.nn.init.normal_(p, std=0.3)
    sd = ds.state_dict()

    experts = Experts("mlp", E, d, f, ACT2FN["gelu_new"])
    ours = PRMoELayer(d, experts, GPT2MLP(f, cfg), top_k=k, capacity_factor=capacity_factor, min_capacity=1).eval()
    with torch.no_grad():
        ours.router.weight.copy_(sd["deepspeed_moe.gate.wg.weight"])
        for j in range(E):
            prefix = f"deepspeed_moe.experts.deepspeed_experts.{j}."
            experts.w_in[j] = sd[prefix + "c_fc.weight"]
            experts.b_in[j] = sd[prefix + "c_fc.bias"]
            experts.w_out[j] = sd[prefix + "c_proj.weight"]
            experts.b_out[j] = sd[prefix + "c_proj.bias"]
        ours.mlp.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("mlp.")})
        ours.coefficient.load_state_dict({"weight": sd["coefficient.weight"], "bias": sd["coefficient.bias"]})
        x = torch.randn(3, 13, d)
        ds_out, ds_aux, _ = ds(x)
        y = ours(x)
    assert len(set(ours.expert_counts.nonzero().flatten().tolist())) > 2  # several experts really used
    if capacity_factor is not None:  # some assignments really dropped
        assert route(F.linear(x.reshape(-1, d), ours.router.weight), k, capacity_factor, 1).token.numel() < 3 * 13 * k
    torch.testing.assert_close(y, ds_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.aux_loss, ds_aux, rtol=1e-5, atol=1e-6)


def test_gate_stays_fp32_under_autocast():
    """bf16 mixed precision (Accelerate turns autocast on) must not route by bf16 logits."""
    layer = make_layer(E=8, seed=3).train()
    x = torch.randn(256, 24) * 3
    ref = route(F.linear(x, layer.router.weight), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, r = moe_forward(x, layer.router.weight, layer.experts, top_k=1)
    assert torch.equal(r.token, ref.token) and torch.equal(r.weight, ref.weight)

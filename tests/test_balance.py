"""The global-batch aux loss (`--aux-scope global`) against the formula over the concatenated batch:
its value and its gradient, with the step split into micro-batches (multi-process runs: test_train.py)."""

import pytest
import torch
import torch.nn.functional as F

from moe_convert.training.balance import LoadBalance, load_entropy
from moe_convert.training.train import causal_lm_loss

from conftest import VOCAB, tiny_prmoe


def hand_aux(model, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(CE, sum over layers of E * sum_e mean(p_e) * frac_e, per-layer counts) over all of `batch` in one
    forward, the gate recomputed from each MoE layer's input."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0]))) for m in model.moe_layers()]
    ce = model(input_ids=batch, labels=batch).ce_loss
    for h in hooks:
        h.remove()
    aux, counts = 0, []
    for layer, x in inputs:
        p = F.linear(x.reshape(-1, x.shape[-1]).float(), layer.router.weight.float()).softmax(-1)  # (T, E)
        T, E = p.shape
        chosen = p.topk(layer.top_k, dim=-1).indices  # (T, k)
        counted = chosen[:, 0] if layer.top_k <= 2 else chosen.reshape(-1)  # first choices; k > 2: all
        c = torch.bincount(counted, minlength=E)
        counts.append(c)
        aux = aux + E * (p.mean(0) * c / c.sum()).sum()
    return ce, aux, counts


@pytest.mark.parametrize("top_k", [1, 3])
def test_global_aux_is_the_formula_over_the_whole_batch(top_k):
    """Four micro-batches of fresh random tokens: the mean of the per-micro-batch losses is CE + coef * aux of
    the concatenated batch, and so is their summed gradient (the micro-batch aux terms cancel exactly)."""
    model = tiny_prmoe(num_experts=(5, 7), num_experts_per_tok=top_k, seed=top_k).train()
    model.config.aux_loss_coef = 0.5  # large, so a wrong aux gradient would show in every router
    batch = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(top_k))
    micro = batch.chunk(4)

    balance = LoadBalance(model, "global", grad_accum=4)
    balance.begin(list(micro))
    logs = []
    for b in micro:
        out = balance.micro_loss(causal_lm_loss(model, b, 0))
        (out["loss"] / 4).backward()
        logs.append({k: v.detach() for k, v in out.items()})
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    mean = {k: sum(r[k] for r in logs) / 4 for k in logs[0]}
    model.zero_grad()

    ce, aux, counts = hand_aux(model, batch)
    (ce + 0.5 * aux).backward()
    assert mean["aux"].item() == pytest.approx(aux.item(), rel=1e-5)
    assert mean["loss"].item() == pytest.approx((ce + 0.5 * aux).item(), rel=1e-5)
    assert mean["aux_micro"].item() != pytest.approx(aux.item(), rel=1e-4)  # the scopes differ past the tolerance
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    global_entropy = balance.end()
    for (key, value), c in zip(sorted(global_entropy.items()), counts):
        assert value.item() == pytest.approx(load_entropy(c).item(), rel=1e-6), key


def test_micro_scope_leaves_the_loss_as_the_model_computes_it():
    model = tiny_prmoe(seed=5).train()
    batch = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(5))
    balance = LoadBalance(model, "micro", grad_accum=1)
    balance.begin([batch])
    out = causal_lm_loss(model, batch, 0)
    logged = balance.micro_loss(out)
    assert logged["loss"] is out["loss"] and logged["aux"] is out["aux"]
    counts = [m.load.counts for m in model.moe_layers()]
    assert [logged[f"load_entropy_micro_{i}"].item() for i in model.config.moe_layers] == \
        [load_entropy(c).item() for c in counts]
    assert load_entropy(torch.tensor([3, 3, 3, 3])).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert load_entropy(torch.tensor([0, 7, 0])).item() == 0.0


def test_the_pre_pass_routes_as_the_training_forward_with_dropout_on():
    """The counts the loss uses (pre-pass) are the counts the training forwards then route, dropout drawn
    alike (random state replayed), and the random state after the step is what the forwards alone leave."""
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    from conftest import tiny_gpt2_config

    torch.manual_seed(11)
    host = tiny_gpt2_config(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=host.to_dict(), moe_layers=[1, 3], num_experts=[4, 6])).train()
    micro = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(11)).chunk(3)
    balance = LoadBalance(model, "global", grad_accum=3)
    torch.manual_seed(12)
    balance.begin(list(micro))
    for b in micro:
        balance.micro_loss(causal_lm_loss(model, b, 0))["loss"].backward()
    after = torch.get_rng_state()
    assert torch.equal(balance.step_counts, balance.global_counts)
    torch.manual_seed(12)
    without = LoadBalance(model, "global", grad_accum=3)
    for b in micro:
        without.begin([b])  # one micro-batch: no pre-pass
        causal_lm_loss(model, b, 0)
    assert torch.equal(torch.get_rng_state(), after)

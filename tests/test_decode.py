"""The native decode layer (`decode.Decoder`, `csrc/moe_decode.c`): a PR-MoE layer on a few tokens against
`moe_forward` on the same packed weights and a float64 reference on the plain ones, its routing and
ties, and where it steps aside."""

import pytest
import torch
import torch.nn.functional as F

from moe_convert.inference import kernels, native
from moe_convert.inference.decode import MAX_TOKENS, MAX_TOP_K, Decoder
from moe_convert.inference.kernels import ACTIVATIONS, moe_forward, pack_experts, pack_ffn
from test_native import REFUSED, ffn_weights, on_one_thread, reference_ffn

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernel off: {native.why_unavailable()}")
ACT = {"gpt2": ACTIVATIONS["gelu_new"], "gated": ACTIVATIONS["silu"]}


@pytest.fixture(autouse=True)
def pack_small(monkeypatch):
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    torch.manual_seed(0)


def layer(kind="gpt2", residual=True, E=16, d=256, top_k=1, dtype=torch.float32):
    """(plain weights, the Decoder over their packed copies): router, experts, coefficient, residual FFN."""
    w = {"router": torch.randn(E, d), "experts": ffn_weights(kind, d, 4 * d, experts=E),
         "coef": (torch.randn(2, d) / d ** 0.5, torch.randn(2)), "dense": ffn_weights(kind, d, 4 * d)}
    w = {k: tuple(t.to(dtype) for t in v) if k == "coef" else v.to(dtype) if k == "router"
         else {name: t.to(dtype) for name, t in v.items()} for k, v in w.items()}
    w["packed"], w["packed_dense"] = pack_experts(w["experts"]), pack_ffn(w["dense"])
    decoder = Decoder.build(w["router"], w["packed"], (*w["coef"], w["packed_dense"]) if residual else None,
                            ACT[kind], top_k=top_k, capacity_factor=None, min_capacity=4)
    return w, decoder


def reference(w, x, act, residual, top_k=1):
    """The layer in float64 from the plain weights, and the experts chosen, choice-major ((k * T,): every
    token's first choice, then every second)."""
    x64 = x.double()
    probs = (x64 @ w["router"].double().t()).softmax(-1)
    top_p, top_e = probs.topk(top_k, dim=-1)  # (T, k)
    if top_k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    experts = {k: v.double() for k, v in w["experts"].items()}
    y = sum(torch.stack([reference_ffn(x64[t:t + 1], {k: v[e] for k, v in experts.items()}, act)[0]
                         for t, e in enumerate(top_e[:, c].tolist())]) * top_p[:, c:c + 1] for c in range(top_k))
    if residual:
        coef = F.linear(x64, w["coef"][0].double(), w["coef"][1].double()).softmax(-1)
        y = coef[:, :1] * y + coef[:, 1:] * reference_ffn(x64, w["dense"], act)
    return y, top_e.t().reshape(-1)


@pytest.mark.parametrize("kind", ["gpt2", "gated"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain-moe"])
@pytest.mark.parametrize("T", [1, 5, MAX_TOKENS])
@pytest.mark.parametrize("top_k", [1, 2])
def test_the_layer_equals_moe_forward_and_float64(kind, residual, T, top_k):
    w, decoder = layer(kind, residual, top_k=top_k)
    x = torch.randn(T, 256)
    with torch.inference_mode():
        got = decoder(x)
        coef = F.linear(x, *w["coef"]).softmax(-1)
        ours, routing = moe_forward(x, w["router"], w["packed"], ACT[kind], top_k,
                                    residual=(coef, w["packed_dense"]) if residual else None)
    ref, experts = reference(w, x, ACT[kind], residual, top_k)
    assert list(decoder.state.expert[:top_k * T]) == experts.tolist()
    assert sorted(decoder.state.slot[:top_k * T]) == list(range(top_k * T))
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gated"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_bf16_layer_equals_moe_forward_to_bf16_rounding(kind, top_k):
    """bf16 weights and tokens: the same routing as float64 on the same bf16 values, and the output within
    bf16 rounding of moe_forward's (which rounds after each of its bf16 ops) and of float64."""
    w, decoder = layer(kind, top_k=top_k, dtype=torch.bfloat16)
    if decoder is None:  # the packed bf16 experts are refused by the layout probe: moe_forward runs them
        assert None in w["packed"].pointers or kernels.native_pointers(w["packed_dense"]) is None
        pytest.skip(REFUSED.format("bf16"))
    x = torch.randn(MAX_TOKENS, 256).bfloat16()
    with torch.inference_mode():
        got = decoder(x)
        ours, _ = moe_forward(x, w["router"], w["packed"], ACT[kind], top_k,
                              residual=(F.linear(x, *w["coef"]).softmax(-1), w["packed_dense"]))
    ref, experts = reference(w, x, ACT[kind], True, top_k)
    assert got.dtype == torch.bfloat16
    assert list(decoder.state.expert[:top_k * MAX_TOKENS]) == experts.tolist()
    bf16 = {"rtol": 1.6e-2, "atol": 2e-2}  # a few bf16 steps of outputs up to ~3
    torch.testing.assert_close(got, ours, **bf16)
    torch.testing.assert_close(got.double(), ref, **bf16)


def test_a_width_off_the_output_blocks():
    """d = 144: every second matmul's last block of 64 outputs holds 16."""
    w, decoder = layer(E=6, d=144)
    x = torch.randn(7, 144)
    with torch.inference_mode():
        got = decoder(x)
    ref, experts = reference(w, x, ACT["gpt2"], residual=True)
    assert list(decoder.state.expert[:7]) == experts.tolist()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_first_expert():
    """Two experts with the same router row get the same logit for every token: the first wins, as in
    `routing.route` (torch's max) and DeepSpeed's argmax."""
    w, decoder = layer(E=8)
    w["router"][5] = w["router"][2] = w["router"][2] * 50  # tied with each other
    x = torch.randn(MAX_TOKENS, 256)
    x *= (x @ w["router"][2]).sign()[:, None]  # and far ahead of the others for every token
    with torch.inference_mode():
        got = decoder(x)
        ref, routing = moe_forward(x, w["router"], w["packed"], ACT["gpt2"],
                                   residual=(F.linear(x, *w["coef"]).softmax(-1), w["packed_dense"]))
    assert list(decoder.state.expert[:MAX_TOKENS]) == [2] * MAX_TOKENS
    assert routing.counts[2] == MAX_TOKENS
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    _, decoder = layer()
    x = torch.randn(6, 256)
    assert torch.equal(decoder(x), on_one_thread(lambda: decoder(x)))


def test_what_it_does_not_take_is_left_to_moe_forward():
    """Build: more than MAX_TOP_K experts per token, experts the kernel cannot read, a residual FFN of another
    shape -> None. A call: more than MAX_TOKENS tokens, another dtype, a token count whose capacity could
    drop a token, or an input that needs gradients -> None (the caller runs moe_forward)."""
    w, decoder = layer()
    args = dict(capacity_factor=None, min_capacity=4)
    residual = (*w["coef"], w["packed_dense"])
    assert Decoder.build(w["router"], w["packed"], residual, ACT["gpt2"], top_k=MAX_TOP_K + 1, **args) is None
    assert Decoder.build(w["router"], w["experts"], residual, ACT["gpt2"], top_k=1, **args) is None
    other = (*w["coef"], pack_ffn(ffn_weights("gpt2", 256, 512)))
    assert Decoder.build(w["router"], w["packed"], other, ACT["gpt2"], top_k=1, **args) is None
    assert decoder(torch.randn(MAX_TOKENS + 1, 256)) is None
    assert decoder(torch.randn(2, 256, dtype=torch.bfloat16)) is None
    assert decoder(torch.randn(2, 256, requires_grad=True)) is None
    # capacity ceil(T / 16 * 2), at least 2: no token can be dropped for T <= 2 only
    capped = Decoder.build(w["router"], w["packed"], residual, ACT["gpt2"], top_k=1, capacity_factor=2.0,
                           min_capacity=2)
    assert capped.tokens == {1, 2}
    assert capped(torch.randn(3, 256)) is None and capped(torch.randn(2, 256)) is not None

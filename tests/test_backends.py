"""The MoE layer's expert backends are interchangeable: `loop` and `grouped_mm` in fp32 and bf16, with and
without bf16 autocast (mixed-precision training), with and without the residual branch, top-1 and top-2,
forward and gradients against a float64 per-token reference; `grouped_mm` falls back to the loop where it
raises; and the dropless forward reads no tensor value on the host (what would make a GPU wait)."""

import copy
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_convert.model import routing
from test_moe import make_layer, naive_expert


def naive_rows(layer, x):
    """The layer per token, in whatever dtype its weights are (float64 here), differentiable: dropless top-k
    (raw probability for top-1, renormalised for k > 1), the residual mix."""
    probs = torch.nn.functional.linear(x.float(), layer.router.weight.float()).softmax(-1).to(x.dtype)  # the gate in fp32
    rows = []
    for t in range(x.shape[0]):
        top = probs[t].argsort(descending=True)[:layer.top_k].tolist()
        weights = probs[t, top] / (probs[t, top].sum() if layer.top_k > 1 else 1)
        y = sum(w * naive_expert(layer, e, x[t]) for w, e in zip(weights, top))
        if layer.residual:
            c = layer.coefficient(x[t]).softmax(-1)
            y = c[0] * y + c[1] * layer.mlp(x[t])
        rows.append(y)
    return torch.stack(rows)

CASES = list(itertools.product(["loop", "grouped_mm"], ["fp32", "bf16"], [False, True], [True, False], [1, 2]))


def forward_backward(layer, x, grad_out):
    """(output, {parameter name: gradient}) of the layer on x for a fixed upstream gradient, all as float64."""
    layer.zero_grad()
    y = layer(x)
    (y.double() * grad_out).sum().backward()
    return y.detach().double(), {n: p.grad.double() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend, dtype, autocast, residual, top_k", CASES,
                         ids=["-".join(map(str, c)).replace("True", "autocast").replace("False", "plain") for c in CASES])
def test_backends_equal_float64_in_every_dtype_and_under_autocast(backend, dtype, autocast, residual, top_k):
    """d = 32, f = 64: strides `grouped_mm` takes in both dtypes. bf16 weights, or fp32 weights under bf16
    autocast, to bf16 precision; fp32 to fp32 rounding."""
    layer = make_layer("mlp", E=6, d=32, f=64, top_k=top_k, residual=residual, seed=7).train()
    layer.experts.backend = backend
    reference = copy.deepcopy(layer).double()
    if dtype == "bf16":
        layer = layer.bfloat16()
    x = torch.randn(2, 13, 32).to(next(layer.parameters()).dtype)
    grad_out = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, grads = forward_backward(layer, x, grad_out)
    ref_y = naive_rows(reference, x.double().reshape(-1, 32)).reshape(2, 13, 32)
    (ref_y * grad_out).sum().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, got in [("output", y), *grads.items()]:
        ref = ref_y.detach() if name == "output" else ref_grads[name]
        if dtype == "fp32" and not autocast:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
        else:  # bf16 products: to bf16 precision, as a whole
            assert (got - ref).norm() <= 3e-2 * ref.norm() + 1e-6, name


def test_grouped_mm_falls_back_to_the_loop_where_it_raises(monkeypatch):
    """f = 37 (fp32 rows of 148 bytes): `grouped_mm` refuses the strides; the loop's results come back, and
    the automatic choice avoids `grouped_mm` on this device and dtype from then on."""
    monkeypatch.setattr(routing, "_GROUPED_MM_FAILED", set())
    layer = make_layer("mlp", E=4, d=32, f=37, top_k=2, seed=3).train()
    x = torch.randn(20, 32)
    grad_out = torch.randn(20, 32, dtype=torch.float64)
    outputs = []
    for backend in ("grouped_mm", "loop"):
        layer.experts.backend = backend
        outputs.append(forward_backward(layer, x, grad_out))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=0, atol=0)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][name], rtol=0, atol=0)
    assert routing._GROUPED_MM_FAILED == {("cpu", torch.float32)}
    assert not routing.grouped_mm_ok(x, layer.experts.stacked())


class HostReads(TorchDispatchMode):
    """What in a block would make a GPU wait for the host: a tensor's value read in Python (`.tolist()`,
    `.item()`, `bool()`, `int()`, ...), or an op whose output size depends on the data (boolean indexing,
    `nonzero`, `bincount`, ...)."""

    READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
    SIZED_BY_DATA = {"nonzero", "bincount", "masked_select", "unique", "_unique2", "_local_scalar_dense"}

    def __init__(self, monkeypatch):
        super().__init__()
        self.seen = []
        for name in self.READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._recording(name, real))

    def _recording(self, name, real):
        def read(t, *args):
            self.seen.append(name)
            return real(t, *args)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        bool_index = op in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if op in self.SIZED_BY_DATA or bool_index:
            self.seen.append(op)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_dropless_forward_with_grouped_mm_reads_nothing_on_the_host(top_k, monkeypatch):
    """What CUDA's sync debug mode checks, on the CPU: the layer's dropless forward and backward with the
    `grouped_mm` backend read no tensor value on the host. The loop backend reads the expert counts to
    slice, and a capacity factor how many assignments survive: the check sees both."""
    x = torch.randn(24, 32, requires_grad=True)
    seen = {}
    for backend, capacity in (("grouped_mm", None), ("loop", None), ("grouped_mm", 1.0)):
        layer = make_layer("gated", E=6, d=32, f=64, top_k=top_k, seed=1, capacity_factor=capacity).train()
        layer.experts.backend = backend
        with monkeypatch.context() as m, HostReads(m) as reads:
            layer(x).sum().backward()
        seen[backend, capacity] = reads.seen
    assert seen["grouped_mm", None] == []
    assert "tolist" in seen["loop", None] and "index" in seen["grouped_mm", 1.0]

"""The native few-row kernel (`native.py`, `csrc/packed_matmul.c`) on oneDNN-packed weights: the layout
it assumes, its results against float64 references and against oneDNN, decode through the runtime,
and the fallback when it is switched off or cannot be built."""

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import VOCAB, tiny_gpt2_config, tiny_llama_config
from moe_convert.inference import kernels, native
from moe_convert.convert.export import export
from moe_convert.inference.kernels import (ACTIVATIONS, PackedExperts, ffn, linear, moe_forward, pack_experts,
                                           pack_ffn, pack_matrix)
from moe_convert.inference.runtime import load_runtime

needs_kernel = pytest.mark.skipif(native.library() is None, reason=f"native kernel off: {native.why_unavailable()}")
GELU = ACTIVATIONS["gelu_new"]
# oneDNN picks its packed layout per CPU: with AMX it packs bf16 in another blocked layout than the kernel
# reads, `native.register`'s probe refuses it, and bf16 runs on oneDNN (tested on every machine below).
REFUSED = "oneDNN packs this {} matrix in a layout the native kernel does not read on this CPU (AMX, say): oneDNN runs it"


def require_native(packed, dtype=torch.bfloat16):
    """Skip unless the kernel may read `packed` (a `pack_matrix` result or a `pack_ffn` dict) on this machine."""
    readable = (native.address(packed) if isinstance(packed, torch.Tensor) else kernels.native_pointers(packed))
    if readable is None:
        pytest.skip(REFUSED.format(dtype))


@pytest.fixture(autouse=True)
def pack_small(monkeypatch):
    """Pack matrices of any size, as the runtime packs large ones; FFNs of many rows through the native
    kernel whichever way `native_prefill` measured this machine (these tests are about its results);
    random inputs from a fixed seed (the routing test needs a batch that mixes large and small experts:
    1% of seeds do not)."""
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    monkeypatch.setattr(kernels, "_PREFILL", {dtype: {"native": True} for dtype in native.LAYOUTS})
    torch.manual_seed(0)


@pytest.fixture
def calls(monkeypatch):
    """Counts the native kernel's calls (it still runs)."""
    seen = []
    real = kernels.packed_matmul

    def counted(jobs, out, inp, dtype=torch.float32):
        seen.append(len(jobs))
        real(jobs, out, inp, dtype)
    monkeypatch.setattr(kernels, "packed_matmul", counted)
    return seen


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(2048, 512), (512, 2048), (100, 512), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_onednn_packs_weights_as_the_kernel_reads_them(dtype, out_features, in_features):
    """Every entry of the packed buffer of real weights (`register` checks a probe of each shape and dtype):
    fp32 [ceil(out/64)][in][64], bf16 [ceil(out/64)][in/2][64][2]."""
    w = torch.randn(out_features, in_features).to(dtype)
    packed = pack_matrix(w.t())  # [in, out] given, [out, in] packed
    if dtype == torch.bfloat16:
        require_native(packed)
    assert native.address(packed) is not None
    blocks, pairs = -(-out_features // native.BLOCK), native.LAYOUTS[dtype]
    size = blocks * native.BLOCK * in_features * w.element_size()
    raw = torch.frombuffer((ctypes.c_char * size).from_address(native.address(packed)), dtype=dtype)
    raw = raw.view(blocks, in_features // pairs, native.BLOCK, pairs).clone()
    padded = torch.zeros(blocks * native.BLOCK, in_features, dtype=dtype)
    padded[:out_features] = w
    expected = padded.view(blocks, native.BLOCK, in_features // pairs, pairs).transpose(1, 2)
    real = (torch.arange(blocks * native.BLOCK) < out_features).view(blocks, 1, native.BLOCK, 1).expand_as(raw)
    assert torch.equal(raw[real], expected[real])  # the padding of the last block is never read


def on_one_thread(fn):
    """fn() with torch, and so the native kernels, on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def reference_ffn(x, w, act):
    """The FFN in float64 from plain [in, out] weights."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    h = act(x @ w["w_gate"]) * (x @ w["w_up"]) if "w_gate" in w else act(x @ w["w_in"] + w["b_in"])
    return h @ w["w_out"] + w.get("b_out", 0)


def ffn_weights(kind, d, f, experts=None):
    lead = () if experts is None else (experts,)
    mats = ({"w_gate": (d, f), "w_up": (d, f), "w_out": (f, d)} if kind == "gated"
            else {"w_in": (d, f), "b_in": (f,), "w_out": (f, d), "b_out": (d,)})
    return {k: torch.randn(*lead, *shape) * (shape[0] ** -0.5 if len(shape) == 2 else 1) for k, shape in mats.items()}


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [512, 100])
def test_linear_on_few_rows_equals_float64(out_features, bias, calls):
    w = torch.randn(384, out_features) / 384 ** 0.5  # [in, out]
    b = torch.randn(out_features) if bias else None
    packed = pack_matrix(w)
    row_counts = [*range(1, kernels.NATIVE_BATCH_ROWS + 1), 13, 40, kernels.NATIVE_MAX_ROWS, kernels.NATIVE_MAX_ROWS + 1]
    for rows in row_counts:  # one group of 6 rows and several (the next panel fetched ahead)
        x = torch.randn(rows, 384)
        ref = x.double() @ w.double() + (0 if b is None else b.double())
        torch.testing.assert_close(linear(x, packed, b), ref.float(), rtol=1e-5, atol=1e-5)
    assert len(calls) == len(row_counts) - 1  # one call per row count up to the limit, oneDNN above it


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_on_few_rows_equals_onednn(bias, calls):
    """bf16 packed weights through the kernel (fp32 sums, each output rounded to bf16 once, as oneDNN's):
    equal to oneDNN's results but for a last-bit rounding here and there, and within bf16 rounding of
    float64; up to `NATIVE_MAX_ROWS` rows with the CPU's bf16 dot product, else `NATIVE_BATCH_ROWS`; more
    rows go to oneDNN."""
    w = (torch.randn(384, 100) / 384 ** 0.5).bfloat16()  # [in, out]: a last block of 36 outputs
    b = torch.randn(100).bfloat16() if bias else None
    packed = pack_matrix(w)
    require_native(packed)
    limit = kernels.NATIVE_MAX_ROWS if native.bf16_dot() else kernels.NATIVE_BATCH_ROWS
    row_counts = sorted({*range(1, kernels.NATIVE_BATCH_ROWS + 1), 13, limit, limit + 1})
    for rows in row_counts:
        x = torch.randn(rows, 384).bfloat16()
        got = linear(x, packed, b)
        onednn = kernels._LINEAR_POINTWISE(x, packed, b, "none", [], "")
        ref = x.double() @ w.double() + (0 if b is None else b.double())
        torch.testing.assert_close(got, ref.bfloat16(), rtol=8e-3, atol=8e-3)
        assert got.dtype == torch.bfloat16 and (got == onednn).float().mean() > 0.98
    assert len(calls) == sum(rows <= limit for rows in row_counts)  # one call per row count up to the limit


@needs_kernel
def test_wide_inputs_take_the_kernel_for_few_rows_only_on_a_single_matrix(calls):
    """Past 6 rows each panel is read again per 6 rows: on a single matrix with 1 MiB panels (in = 4096)
    that loses to oneDNN, so only up to `NATIVE_BATCH_ROWS` rows go native there; an FFN of that width
    (f = 4096) takes the kernel at any row count. Results are right either way."""
    w = torch.randn(4096, 64) / 64  # [in, out]
    packed = pack_matrix(w)
    for rows in (kernels.NATIVE_BATCH_ROWS, kernels.NATIVE_BATCH_ROWS + 1):
        x = torch.randn(rows, 4096)
        torch.testing.assert_close(linear(x, packed), (x.double() @ w.double()).float(), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    w = ffn_weights("gpt2", 64, 4096)
    x = torch.randn(40, 64)
    torch.testing.assert_close(ffn(x, pack_ffn(w), GELU), reference_ffn(x, w, GELU).float(), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1, 1]


@pytest.fixture
def rowmajor_calls(monkeypatch):
    """Row counts the row-major kernel was called with (it still runs)."""
    seen = []
    real = native.rowmajor_matmul

    def counted(x, w, b):
        seen.append(x.shape[0])
        return real(x, w, b)
    monkeypatch.setattr(native, "rowmajor_matmul", counted)
    return seen


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plain_matrices_on_few_rows_equal_float64_and_onednn(dtype, bias, rowmajor_calls):
    """A plain row-major [out, in] matrix (a tied LM head): 1-8 rows through the row-major kernel (in = 80:
    the tail after the last full step of 64 or 32 inputs), on 1 thread as on 2; more rows, a wider x
    than L1 holds, a transposed view or an input that needs gradients go to oneDNN / torch. bf16: fp32
    sums rounded once, as oneDNN's bf16 linear: equal to its result but for a last-bit rounding here and there."""
    w = (torch.randn(301, 80) / 80 ** 0.5).to(dtype)
    b = torch.randn(301, dtype=dtype) if bias else None
    bias64 = 0 if b is None else b.double()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    for rows in range(1, native.ROWMAJOR_MAX_ROWS + 2):
        x = torch.randn(rows, 80, dtype=dtype)
        got = linear(x, w, b)
        torch.testing.assert_close(got, (x.double() @ w.double().t() + bias64).to(dtype), **tolerance)
        onednn = kernels._LINEAR_POINTWISE(x, w, b, "none", [], "")
        torch.testing.assert_close(got, onednn, **tolerance)
        if dtype == torch.bfloat16:  # fp32 sums that differ in their last bits round alike, but for a few
            assert (got == onednn).float().mean() > 0.99
    assert rowmajor_calls == list(range(1, native.ROWMAJOR_MAX_ROWS + 1))
    x = torch.randn(5, 80, dtype=dtype)
    assert torch.equal(linear(x, w, b), on_one_thread(lambda: linear(x, w, b)))
    wide = torch.randn(16, kernels.ROWMAJOR_MAX_INPUTS // 8 + 16, dtype=dtype)  # 8 rows of it: 128 elements too many
    linear(torch.randn(8, wide.shape[1], dtype=dtype), wide)
    linear(torch.randn(4, 301, dtype=dtype), w.t())
    xg = torch.randn(2, 80, dtype=dtype, requires_grad=True)
    linear(xg, w, b).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(2, -1), **tolerance)
    assert rowmajor_calls == list(range(1, native.ROWMAJOR_MAX_ROWS + 1)) + [5, 5]


@needs_kernel
@pytest.mark.parametrize("kind, act", [("gpt2", GELU), ("gated", ACTIVATIONS["silu"]), ("gpt2", ACTIVATIONS["gelu"])],
                         ids=["gpt2-gelu_tanh", "gated-silu", "gpt2-gelu_erf(torch)"])
def test_ffn_at_any_row_count_equals_float64_and_onednn(kind, act, calls):
    """fp32 FFNs take the kernel at any row count, in row blocks whose intermediate fits ROW_BLOCK_BYTES
    (1024 rows of f=1024), two calls per block, the activation in the kernel or (erf GELU) torch's
    between them."""
    w = ffn_weights(kind, 256, 1024)
    packed = pack_ffn(w)
    assert kernels.native_pointers(packed) is not None
    row_counts = (1, 3, 5, kernels.NATIVE_BATCH_ROWS, 31, kernels.NATIVE_MAX_ROWS, 300, 1500)
    for rows in row_counts:
        x = torch.randn(rows, 256)
        got = ffn(x, packed, act)
        torch.testing.assert_close(got, reference_ffn(x, w, act).float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, kernels._onednn_ffn(x, packed, act, None), rtol=1e-5, atol=1e-5)
    firsts = 2 if kind == "gated" else 1  # jobs of a block's first call (gate and up together); second: 1
    assert calls == [firsts, 1] * (len(row_counts) + 1)  # 1500 rows: blocks of 1024 and 476


@needs_kernel
@pytest.mark.parametrize("kind, act", [("gpt2", GELU), ("gated", ACTIVATIONS["silu"])])
def test_bf16_ffns_on_few_rows_equal_onednn(kind, act, calls):
    """bf16: one FFN, and the decode batch of experts plus the residual FFN in two native calls, against
    oneDNN on the same packed weights, within bf16 rounding (the intermediate is rounded to bf16 before
    the activation here, after it in oneDNN's fused post-op)."""
    w = {k: v.bfloat16() for k, v in ffn_weights(kind, 256, 1024).items()}
    packed = pack_ffn(w)
    require_native(packed)
    for rows in (1, 5, kernels.NATIVE_BATCH_ROWS):
        x = torch.randn(rows, 256).bfloat16()
        got = ffn(x, packed, act)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, kernels._onednn_ffn(x, packed, act, None), rtol=2e-2, atol=2e-2)
    assert len(calls) == 3 * 2
    E = 6
    stacked = {k: v.bfloat16() for k, v in ffn_weights(kind, 256, 1024, experts=E).items()}
    router, x = torch.randn(E, 256), torch.randn(5, 256).bfloat16()
    coef = torch.randn(5, 2).softmax(-1)
    with torch.inference_mode():
        got, routing = moe_forward(x, router, pack_experts(stacked), act, residual=(coef, packed))
        ref, _ = moe_forward(x, router, stacked, act, residual=(coef, ffn(x, w, act)))
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    ffns = int((routing.counts > 0).sum()) + 1  # the hit experts and the residual, together
    assert calls[6:] == [ffns * (2 if kind == "gated" else 1), ffns]  # jobs of the two native calls


@needs_kernel
@pytest.mark.skipif(not native.bf16_dot(), reason="no bf16 dot product here: bf16 takes the kernel for few rows only")
@pytest.mark.parametrize("kind, act", [("gpt2", GELU), ("gated", ACTIVATIONS["silu"])])
def test_bf16_ffns_at_any_row_count_equal_onednn_and_float64(kind, act, calls):
    """With the CPU's bf16 dot product, bf16 FFNs take the kernel at any row count, in row blocks (2500 rows
    of f=1024 in bf16: blocks of 2048 and 452), within bf16 rounding of oneDNN's and of float64."""
    w = {k: v.bfloat16() for k, v in ffn_weights(kind, 256, 1024).items()}
    packed = pack_ffn(w)
    require_native(packed)
    for rows in (40, 300, 2500):
        x = torch.randn(rows, 256).bfloat16()
        got = ffn(x, packed, act)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, kernels._onednn_ffn(x, packed, act, None), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.double(), reference_ffn(x, w, act), rtol=2e-2, atol=2e-2)
    assert len(calls) == 2 * 4


@needs_kernel
@pytest.mark.parametrize("name", ["gelu_new", "silu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernels_activations_equal_float64_as_closely_as_torchs(name, dtype):
    """A job with an activation stores act(x w + b): against the float64 function of the same job's
    outputs without it, over inputs from about -20 to 20 (both tails of each function), within a few fp32
    ulp and at most twice torch's own op's error (fp32); in bf16, within one rounding of the float64 job
    (torch would round twice: the sums, then its activation's output)."""
    act = ACTIVATIONS[name]
    assert kernels.NATIVE_ACTIVATIONS[act] != native.ACT_NONE
    d, f, rows = 64, 256, 7
    w, b = (torch.randn(d, f) * 2.5).to(dtype), (torch.randn(f) * 2).to(dtype)
    x = torch.randn(rows, d).to(dtype)
    packed = pack_matrix(w)
    require_native(packed, dtype)

    def run(code):
        y = torch.empty(rows, f, dtype=dtype)
        native.packed_matmul([native.Job(rows, x.data_ptr(), native.address(packed), b.data_ptr(), y.data_ptr(),
                                         code)], f, d, dtype)
        return y
    plain = run(native.ACT_NONE).double()
    assert plain.min() < -12 and plain.max() > 12
    got, ref = run(kernels.NATIVE_ACTIVATIONS[act]).double(), act(plain)
    if dtype == torch.float32:
        torch_err = (act(plain.float()).double() - ref).abs()
        err = (got - ref).abs()
        assert (err <= 8 * torch.finfo(torch.float32).eps * ref.abs() + 1e-7).all(), float(err.max())
        assert float(err.max()) <= 2 * float(torch_err.max()) + 1e-7
    else:  # the kernel activates its fp32 sums: against the float64 job, one bf16 rounding
        exact = act(x.double() @ w.double() + b.double())
        torch.testing.assert_close(got, exact, rtol=2 ** -8, atol=1e-4)


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    """Each output is one thread's sum in a fixed order: bitwise the same on 1 thread as on 2."""
    w = ffn_weights("gpt2", 256, 1024)
    packed, x = pack_ffn(w), torch.randn(3, 256)
    assert torch.equal(ffn(x, packed, GELU), on_one_thread(lambda: ffn(x, packed, GELU)))


@needs_kernel
def test_experts_run_in_batches_whose_intermediate_fits_the_row_block(calls, monkeypatch):
    """Experts of very different row counts (40 tokens over 6 experts) run through the native kernel in
    batches, a new one where the next expert's rows would take the batch's (rows, f) intermediate past
    ROW_BLOCK_BYTES (here 8 rows), an expert of more rows in blocks of 8; two calls per batch. The packed
    runtime path equals the layer's path on the plain stacked weights."""
    E, d = 6, 256
    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 8 * 4 * d * 4)  # 8 rows of f = 4d fp32
    stacked = ffn_weights("gpt2", d, 4 * d, experts=E)
    router = torch.randn(E, d)
    router[0] *= 0  # expert 0's logit is 0: with the others' random, it wins for some tokens, not most
    x = torch.randn(40, d)
    packed = pack_experts(stacked)
    assert isinstance(packed, PackedExperts) and all(p is not None for p in packed.pointers)
    with torch.inference_mode():
        got, routing = moe_forward(x, router, packed, GELU)
        ref, _ = moe_forward(x, router, stacked, GELU)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    counts = routing.counts[routing.counts > 0].tolist()
    assert max(counts) > 8, counts
    batches, rows = [], 8  # jobs per batch: the experts in order, an expert over 8 rows in 8-row blocks
    for n in counts:
        for m in [8] * (n // 8) + [n % 8] * (n % 8 > 0):
            if rows + m > 8:
                batches.append(0)
                rows = 0
            batches[-1], rows = batches[-1] + 1, rows + m
    assert max(batches) > 1, routing.counts  # some batch with several experts
    assert calls == [n for n in batches for _ in range(2)]


@needs_kernel
def test_the_residual_ffn_streams_with_the_experts(calls):
    """Decode: given the residual FFN's weights, moe_forward runs it in the experts' two native calls, and
    the layer equals the one given the residual's output computed on its own from plain weights."""
    E, d = 16, 256
    stacked, dense = ffn_weights("gpt2", d, 4 * d, experts=E), ffn_weights("gpt2", d, 4 * d)
    router, x = torch.randn(E, d), torch.randn(4, d)
    coef = torch.randn(4, 2).softmax(-1)
    with torch.inference_mode():
        got, routing = moe_forward(x, router, pack_experts(stacked), GELU, residual=(coef, pack_ffn(dense)))
        ref, _ = moe_forward(x, router, stacked, GELU, residual=(coef, reference_ffn(x, dense, GELU).float()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert calls == [int((routing.counts > 0).sum()) + 1] * 2


@needs_kernel
def test_a_residual_ffn_of_another_size_runs_on_its_own(calls):
    """A residual FFN whose hidden size differs from the experts' does not join their native calls."""
    E, d = 4, 128
    stacked, dense = ffn_weights("gpt2", d, 4 * d, experts=E), ffn_weights("gpt2", d, 8 * d)
    router, x, coef = torch.randn(E, d), torch.randn(3, d), torch.randn(3, 2).softmax(-1)
    with torch.inference_mode():
        got, routing = moe_forward(x, router, pack_experts(stacked), GELU, residual=(coef, pack_ffn(dense)))
        ref, _ = moe_forward(x, router, stacked, GELU, residual=(coef, reference_ffn(x, dense, GELU).float()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert calls == [1, 1] + [int((routing.counts > 0).sum())] * 2  # the residual alone, then the experts


@needs_kernel
def test_only_matrices_packed_by_pack_matrix_reach_the_kernel(calls):
    """A matrix packed another way (here oneDNN's hint for 1 row, a different layout of the same size)
    goes through oneDNN, and the result is right."""
    w = torch.randn(2048, 512) / 512 ** 0.5
    packed = kernels._REORDER_WEIGHT(w.contiguous(), 1)
    assert torch.ops.mkldnn._nbytes(packed) == w.numel() * 4 and native.address(packed) is None
    x = torch.randn(1, 512)
    torch.testing.assert_close(linear(x, packed), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert calls == []


@needs_kernel
def test_shapes_that_do_not_fit_are_refused_not_computed(calls):
    """A wrong bias, input width or output buffer goes to oneDNN, which refuses it; nothing is written past it."""
    w = torch.randn(256, 1024) / 16
    packed, packed_ffn = pack_matrix(w), pack_ffn(ffn_weights("gpt2", 256, 1024))
    with pytest.raises(RuntimeError):
        linear(torch.randn(1, 256), packed, torch.randn(10))
    with pytest.raises(RuntimeError):
        linear(torch.randn(1, 200), packed)
    buf = torch.zeros(4, 256)
    with pytest.raises(RuntimeError):
        ffn(torch.randn(3, 256), packed_ffn, GELU, out=buf[:2])
    assert calls == [] and not buf[2:].any()


@needs_kernel
@pytest.mark.parametrize("host, top_k, dtype", [("gpt2", 1, "fp32"), ("llama", 1, "fp32"), ("llama", 2, "fp32"),
                                                ("gpt2", 1, "bf16")])
def test_runtime_decoding_through_the_kernel_equals_the_source_model(host, top_k, dtype, tmp_path, monkeypatch):
    """KV-cache decoding one token at a time (every FFN, expert and projection on few rows, in the batch
    size's `plan.DecodePlan`; the MoE layers through `decode.Decoder`) against the source PRMoEForCausalLM's
    logits (a bf16 export: to bf16 tolerance)."""
    from moe_convert.inference.decode import Decoder
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    text = tiny_gpt2_config(n_inner=128) if host == "gpt2" else tiny_llama_config(intermediate_size=128)
    torch.manual_seed(3)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=text.to_dict(), moe_layers=[1, 3], num_experts=[4, 6],
                                         num_experts_per_tok=top_k)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # GPT-2 starts its biases at zero
    model.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out", dtype=dtype)
    rt = load_runtime(tmp_path / "out")
    if dtype == "bf16" and None in rt.ffns[1]["moe"].stacked.pointers:
        pytest.skip(REFUSED.format(dtype))
    assert all(p is not None for p in rt.ffns[1]["moe"].stacked.pointers)
    decoded, real = [], Decoder.run

    def counted(self, T, *args):
        decoded.append(T)
        real(self, T, *args)
    monkeypatch.setattr(Decoder, "run", counted)
    ids = torch.randint(0, VOCAB, (2, 9))
    cache = rt.new_cache(2, 9)
    steps = [rt.forward(ids[:, :1], cache)] + [rt.forward(ids[:, t:t + 1], cache) for t in range(1, 9)]
    with torch.no_grad():
        ref = model(ids).logits
    got = torch.cat(steps, dim=1)
    if dtype == "fp32":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # as test_runtime's bf16 logits: bf16 keeps ~3 significant digits
        assert (got.float() - ref).norm() / ref.norm() < 2e-2
    assert rt.decode_plans[2] is not None  # the decode steps went through the kernel, prepared
    assert decoded == [2] * 2 * 9  # each step's two MoE layers took the batch's 2 tokens


FALLBACK = textwrap.dedent("""
    import torch
    from moe_convert.inference import kernels, native
    kernels.PACK_MIN_BYTES = 0
    w, x = torch.randn(64, 128), torch.randn(2, 64)
    y = kernels.linear(x, kernels.pack_matrix(w))
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    print(native.library() is None, native.why_unavailable())
""")


@pytest.mark.parametrize("env, reason", [
    ({"MOE_CONVERT_NATIVE": "0"}, "MOE_CONVERT_NATIVE=0"),
    pytest.param({"CC": "/nonexistent/cc"}, "no C compiler", marks=needs_kernel),
    pytest.param({"CC": "false"}, "could not build the native kernel: false failed", marks=needs_kernel),
])
def test_without_the_kernel_results_come_from_onednn(env, reason, tmp_path):
    """Switched off, no compiler, or a compiler that fails: the same results, and the reason is told."""
    run_env = {**os.environ, "MOE_CONVERT_CACHE": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True " + reason), done.stdout
    assert not list(tmp_path.rglob("*.tmp"))  # a failed build leaves nothing behind


WITHOUT_BF16_DOT = textwrap.dedent("""
    import torch
    from moe_convert.inference import kernels, native
    kernels.PACK_MIN_BYTES = 0
    calls = []
    real = kernels.packed_matmul
    kernels.packed_matmul = lambda jobs, *a: calls.append(len(jobs)) or real(jobs, *a)
    torch.manual_seed(0)
    w = {"w_in": torch.randn(256, 1024) / 16, "b_in": torch.randn(1024), "w_out": torch.randn(1024, 256) / 32,
         "b_out": torch.randn(256)}
    w = {k: v.bfloat16() for k, v in w.items()}
    packed, act = kernels.pack_ffn(w), kernels.ACTIVATIONS["gelu_new"]
    for rows in (5, 40):  # the widened kernel for decode's rows, oneDNN over them
        x = torch.randn(rows, 256).bfloat16()
        got, ref = kernels.ffn(x, packed, act), kernels._onednn_ffn(x, packed, act, None)
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    print(native.library() is not None, native.bf16_dot(), calls)
""")


@needs_kernel
@pytest.mark.skipif(not native.bf16_dot(), reason="this CPU has no bf16 dot product: every test runs without it")
def test_a_build_without_the_bf16_dot_product_widens_bf16_for_decodes_rows_only(tmp_path):
    """The kernel built for a CPU without AVX512-BF16 (its widened fp32 multiply-adds): bf16 FFNs of decode's
    rows through it, within bf16 rounding of oneDNN's; more rows go to oneDNN."""
    require_native(pack_ffn({k: v.bfloat16() for k, v in ffn_weights("gpt2", 256, 1024).items()}))
    env = {**os.environ, "MOE_CONVERT_CACHE": str(tmp_path), native.EXTRA_FLAGS_VAR: "-mno-avx512bf16"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_BF16_DOT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=2) == ["True", "False", "[1, 1]\n"], done.stdout


@needs_kernel
def test_the_library_is_built_once_into_the_user_cache(tmp_path):
    script = "from moe_convert.inference import native; print(native.library()._name)"
    env = {**os.environ, "MOE_CONVERT_CACHE": str(tmp_path)}
    first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                    timeout=120).stdout.strip() for _ in range(2))
    assert first == second and first.startswith(str(tmp_path / "native"))
    assert [p.name for p in (tmp_path / "native").iterdir()] == [os.path.basename(first)]


@pytest.fixture
def probe_refuses(monkeypatch):
    """The layout probe refuses every shape, as on a CPU where oneDNN packs another layout (AMX's for bf16)."""
    monkeypatch.setattr(native, "_same_layout", lambda packed, w: False)
    monkeypatch.setattr(native, "_layout", {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_layout_the_probe_refuses_runs_on_onednn_and_never_reaches_the_kernel(dtype, probe_refuses, calls):
    """Runs on every machine: packed matrices the probe refuses (no address) give oneDNN's results for one
    matrix, an FFN and a PR-MoE layer of packed experts, and no call reaches the C kernel."""
    w = (torch.randn(384, 100) / 384 ** 0.5).to(dtype)
    packed = pack_matrix(w)
    assert packed is not None and packed.is_mkldnn and native.address(packed) is None
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for rows in (1, 5, 40):
        x = torch.randn(rows, 384).to(dtype)
        assert torch.equal(linear(x, packed), kernels._LINEAR_POINTWISE(x, packed, None, "none", [], ""))
        torch.testing.assert_close(linear(x, packed), (x.double() @ w.double()).to(dtype), **tolerance)
    fw = {k: v.to(dtype) for k, v in ffn_weights("gpt2", 256, 1024).items()}
    packed_ffn = pack_ffn(fw)
    assert kernels.native_pointers(packed_ffn) is None
    x = torch.randn(5, 256).to(dtype)
    assert torch.equal(ffn(x, packed_ffn, GELU), kernels._onednn_ffn(x, packed_ffn, GELU, None))
    stacked = {k: v.to(dtype) for k, v in ffn_weights("gpt2", 256, 1024, experts=4).items()}
    experts = pack_experts(stacked)
    assert isinstance(experts, PackedExperts) and experts.pointers == (None,) * 4
    router, coef = torch.randn(4, 256), torch.randn(5, 2).softmax(-1)
    with torch.inference_mode():
        got, _ = moe_forward(x, router, experts, GELU, residual=(coef, packed_ffn))
        ref, _ = moe_forward(x, router, stacked, GELU, residual=(coef, ffn(x, fw, GELU)))
    torch.testing.assert_close(got, ref, **tolerance)
    assert calls == []


@needs_kernel
def test_the_kernel_refuses_addresses_it_was_not_given():
    """A job whose matrix was never registered (no address, another matrix's bytes, a freed one) or that
    lacks x or y raises ValueError before the C call, which checks them too; the process lives on."""
    w = torch.randn(256, 64) / 16
    packed = pack_matrix(w)
    at = native.address(packed)
    if at is None:
        pytest.skip(REFUSED.format("fp32"))
    x, y = torch.randn(2, 256), torch.empty(2, 64)
    native.packed_matmul([native.Job(2, x.data_ptr(), at, 0, y.data_ptr())], 64, 256)
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    bad = [native.Job(2, x.data_ptr(), None, 0, y.data_ptr()),  # a refused layout's `address`
           native.Job(2, x.data_ptr(), w.data_ptr(), 0, y.data_ptr()),  # plain bytes, not a packed matrix
           native.Job(2, 0, at, 0, y.data_ptr()), native.Job(2, x.data_ptr(), at, 0, 0), native.Job(0, 0, at, 0, 0)]
    for job in bad:
        with pytest.raises(ValueError, match="not a registered"):
            native.packed_matmul([job], 64, 256)
    with pytest.raises(ValueError, match="not a registered"):  # the right bytes, the wrong shape or dtype
        native.packed_matmul([native.Job(2, x.data_ptr(), at, 0, y.data_ptr())], 64, 128)
    with pytest.raises(ValueError, match="not a registered"):
        native.packed_matmul([native.Job(2, x.data_ptr(), at, 0, y.data_ptr())], 64, 256, torch.bfloat16)
    del packed
    with pytest.raises(ValueError, match="not a registered"):  # freed: its bytes are no longer the kernel's
        native.packed_matmul([native.Job(2, x.data_ptr(), at, 0, y.data_ptr())], 64, 256)
    assert native.library().mc_packed_matmul(1, (native.Job * 1)(native.Job(2, 0, 0, 0, 0)), 64, 256, 0, 1) != 0
    with pytest.raises(ValueError, match="rowmajor_matmul does not take"):
        native.rowmajor_matmul(torch.randn(native.ROWMAJOR_MAX_ROWS + 1, 64), torch.randn(32, 64), None)
    assert native.library().mc_rowmajor_matmul(1, 0, 0, 0, 0, 32, 64, 0, 1) != 0


@needs_kernel
def test_ffns_of_many_rows_take_the_path_measured_faster_here(calls, monkeypatch, tmp_path):
    """Past `NATIVE_MAX_ROWS` rows an FFN goes where `native_prefill` says: oneDNN when it measured oneDNN
    faster, the native kernel otherwise; the same results either way. The measurement is timed once per
    build and dtype, kept beside the build, and read back by the next process."""
    w = ffn_weights("gpt2", 256, 1024)
    packed, x = pack_ffn(w), torch.randn(300, 256)
    got = {}
    for faster in (False, True):
        monkeypatch.setattr(kernels, "_PREFILL", {torch.float32: {"native": faster}})
        calls.clear()
        got[faster] = ffn(x, packed, GELU)
        assert bool(calls) == faster
    torch.testing.assert_close(got[False], got[True], rtol=1e-5, atol=1e-5)
    script = ("import json, torch; from moe_convert.inference import kernels; "
              "print(json.dumps(kernels.prefill_timing(torch.float32)))")
    env = {**os.environ, "MOE_CONVERT_CACHE": str(tmp_path)}
    first, second = (json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                               text=True, timeout=300).stdout) for _ in range(2))
    assert first == second and first["native"] == (first["native_ms"] <= first["onednn_ms"])
    assert len(list((tmp_path / "native").glob("*-prefill-float32.json"))) == 1

"""CPU inference kernels: oneDNN and the native kernel behind the MoE forward's ops, packed weights.

`model/routing.py` holds the MoE forward in plain torch; importing this module registers faster
versions of its "linear" (the gate) and "loop" (the experts) for calls without autograd or
autocast, and the runtime calls `moe_forward` here with packed weights. The choices were measured on
CPU (`moe-convert bench layer` re-measures them; docs/benchmarks.md keeps the numbers):
- each expert's whole FFN runs in turn on its contiguous slice, through oneDNN
  (`torch.ops.mkldnn._linear_pointwise`, activation fused into the first matmul, row blocks that keep
  the intermediate in cache), because the fp32 `torch.mm` of this torch build is MKL, which runs
  below oneDNN on AMD CPUs; the layer's plain [in, out] parameters are read through transposed views,
  and slices under `ONEDNN_MIN_ROWS` rows use MKL's `addmm`;
- the runtime packs every FFN's weights once at load into oneDNN's blocked layout (`pack_ffn`,
  `pack_experts`), and FFNs on packed fp32 weights (bf16: with the CPU's bf16 dot product, else up to
  `NATIVE_BATCH_ROWS` rows) go through the native kernel (`native.py`), the activation fused, in
  batches of row blocks (decode's experts together in two calls).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import collapse_into_huge_pages
from ..model import routing
from ..model.routing import ACTIVATIONS, expert_slices, fused_activation, register_no_grad
from . import native
from .native import Job, address, packed_matmul, register

# --- oneDNN linear (CPU, no autograd) ------------------------------------------------------------------
# `_linear_pointwise(x, w [out, in], b, post-op, scalars, algorithm)` is the op inductor's CPU backend
# emits; it takes our [in, out] weights through a transposed view (no copy), or weights packed once into
# oneDNN's blocked layout (`pack_ffn`), and fuses the activation.
_MKLDNN = getattr(torch.ops, "mkldnn", None)
_LINEAR_POINTWISE = getattr(_MKLDNN, "_linear_pointwise", None)
_REORDER_WEIGHT = getattr(_MKLDNN, "_reorder_linear_weight", None)
# Post-ops equal to our activations (to fp32 rounding, `tests/test_bench.py`).
_POST_OPS = {ACTIVATIONS["gelu_new"]: ("gelu", "tanh"), ACTIVATIONS["gelu_pytorch_tanh"]: ("gelu", "tanh"),
             ACTIVATIONS["gelu_fast"]: ("gelu", "tanh"), F.gelu: ("gelu", "none"), F.silu: ("swish", ""),
             F.relu: ("relu", "")}
# Activations the native kernel applies as it stores the first matmul's outputs (`native.ACT_*`, within
# a few ulp, tests/test_native.py): a separate pass of torch's tanh GELU cost a tenth of a prefill.
# Others run as torch ops between the two calls.
NATIVE_ACTIVATIONS = {
    **dict.fromkeys((ACTIVATIONS[k] for k in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")), native.ACT_GELU_TANH),
    F.silu: native.ACT_SILU, F.relu: native.ACT_RELU}
# Below this many rows MKL's GEMV path reads transposed-view weights faster than oneDNN (packed weights
# always go through oneDNN).
ONEDNN_MIN_ROWS = 8
# The same for one matrix (`linear`: the router, small projections) with cold weights, as in decode:
# oneDNN's set-up per call on plain weights outweighs its faster kernel below this.
LINEAR_ONEDNN_MIN_ROWS = 128
# An FFN runs over row blocks whose (rows, f) intermediate fits in this many bytes, so the second
# matmul reads it from cache; the native kernel's batches of experts keep to it too.
ROW_BLOCK_BYTES = 4 * 2**20
# Batch size oneDNN is told to expect when packing: large hints gave the fastest kernels at every row count.
PACK_BATCH_HINT = 512
# Slices up to this many rows run through the native kernel together, every expert's first matmul in
# one call: decode's few rows per expert are bound by reading the weights once.
NATIVE_BATCH_ROWS = 8
# Up to this many rows one packed matrix (`linear`) goes through the native kernel (`_native_rows`);
# beyond, oneDNN's larger register blocks win.
NATIVE_MAX_ROWS = 96
# Over 6 rows the kernel reads each [in][64] panel again per 6 rows, from L2: on a single matrix that
# pays while a panel fits L2 well (in <= 2048); FFNs, batched in row blocks, take any width.
NATIVE_MAX_REREAD_IN = 2048
# The row-major kernel re-reads the rows of x for every weight row: they must stay in L1.
ROWMAJOR_MAX_INPUTS = 8192  # elements of x (32 KiB)
# Matrices smaller than this stay plain where only oneDNN would read them packed: its per-call cost
# outweighs its faster kernel. The native kernel reads packed matrices of any size (a few us per call).
PACK_MIN_BYTES = 2 * 2**20


def native_fp16_matmul() -> bool:
    """This CPU multiplies fp16 matrices natively (oneDNN has fp16 kernels for it, e.g. AVX512-FP16 /
    AMX-FP16). Without them torch falls back to a scalar path, two orders of magnitude below fp32."""
    supported = getattr(_MKLDNN, "_is_mkldnn_fp16_supported", None)
    return bool(supported and supported())


def onednn_ok(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """oneDNN's fused linear applies: CPU, fp32/bf16 throughout, no autograd needed, op present."""
    return (_LINEAR_POINTWISE is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and all(t is None or t.dtype == x.dtype for t in weights) and torch.backends.mkldnn.is_available()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))))


def is_packed(w: dict[str, torch.Tensor]) -> bool:
    """The FFN's matrices are packed for oneDNN (`pack_ffn`), not plain [in, out] tensors."""
    return w["w_out"].is_mkldnn


def _large(w: torch.Tensor) -> bool:
    """At least `PACK_MIN_BYTES`: big enough that oneDNN's faster kernel pays for its per-call cost."""
    return w.numel() * w.element_size() >= PACK_MIN_BYTES


def pack_matrix(w: torch.Tensor) -> torch.Tensor | None:
    """An [in, out] matrix reordered once into oneDNN's blocked layout (opaque `[out, in]`, read only by
    `linear` / `ffn`); None where that does not pay: no oneDNN for it, or under `PACK_MIN_BYTES` where the
    native kernel does not read it."""
    if _REORDER_WEIGHT is None or not onednn_ok(w):
        return None
    packed = _pack(w.t().contiguous())
    native_reads = register(packed, _pack)  # if its dtype and layout are ones the native kernel reads
    return packed if native_reads or _large(w) else None


def _pack(w_t: torch.Tensor) -> torch.Tensor:
    """[out, in] -> oneDNN's blocked layout, for `PACK_BATCH_HINT` rows."""
    return _REORDER_WEIGHT(w_t, PACK_BATCH_HINT)


def native_pointers(w: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """Addresses of a packed FFN's matrices and biases for the native kernel; None where it does not apply
    (no kernel on this machine, matrices it may not read (`native.address`: fp32 or bf16, packed by
    `pack_matrix`, a layout it reads), or shapes and dtypes that do not fit together: [f, d] in, [d, f]
    out, biases (f,) and (d,), all of one dtype)."""
    mats = {k: v for k, v in w.items() if k.startswith("w_")}
    biases = {k: v for k, v in w.items() if k.startswith("b_") and v is not None}
    addresses = {k: address(m) if m.is_mkldnn else None for k, m in mats.items()}
    if "w_out" not in mats or None in addresses.values():
        return None
    (d, f), dtype = mats["w_out"].shape, mats["w_out"].dtype
    if any(tuple(m.shape) != (f, d) or m.dtype != dtype for k, m in mats.items() if k != "w_out") or not all(
            _native_bias(b, d if k == "b_out" else f, dtype) for k, b in biases.items()):
        return None
    return {**addresses, **{k: b.data_ptr() for k, b in biases.items()}}


def _native_bias(b: torch.Tensor, n: int, dtype: torch.dtype) -> bool:
    """b is a bias the native kernel reads for n outputs of a `dtype` matrix: contiguous (n,) in that dtype."""
    return b.dtype == dtype and b.is_contiguous() and tuple(b.shape) == (n,)


def _native_input(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """x is rows the native kernel reads for a `dtype` matrix: 2-D on the CPU in that dtype."""
    return x.dtype == dtype and x.device.type == "cpu" and x.dim() == 2


def _native_rows(rows: int, dtype: torch.dtype, *inner: int, ffn: bool = False) -> bool:
    """The native kernel is the faster one for `rows` rows through `dtype` matrices of these input widths:
    decode's few rows always; up to `NATIVE_MAX_ROWS` rows of inputs up to `NATIVE_MAX_REREAD_IN` wide;
    past that an FFN's two matrices in row blocks (`ffn`) where `native_prefill` measured it faster on
    this machine. bf16 beyond decode's few rows only with the CPU's bf16 dot product (`native.bf16_dot`)."""
    return rows <= NATIVE_BATCH_ROWS or (
        (dtype == torch.float32 or (dtype == torch.bfloat16 and native.bf16_dot()))
        and ((rows <= NATIVE_MAX_ROWS and max(inner) <= NATIVE_MAX_REREAD_IN) or (ffn and native_prefill(dtype))))


# The FFN `native_prefill` times: rows, d, f (a T=1024 slice of a d=512 layer's experts or residual FFN).
PREFILL_PROBE = (1024, 512, 2048)


def native_prefill(dtype: torch.dtype) -> bool:
    """FFNs of many rows run faster through the native kernel than through oneDNN's on this machine
    (`prefill_timing`)."""
    return prefill_timing(dtype)["native"]


def prefill_timing(dtype: torch.dtype) -> dict:
    """{"native": bool, "native_ms", "onednn_ms"}: which of the native kernel and oneDNN runs an FFN of many
    rows faster here, and their times ({"native": False} alone where the kernel cannot run it).

    It depends on the CPU (the kernel won on AMD EPYC, oneDNN on Intel Xeon: docs/kernels.md), so it is
    timed once per machine, native build and dtype: an FFN of `PREFILL_PROBE`, both ways, interleaved,
    medians. The answer is kept beside the build in the cache (delete the file to time it again) and
    in this process.
    """
    if dtype not in _PREFILL:
        lib = native.library()
        file = None if lib is None else Path(lib._name).with_name(
            f"{Path(lib._name).stem}-prefill-{str(dtype).removeprefix('torch.')}.json")
        try:
            _PREFILL[dtype] = json.loads(file.read_text()) if file else {"native": False}
        except (OSError, ValueError):
            times = _time_prefill(dtype)
            _PREFILL[dtype] = {"native": False} if times is None else {
                **times, "native": times["native_ms"] <= times["onednn_ms"]}
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_PREFILL[dtype]))
            os.replace(tmp, file)
    return _PREFILL[dtype]


_PREFILL: dict[torch.dtype, dict] = {}  # `prefill_timing`'s answers in this process


def _time_prefill(dtype: torch.dtype, rounds: int = 5) -> dict[str, float] | None:
    """Median ms of a `PREFILL_PROBE` FFN through the native kernel and through oneDNN, or None where the
    native kernel cannot take its packed weights here."""
    rows, d, f = PREFILL_PROBE
    g = torch.Generator().manual_seed(0)
    w = {"w_in": torch.randn(d, f, generator=g) / d**0.5, "b_in": torch.randn(f, generator=g),
         "w_out": torch.randn(f, d, generator=g) / f**0.5, "b_out": torch.randn(d, generator=g)}
    packed = pack_ffn({k: v.to(dtype) for k, v in w.items()})
    pointers = native_pointers(packed) if is_packed(packed) else None
    if pointers is None:
        return None
    x, act = torch.randn(rows, d, generator=g).to(dtype), ACTIVATIONS["gelu_new"]
    ways = {"native_ms": lambda: _native_ffn(x, pointers, f, act), "onednn_ms": lambda: _onednn_ffn(x, packed, act, None)}
    times = {k: [] for k in ways}
    with torch.inference_mode():
        for fn in ways.values():  # one-off costs (oneDNN builds its kernels on a first call)
            fn()
        for _ in range(rounds):
            for k, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _native_ok(x: torch.Tensor, dtype: torch.dtype, width: int, out: torch.Tensor | None, out_width: int,
               *inner: int, ffn: bool = False) -> bool:
    """x (n, width) can feed the native kernel on `dtype` matrices, writing into `out` (n, out_width) when
    given: x on the CPU in that dtype, rows the kernel takes for matrices of input widths `width` and
    `inner` (`_native_rows`, `ffn` as there), a contiguous output of the same dtype."""
    return (_native_input(x, dtype) and x.shape[1] == width
            and _native_rows(x.shape[0], dtype, width, *inner, ffn=ffn)
            and (out is None or (out.is_contiguous() and out.dtype == dtype
                                 and tuple(out.shape) == (x.shape[0], out_width))))


def _native_ffns(parts: list[tuple[int, int, int, dict[str, int]]], d: int, f: int, act,
                 dtype: torch.dtype = torch.float32) -> None:
    """FFNs (d -> f -> d) on packed weights (fp32 or bf16: `dtype`), in two native calls: every first matmul
    with the activation (the kernel's, `NATIVE_ACTIVATIONS`, else torch's over all their rows after the
    call), every second matmul (decode: one stream over all the weights; more rows: `_native_batches`).

    parts: (rows n, address of x (n, d), address of out (n, d), `native_pointers` of the FFN) per FFN,
    x and out contiguous rows of `dtype` that the caller keeps alive (rows of larger tensors are fine:
    addresses, not views, because a decode step's dozen views cost more than the arithmetic).
    Results are written into each out.
    """
    code = NATIVE_ACTIVATIONS.get(act, native.ACT_NONE)  # the kernel's own activation, where it has `act`
    h = torch.empty(sum(n for n, *_ in parts), f, dtype=dtype)  # (sum of rows, f): act(x w_in + b_in), or act(x w_gate)
    up = torch.empty_like(h) if "w_gate" in parts[0][3] else None  # x w_up
    first, second = ffn_jobs(parts, h, up, code)
    packed_matmul(first, f, d, dtype)  # every first matmul in one call
    if code == native.ACT_NONE:
        h.copy_(act(h))  # in place: the second jobs read h's rows
    if up is not None:
        h.mul_(up)
    packed_matmul(second, d, f, dtype)


def ffn_jobs(parts: list[tuple[int, int, int, dict[str, int]]], h: torch.Tensor, up: torch.Tensor | None,
             code: int) -> tuple[list[Job], list[Job]]:
    """The native kernel's jobs of FFNs (`_native_ffns`'s parts): every first matmul into its rows of h (sum of
    rows, f), the activation `code` applied, and of up for the gated kind; every second matmul from h's rows
    into its out."""
    row = h.shape[1] * h.element_size()  # bytes of an intermediate row
    starts = itertools.accumulate((n for n, *_ in parts), initial=0)  # each part's first intermediate row
    first, second, ups = [], [], []
    for a, (n, x, out, p) in zip(starts, parts):
        first.append(Job(n, x, p["w_gate" if up is not None else "w_in"], p.get("b_in", 0), h.data_ptr() + row * a,
                         code))
        if up is not None:
            ups.append(Job(n, x, p["w_up"], 0, up.data_ptr() + row * a))
        second.append(Job(n, h.data_ptr() + row * a, p["w_out"], p.get("b_out", 0), out))
    return first + ups, second


def _native_ffn(x: torch.Tensor, pointers: dict[str, int], f: int, act, out: torch.Tensor | None = None) -> torch.Tensor:
    """One FFN d -> f -> d on x (n, d) through the native kernel (`native_pointers` of its packed weights, act
    fused as `NATIVE_ACTIVATIONS` has it), in row blocks (`_native_batches`), into `out` (n, d) or a new tensor."""
    x = x.contiguous()
    out = x.new_empty(x.shape) if out is None else out
    d = x.shape[1]
    for batch in _native_batches([(x.shape[0], x.data_ptr(), out.data_ptr(), pointers)], d, f, x.element_size()):
        _native_ffns(batch, d, f, act, x.dtype)
    return out


def _native_batches(parts: list[tuple[int, int, int, dict[str, int]]], d: int, f: int,
                    itemsize: int) -> list[list[tuple[int, int, int, dict[str, int]]]]:
    """`_native_ffns` parts (rows, x address, out address, pointers), in order, cut into row blocks and
    grouped into batches whose (rows, f) intermediate fits `ROW_BLOCK_BYTES`, so each batch's second
    call reads it from cache (decode: all parts in one batch)."""
    budget, row = max(1, ROW_BLOCK_BYTES // (f * itemsize)), d * itemsize
    batches, rows = [], budget  # rows in the last batch
    for n, x_at, out_at, pointers in parts:
        for s in range(0, n, budget):
            m = min(budget, n - s)
            if rows + m > budget:
                batches.append([])
                rows = 0
            batches[-1].append((m, x_at + s * row, out_at + s * row, pointers))
            rows += m
    return batches


def pack_ffn(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One FFN's weights for CPU inference: each [in, out] matrix reordered once into oneDNN's blocked layout.

    Same keys; the matrices become opaque mkldnn tensors that only `ffn` reads (biases stay as they
    are): oneDNN reads its own layout faster than transposed views, most of all on few rows. `w` comes
    back unchanged where `pack_matrix` declines or oneDNN cannot take the biases, so callers can always pack.
    """
    if not onednn_ok(w["w_out"], *w.values()):  # the biases too: checked before any matrix is reordered
        return w
    mats = {k: pack_matrix(v) for k, v in w.items() if k.startswith("w_")}
    return w if any(m is None for m in mats.values()) else {**w, **mats}


def _linear_act(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None, act=None) -> torch.Tensor:
    """act(x @ w + b) for x (n, in) and w_t the [out, in] matrix (view or packed) through oneDNN."""
    post = _POST_OPS.get(act) if act is not None else ("none", "")
    if post is None:
        return act(_LINEAR_POINTWISE(x, w_t, b, "none", [], ""))
    return _LINEAR_POINTWISE(x, w_t, b, post[0], [], post[1])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)` for x (n, in) and w [out, in], plain or packed (`pack_matrix`).

    Through oneDNN for packed weights, and for CPU inference from `LINEAR_ONEDNN_MIN_ROWS` rows or, for
    fewer rows, when w is a contiguous [out, in] matrix of `PACK_MIN_BYTES` or more (a tied LM head),
    where its kernel beats MKL's. Packed fp32 or bf16 weights on few rows (`_native_rows`) go through the
    native kernel, and so do large plain ones on up to 8 rows (`_rowmajor_ok`: the LM head).
    """
    w_address = address(w) if w.is_mkldnn else None
    if (w_address is not None and _native_ok(x, w.dtype, w.shape[1], None, w.shape[0])
            and (b is None or _native_bias(b, w.shape[0], w.dtype))):
        x, y = x.contiguous(), x.new_empty(x.shape[0], w.shape[0])
        packed_matmul([Job(x.shape[0], x.data_ptr(), w_address, 0 if b is None else b.data_ptr(), y.data_ptr())],
                      *w.shape, w.dtype)
        return y
    if _rowmajor_ok(x, w, b):
        return native.rowmajor_matmul(x.contiguous(), w, b)
    rows_ok = x.shape[0] >= LINEAR_ONEDNN_MIN_ROWS or (w.is_contiguous() and _large(w))
    if w.is_mkldnn or (rows_ok and onednn_ok(x, w, b)):
        return _LINEAR_POINTWISE(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _rowmajor_ok(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """The native row-major kernel takes x @ w.T + b: a plain contiguous fp32 or bf16 w (out, in) of at
    least `PACK_MIN_BYTES` (in practice a tied LM head, which is not packed), `in` a multiple of 16, at
    most `native.ROWMAJOR_MAX_ROWS` rows of x on the CPU, x and a contiguous (out,) bias (or none) in w's
    dtype, and no autograd."""
    return (not w.is_mkldnn and w.dim() == 2 and w.dtype in native.LAYOUTS and w.is_contiguous() and _large(w)
            and w.shape[1] % 16 == 0 and _native_input(x, w.dtype) and x.shape[1] == w.shape[1]
            and 1 <= x.shape[0] <= native.ROWMAJOR_MAX_ROWS and x.numel() <= ROWMAJOR_MAX_INPUTS
            and (b is None or _native_bias(b, w.shape[0], w.dtype))
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and native.library() is not None)


def _onednn_ffn(x: torch.Tensor, w_t: dict[str, torch.Tensor], act, out: torch.Tensor | None) -> torch.Tensor:
    """FFN on x (n, d) through oneDNN, w_t's matrices [out, in], in row blocks whose intermediate stays in cache.

    The activation is fused into the first matmul; for the gated kind the product `act(x Wg) * x Wu`
    is fused into the up projection.
    """
    f = w_t["w_out"].shape[1]
    block = max(1, ROW_BLOCK_BYTES // (f * x.element_size()))
    out = x.new_empty(x.shape[0], w_t["w_out"].shape[0]) if out is None else out  # (n, d)
    for s in range(0, x.shape[0], block):
        xb = x[s:s + block]
        if "w_gate" in w_t:
            h = _LINEAR_POINTWISE.binary(xb, _linear_act(xb, w_t["w_gate"], None, act), w_t["w_up"], None, "mul")
        else:
            h = _linear_act(xb, w_t["w_in"], w_t["b_in"], act)  # (rows, f)
        out[s:s + block] = _linear_act(h, w_t["w_out"], w_t.get("b_out"))
    return out


def ffn(x: torch.Tensor, w: dict[str, torch.Tensor], act, out: torch.Tensor | None = None) -> torch.Tensor:
    """One feed-forward network on x (n, d) with weights stored [in, out], or packed by `pack_ffn`.

    Written into `out` (n, d) when given.

    GPT-2 kind (`w_in`, `b_in`, `w_out`, `b_out`): act(x W1 + b1) W2 + b2, as `Conv1D` computes it.
    Gated kind (`w_gate`, `w_up`, `w_out`): (act(x Wg) * x Wu) Wd, as Llama/Mistral/Qwen2 do.
    """
    if is_packed(w):
        d, f = w["w_out"].shape
        pointers = native_pointers(w) if _native_ok(x, w["w_out"].dtype, d, out, d, f, ffn=True) else None
        if pointers is None:
            return _onednn_ffn(x, w, fused_activation(act), out)
        return _native_ffn(x, pointers, f, fused_activation(act), out)
    if x.shape[0] >= ONEDNN_MIN_ROWS and onednn_ok(x, *w.values()):
        w_t = {k: v.t() if k.startswith("w_") else v for k, v in w.items()}  # [out, in] views
        return _onednn_ffn(x, w_t, fused_activation(act), out)
    if "w_gate" in w:
        h = act(x @ w["w_gate"]) * (x @ w["w_up"])  # (n, f)
    else:
        h = act(torch.addmm(w["b_in"], x, w["w_in"]))  # (n, f)
    if "b_out" in w:
        return torch.addmm(w["b_out"], h, w["w_out"], out=out)  # (n, d)
    return torch.mm(h, w["w_out"], out=out)


@dataclass(frozen=True)
class PackedExperts:
    """E experts' weights packed once for CPU inference (`pack_experts`): `weights[e]` is expert e's `pack_ffn`,
    `pointers[e]` its `native_pointers` (None where the native kernel does not apply). Frozen: the
    pointers are the addresses of these very weights."""

    weights: tuple[dict[str, torch.Tensor], ...]
    pointers: tuple[dict[str, int] | None, ...]


def pack_experts(stacked: dict[str, torch.Tensor]) -> PackedExperts | dict[str, torch.Tensor]:
    """Stacked [E, in, out] expert weights packed per expert for oneDNN; `stacked` itself where that does not apply."""
    weights = [pack_ffn({k: v[e] for k, v in stacked.items()}) for e in range(stacked["w_out"].shape[0])]
    if not is_packed(weights[0]):
        return stacked
    return PackedExperts(tuple(weights), tuple(native_pointers(w) for w in weights))


def packed_matrices(w: dict[str, torch.Tensor] | PackedExperts) -> list[torch.Tensor]:
    """The oneDNN-packed matrices of an FFN's weights (`pack_ffn`) or of packed experts."""
    return [m for one in (w.weights if isinstance(w, PackedExperts) else (w,)) for m in one.values()
            if m is not None and m.is_mkldnn]


def back_with_huge_pages(matrices: list[torch.Tensor]) -> int:
    """Put packed matrices on transparent huge pages (`io.collapse_into_huge_pages`); bytes collapsed.

    Call it once everything is packed and the packing's temporaries are freed: trimming freed heap
    memory afterwards (`io.return_freed_memory`) would split huge pages it shares with them.
    """
    if any(getattr(_MKLDNN, op, None) is None for op in ("data_ptr", "_nbytes")):
        return 0
    return collapse_into_huge_pages((_MKLDNN.data_ptr(m), _MKLDNN._nbytes(m)) for m in matrices)


def _expert_loop_nograd(x: torch.Tensor, slices: list[tuple[int, int, int]], weights_of, act,
                        pointers: tuple[dict[str, int] | None, ...] | None = None,
                        also: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Inference loop: each expert's whole FFN (`ffn`) on its slice, written into one (N, d) buffer.

    `weights_of(e)` gives expert e's weights (packed, or [in, out] views of the stacked tensors).
    Running both matmuls of one expert back to back keeps its (n, f) intermediate in cache. With
    `pointers` (packed experts), the slices the native kernel takes (`_native_rows`) go through it in
    batches (`_native_batches`), each batch's first matmuls in one call and its second in another
    (decode: every hit expert in one batch; prefill: E=128's 32-row experts 16 at a time, E=8's in row
    blocks). `also` = (rows, FFN weights, output), another FFN of the same shapes (the residual branch),
    joins them after the experts when it qualifies too (decode: one stream over all the weights).
    """
    x = x.contiguous()
    out = torch.empty_like(x)  # (N, d)
    native = pointers is not None and _native_input(x, x.dtype)
    x_at, out_at, row = x.data_ptr(), out.data_ptr(), x.shape[1] * x.element_size()
    parts, shape = [], None  # (rows, x address, output address, pointers) for the native kernel; experts' w_out shape
    for e, s, t in slices:
        w = weights_of(e)
        d, f = w["w_out"].shape
        if not (native and pointers[e] is not None and w["w_out"].dtype == x.dtype and d == x.shape[1]
                and _native_rows(t - s, x.dtype, d, f, ffn=True)):
            ffn(x[s:t], w, act, out[s:t])
            continue
        parts.append((t - s, x_at + s * row, out_at + s * row, pointers[e]))
        shape = (d, f)
    if also is not None:
        rows, weights, dense = also
        rows = rows.contiguous()  # alive until the native calls below
        same = (parts and weights.keys() == weights_of(slices[0][0]).keys() and tuple(weights["w_out"].shape) == shape
                and weights["w_out"].dtype == x.dtype)  # the experts' shapes and dtype: joins their calls
        fits = same and _native_ok(rows, x.dtype, shape[0], dense, shape[0], shape[1], ffn=True)
        also_pointers = native_pointers(weights) if fits else None
        if also_pointers is None:
            ffn(rows, weights, act, dense)
        else:
            parts.append((rows.shape[0], rows.data_ptr(), dense.data_ptr(), also_pointers))
    for batch in _native_batches(parts, *shape, x.element_size()) if parts else ():
        _native_ffns(batch, *shape, act, x.dtype)
    return out


def _loop_nograd(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor], act) -> torch.Tensor:
    """The "loop" backend without autograd (`routing.register_no_grad`): `_expert_loop_nograd` on [in, out]
    views of the stacked weights."""
    return _expert_loop_nograd(x_sorted, expert_slices(counts), lambda e: {k: v[e] for k, v in stacked.items()}, act)


register_no_grad("loop", _loop_nograd)
register_no_grad("linear", linear)


def expert_ffn(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor] | PackedExperts,
               act, backend: str | None = None,
               also: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`routing.expert_ffn`, which also takes `PackedExperts`: each expert's whole FFN in turn
    (`_expert_loop_nograd`), with `also`, another FFN run with them."""
    if isinstance(stacked, PackedExperts):
        return _expert_loop_nograd(x_sorted, expert_slices(counts), stacked.weights.__getitem__, fused_activation(act),
                                   stacked.pointers, also)
    return routing.expert_ffn(x_sorted, counts, stacked, act, backend)


def moe_forward(x: torch.Tensor, router_weight: torch.Tensor, stacked: dict | PackedExperts, act, top_k=1,
                capacity_factor=None, min_capacity=4, dropout: float = 0.0, training: bool = False,
                residual: tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]] | None = None,
                backend: str | None = None, exchange=None) -> tuple[torch.Tensor, routing.Routing]:
    """`routing.moe_forward` on weights as the runtime holds them: x (T, d) -> (T, d).

    `stacked`: [E, in, out] tensors or `PackedExperts`. `residual = (coef (T, 2), dense)` mixes in the
    residual branch: dense is its FFN's output (T, d), or that FFN's weights (`pack_ffn`), run here with
    `act`, with packed experts in the same native calls as theirs (decode: one stream over the
    residual's and the hit experts' weights). `exchange` (expert parallelism,
    `expert_parallel.ExpertParallel.exchange`): `stacked` holds this rank's experts only, and the
    expert-sorted rows travel to their experts' ranks and back.
    """
    also = None  # the residual FFN, run with the experts
    overwrite = False  # combine may scale y and dense in place: both made here, no autograd
    if residual is not None and isinstance(residual[1], dict):
        overwrite = not torch.is_grad_enabled()
        weights, dense = residual[1], torch.empty_like(x)  # (T, d), filled below or with the experts
        if exchange is None and isinstance(stacked, PackedExperts):
            also = (x, weights, dense)
        else:
            ffn(x, weights, act, dense)
        residual = (residual[0], dense)

    def run(rows, counts):
        return expert_ffn(rows, counts, stacked, act, backend, also)

    def experts(rows, counts):
        return run(rows, counts) if exchange is None else exchange(rows, counts, run)
    return routing.moe_forward(x, router_weight, experts, top_k, capacity_factor, min_capacity, dropout, training,
                               residual, overwrite)

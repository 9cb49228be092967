"""A native kernel for matmuls on oneDNN-packed fp32 and bf16 weights: decode's expert and residual FFNs,
packed projections of up to ~100 rows, and prefill's FFNs (experts and residual) in batches of row
blocks, the activation applied as the outputs are stored (bf16 beyond decode's 8 rows only with the
CPU's bf16 dot product: `bf16_dot`).

With one token per expert, the layer's cost is reading each hit expert's weights from DRAM. oneDNN
streams its own packed weights at ~40 GB/s for one row; a plain loop over the same bytes, in the
order they lie in memory, at ~60 GB/s, the rate of torch's own `sum` over them (docs/kernels.md,
"packed_matmul.c"). `csrc/packed_matmul.c` is that loop. With more rows it reads each panel again
per 6 rows and meanwhile fetches the next panel, which oneDNN's kernel reads cold. A call's jobs
(e.g. the first matmuls of a batch of experts with 12 to 57 rows each) are cut into shares of equal
estimated cost, one per thread. It reads the packed weights in place (no second copy). The same
library holds `csrc/moe_decode.c`, a PR-MoE layer's decode step around those matmuls (`decode.py`),
`csrc/rowmajor_matmul.c`, a few rows through a large plain row-major matrix (decode's tied LM
head, which is not packed), and `csrc/decode_step.c`, a decode step's residual add + norm and its
attention (rotary, KV-cache write, grouped-query heads in place) in one call each.

The library is compiled once per machine and source with the system C compiler (`-O3 -march=native
-fopenmp`) into `$MOE_CONVERT_CACHE/native` (`io.cache_root`), then loaded with ctypes. It runs on torch's OpenMP threads: it links
`libgomp.so.1`, the soname of the runtime this torch build loaded, so the loader hands it torch's
copy. Nothing here is required: without a compiler, with another OpenMP runtime (or none), with
`MOE_CONVERT_NATIVE=0`, or where oneDNN packs another layout, `library()` or `address` says no
and callers keep oneDNN (`why_unavailable()` tells why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..io import cache_root

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("packed_matmul.c", "moe_decode.c", "rowmajor_matmul.c", "decode_step.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
# Extra compiler flags after FLAGS, e.g. "-mno-avx512bf16" or "-march=x86-64-v3" (AVX2): a build for a
# narrower CPU than this one, to test the paths such CPUs take. Part of the build's cache key.
EXTRA_FLAGS_VAR = "MOE_CONVERT_NATIVE_FLAGS"
MC_OK = 0  # the C entry points' status: 0 ran, else refused their arguments (csrc/packed_matmul.h)
BLOCK = 64  # outputs per block of oneDNN's packed layouts
# The packed layouts the kernel reads, by dtype: [ceil(out / 64)][in / n][64][n], n inputs side by side per
# output (fp32: [..][in][64]; bf16: pairs, as oneDNN's bf16 dot-product instructions take them).
LAYOUTS = {torch.float32: 1, torch.bfloat16: 2}
ROWMAJOR_MAX_ROWS = 8  # rows x of `rowmajor_matmul` may have (csrc/rowmajor_matmul.c)
_reason = ""  # why `library()` is None
_lock = threading.Lock()  # one build and load per process
_layout: dict[tuple[int, int, torch.dtype], bool] = {}  # (out, in, dtype) -> a probe was packed as LAYOUTS says
_address = WeakIdKeyDictionary()  # packed tensor `register` accepted -> the address of its bytes
_registered: dict[int, tuple[int, int, torch.dtype]] = {}  # those addresses -> (out, in, dtype), while alive


# Activations the kernel applies as it stores a job's outputs (csrc/vectors.h `activate16`), by code.
ACT_NONE, ACT_GELU_TANH, ACT_SILU, ACT_RELU = range(4)


class Job(ctypes.Structure):
    """One matmul: y (rows, out) = act(x (rows, in) @ w^T + bias); x, y contiguous, bias 0 or (out,); all of w's
    dtype; act an `ACT_*` code (default none)."""

    _fields_ = [("rows", ctypes.c_int64), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p), ("act", ctypes.c_int64)]


def why_unavailable() -> str:
    """Why the native kernel is off ('' when it is on)."""
    library()
    return _reason


def _cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


@functools.cache
def cpuinfo(field: str) -> list[str]:
    """Every value of a /proc/cpuinfo field (one per CPU), e.g. "model name" or "flags"; [] without the file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [value.strip() for key, _, value in (ln.partition(":") for ln in lines) if key.strip() == field]


def _cpu_identity() -> str:
    """What `-march=native` compiles for: a library built on another CPU may not run here."""
    seen = sorted({*cpuinfo("model name"), *cpuinfo("flags")})
    return "\n".join(seen) if seen else platform.processor()


def cpu_model() -> str:
    """The CPU's model name, as benchmark tables and `moe-convert doctor` print it."""
    return (cpuinfo("model name") or [platform.processor() or platform.machine()])[0]


def _torch_uses_libgomp() -> bool:
    """torch runs on OpenMP from one mapped file named libgomp.so.1: the soname our library links, so the
    loader hands it that copy and its threads are torch's. (Some wheels ship a renamed copy,
    libgomp-<hash>.so.1; linking would then load the system's as a second runtime.)"""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    files = {line.split()[-1] for line in maps if "libgomp" in line}
    return len(files) == 1 and Path(next(iter(files))).name == "libgomp.so.1"


def extra_flags() -> list[str]:
    """`$MOE_CONVERT_NATIVE_FLAGS`, split."""
    return os.environ.get(EXTRA_FLAGS_VAR, "").split()


def flags() -> list[str]:
    """The compiler flags of this process's build: `FLAGS`, then `extra_flags()`."""
    return [*FLAGS, *extra_flags()]


def _build(cc: str) -> Path:
    """The compiled library in the cache, built (atomically) when missing. Raises OSError on failure."""
    texts = [p.read_text() for p in [*SOURCES, *sorted(CSRC.glob("*.h"))]]  # what the build reads
    key = hashlib.sha256("\0".join([*texts, cc, *flags(), _cpu_identity()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"packed_matmul-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags(), *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise OSError(f"{Path(cc).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (`why_unavailable()` says why)."""
    with _lock:
        return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    global _reason
    cc = _compiler()
    if os.environ.get("MOE_CONVERT_NATIVE", "1") == "0":
        _reason = "MOE_CONVERT_NATIVE=0"
    elif not sys.platform.startswith("linux") or not _torch_uses_libgomp():
        _reason = "needs Linux and a torch built with GNU OpenMP"
    elif any(getattr(torch.ops.mkldnn, op, None) is None for op in ("data_ptr", "_nbytes")):
        _reason = "this torch cannot give the address of oneDNN-packed weights"
    elif cc is None:
        _reason = "no C compiler (set CC)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, subprocess.SubprocessError) as e:
            _reason = f"could not build the native kernel: {e}"
            return None
        lib.mc_packed_matmul.argtypes = [ctypes.c_int64, ctypes.POINTER(Job), ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_int, ctypes.c_int]
        lib.mc_packed_matmul.restype = ctypes.c_int
        lib.mc_bf16_dot.argtypes, lib.mc_bf16_dot.restype = [], ctypes.c_int
        for phase in (lib.mc_moe_decode_first, lib.mc_moe_decode_second):  # (address of a decode.State, threads)
            phase.argtypes, phase.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
        lib.mc_rowmajor_matmul.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_int, ctypes.c_int]
        lib.mc_rowmajor_matmul.restype = ctypes.c_int
        lib.mc_residual_norm.argtypes = [ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 5, ctypes.c_int,
                                         ctypes.c_float, ctypes.c_int]
        lib.mc_attend_one.argtypes = [*[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 3,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                      ctypes.c_void_p, ctypes.c_int]
        for entry in (lib.mc_residual_norm, lib.mc_attend_one):
            entry.restype = ctypes.c_int
        return lib
    return None


@functools.cache  # asked on the dispatch path: the build's answer, once
def bf16_dot() -> bool:
    """The kernel multiplies bf16 with the CPU's bf16 dot product (built where the compiler targets
    AVX512-BF16): as fast as oneDNN's bf16 kernels at every row count measured. Without it bf16 is widened
    to fp32 multiply-adds, half that rate (`kernels._native_rows` then keeps bf16 to decode's few rows)."""
    return library() is not None and bool(library().mc_bf16_dot())


def _data_ptr(packed: torch.Tensor) -> int:
    """Address of a oneDNN-packed tensor's bytes (a torch op call: `address` keeps it for registered ones)."""
    return torch.ops.mkldnn.data_ptr(packed)


def register(packed: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Let the kernel read `packed`, an fp32 or bf16 [out, in] matrix that `pack` made, if that is safe; True
    if so.

    oneDNN picks the packed layout by shape, dtype, CPU and packing hint, so the first time a shape and
    dtype come, a probe matrix of distinct values is packed by the same `pack` and every entry compared
    with where the kernel would read it. Only tensors registered here go through the kernel (`address`).
    """
    out, inp = packed.shape
    if (library() is None or packed.dtype not in LAYOUTS
            or torch.ops.mkldnn._nbytes(packed) != _padded(out, inp) * packed.element_size()):
        return False
    key = (out, inp, packed.dtype)
    if key not in _layout:
        probe = torch.randn(out, inp, generator=torch.Generator().manual_seed(0)).to(packed.dtype)
        _layout[key] = _same_layout(pack(probe), probe)
    if _layout[key]:
        at = _address[packed] = _data_ptr(packed)
        _registered[at] = key
        weakref.finalize(packed, _registered.pop, at, None)  # freed bytes are no longer the kernel's to read
    return _layout[key]


def address(packed: torch.Tensor) -> int | None:
    """Where the bytes of `packed` lie, if `register` accepted it (the kernel may read it); else None."""
    return _address.get(packed)


def _padded(out: int, inp: int) -> int:
    return -(-out // BLOCK) * BLOCK * inp


def _same_layout(packed: torch.Tensor, w: torch.Tensor) -> bool:
    """Every entry of w [out, in] lies in `packed` where `LAYOUTS` says for its dtype (the last block's
    padding aside)."""
    out, inp = w.shape
    pairs = LAYOUTS[w.dtype]  # inputs side by side per output
    if torch.ops.mkldnn._nbytes(packed) != _padded(out, inp) * w.element_size() or inp % pairs:
        return False
    blocks = -(-out // BLOCK)
    raw = torch.frombuffer((ctypes.c_char * (_padded(out, inp) * w.element_size())).from_address(_data_ptr(packed)),
                           dtype=w.dtype).view(blocks, inp // pairs, BLOCK, pairs)
    expected = torch.zeros(blocks * BLOCK, inp, dtype=w.dtype)
    expected[:out] = w
    expected = expected.view(blocks, BLOCK, inp // pairs, pairs).transpose(1, 2)  # (blocks, in / pairs, 64, pairs)
    real = (torch.arange(blocks * BLOCK) < out).view(blocks, 1, BLOCK, 1).expand_as(raw)
    return torch.equal(raw[real], expected[real])


def check(status: int, entry: str) -> None:
    """Raise where a C entry point refused its arguments (it checks them too, and reads nothing then)."""
    if status != MC_OK:
        raise ValueError(f"native kernel: {entry} refused its arguments")


def packed_matmul(jobs: list[Job], out: int, inp: int, dtype: torch.dtype = torch.float32) -> None:
    """Run every job (same `out`, `inp` and dtype, fp32 or bf16, weights with an `address`) in one call on
    torch's threads (as many as `torch.get_num_threads()`).

    Every job is checked before the call: at least one row, x and y given, and w a matrix `register`
    accepted for this (out, in, dtype) and still alive. Anything else raises ValueError; the kernel
    never sees an address it was not given.
    """
    key = (out, inp, dtype)
    for job in jobs:
        if job.rows < 1 or not job.x or not job.y or _registered.get(job.w) != key:
            raise ValueError(f"native kernel: a job of {job.rows} rows with w at {job.w} is not a registered "
                             f"{out} x {inp} {dtype} matrix (only `register`ed matrices reach the kernel)")
    check(library().mc_packed_matmul(len(jobs), (Job * len(jobs))(*jobs), out, inp, dtype == torch.bfloat16,
                                     torch.get_num_threads()), "mc_packed_matmul")


def rowmajor_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (T, in) @ w.T + b for a plain row-major w (out, in) in fp32 or bf16, with x and b in w's dtype,
    1 <= T <= `ROWMAJOR_MAX_ROWS`, `in` a multiple of 16, w and b contiguous on CPU (`kernels.linear`
    routes only such calls here; others raise ValueError); on torch's threads. The sums are fp32; a bf16
    result is rounded once, as oneDNN's."""
    fits = (w.dim() == 2 and not w.is_mkldnn and w.device.type == "cpu" and w.dtype in LAYOUTS and w.is_contiguous()
            and w.shape[1] % 16 == 0 and x.dim() == 2 and x.dtype == w.dtype and x.device.type == "cpu"
            and x.shape[1] == w.shape[1] and 1 <= x.shape[0] <= ROWMAJOR_MAX_ROWS
            and (b is None or (b.dtype == w.dtype and b.is_contiguous() and tuple(b.shape) == (w.shape[0],))))
    if not fits:
        raise ValueError(f"native kernel: rowmajor_matmul does not take x {tuple(x.shape)} {x.dtype} with w "
                         f"{tuple(w.shape)} {w.dtype}")
    y = w.new_empty(x.shape[0], w.shape[0])
    x32 = x.float().contiguous()  # (T, in): bf16 rows widened (exact)
    check(library().mc_rowmajor_matmul(x.shape[0], x32.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(),
                                       y.data_ptr(), *w.shape, w.dtype == torch.bfloat16, torch.get_num_threads()),
          "mc_rowmajor_matmul")
    return y


def _rows(*tensors: torch.Tensor | None) -> bool:
    """Plain contiguous CPU tensors of one dtype the decode-step kernels read (fp32 or bf16); None skipped."""
    given = [t for t in tensors if t is not None]
    return all(not t.is_mkldnn and t.device.type == "cpu" and t.is_contiguous() and t.dtype == given[0].dtype
               for t in given) and given[0].dtype in LAYOUTS


def residual_norm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None, rms: bool,
                  eps: float) -> torch.Tensor | None:
    """x (T, d) += delta in place (when given), then the norm of x times w (+ b) -> (T, d): RMS (`rms`, as Llama's
    RMSNorm) or LayerNorm; one native call. None where it does not apply (no library, other dtypes or layouts,
    autograd): the caller runs torch's ops."""
    if (library() is None or x.dim() != 2 or not _rows(x, delta, w, b) or tuple(w.shape) != (x.shape[1],)
            or (delta is not None and delta.shape != x.shape) or (b is not None and b.shape != w.shape)
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    h = torch.empty_like(x)
    check(library().mc_residual_norm(x.shape[0], x.shape[1], x.data_ptr(), delta.data_ptr() if delta is not None else 0,
                                     w.data_ptr(), b.data_ptr() if b is not None else 0, h.data_ptr(), rms, eps,
                                     x.dtype == torch.bfloat16), "mc_residual_norm")
    return h


def attend_one(qkv: torch.Tensor, heads: int, rope: tuple[torch.Tensor, torch.Tensor] | None, pos: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, start: torch.Tensor, window: int | None,
               scale: float) -> torch.Tensor | None:
    """One new token's attention per sequence (`csrc/decode_step.c`): qkv (B, (H + 2 H_kv) hd) its q, k, v heads;
    rope = (cos, sin) fp32 tables (positions, hd) or None; pos (B,) int64 its positions; k_cache, v_cache (B,
    H_kv, capacity, hd) fp32, written at `slot`; start (B,) int64 each sequence's first cache slot; keys within
    `window` (None: all) -> (B, H hd) in qkv's dtype. None where it does not apply: the caller runs torch's;
    the kernel refuses positions past the tables and starts past `slot` (ValueError)."""
    B, width = qkv.shape
    _, kv_heads, capacity, hd = k_cache.shape
    if (library() is None or not _rows(qkv) or not _rows(k_cache, v_cache) or k_cache.dtype != torch.float32
            or v_cache.shape != k_cache.shape or k_cache.shape[0] != B or width != (heads + 2 * kv_heads) * hd
            or heads % kv_heads or not 0 <= slot < capacity
            or any(t.dtype != torch.int64 or not t.is_contiguous() or t.shape != (B,) for t in (pos, start))
            or (rope is not None and not (_rows(*rope) and rope[0].dtype == torch.float32
                                          and rope[0].shape == rope[1].shape and rope[0].shape[1] == hd))):
        return None
    out = qkv.new_empty(B, heads * hd)
    cos, sin, positions = (0, 0, 0) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr(), rope[0].shape[0])
    check(library().mc_attend_one(B, heads, kv_heads, hd, qkv.data_ptr(), qkv.dtype == torch.bfloat16, cos, sin,
                                  positions, pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), capacity, slot,
                                  start.data_ptr(), window or 0, scale, out.data_ptr(), torch.get_num_threads()),
          "mc_attend_one")
    return out

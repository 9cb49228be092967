"""A native kernel for few-row matmuls on oneDNN-packed fp32 weights: decode's expert FFNs and LM head.

With one token per expert, the layer's cost is reading each hit expert's weights from DRAM. oneDNN
streams its own packed weights at ~40 GB/s for one row; a plain loop over the same bytes, in the
order they lie in memory, at ~60 GB/s, the rate of torch's own `sum` over them (README, "Decode
kernel"). `csrc/packed_matmul.c` is that loop. It reads the packed weights in place (no second copy).

The library is compiled once per machine and source with the system C compiler (`-O3 -march=native
-fopenmp`) into the user cache, then loaded with ctypes. It runs on torch's OpenMP threads: it links
`libgomp.so.1`, the soname of the runtime this torch build loaded, so the loader hands it torch's
copy. Nothing here is required: without a compiler, with another OpenMP runtime (or none), with
`MOE_CONVERT_NATIVE=0`, or where oneDNN packs another layout, `library()` or `layout_ok` says no
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
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "packed_matmul.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
BLOCK = 64  # outputs per block of oneDNN's packed fp32 layout: [ceil(out / 64)][in][64]
LAYOUT_SAMPLES = 4096  # entries of each packed matrix checked against its source at pack time
_reason = ""  # why `library()` is None
_layout: dict[tuple[int, int], bool] = {}  # (out, in) -> oneDNN packs that shape as BLOCK expects


class Job(ctypes.Structure):
    """One matmul: y (rows, out) = x (rows, in) @ w^T + bias; x, y contiguous fp32, bias 0 or (out,)."""

    _fields_ = [("rows", ctypes.c_int64), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("y", ctypes.c_void_p)]


def why_unavailable() -> str:
    """Why the native kernel is off ('' when it is on)."""
    library()
    return _reason


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-convert" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc)


def _cpu_identity() -> str:
    """What `-march=native` compiles for: a library built on another CPU may not run here."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _torch_uses_libgomp() -> bool:
    """torch runs on OpenMP and has libgomp.so.1 mapped: the library then shares torch's thread pool."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _build(cc: str) -> Path:
    """The compiled library in the cache, built (atomically) when missing. Raises OSError on failure."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_identity()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"packed_matmul-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{Path(cc).name} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, path)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (`why_unavailable()` says why)."""
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
        lib.mc_packed_matmul.argtypes = [ctypes.c_int64, ctypes.POINTER(Job), ctypes.c_int64, ctypes.c_int64]
        lib.mc_packed_matmul.restype = None
        return lib
    return None


def packed_ptr(packed: torch.Tensor) -> int:
    """Address of a oneDNN-packed tensor's bytes."""
    return torch.ops.mkldnn.data_ptr(packed)


def check_layout(packed: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `packed` (oneDNN's fp32 packing of w, [out, in]) lies as the kernel reads it; remembered by shape.

    oneDNN picks the packed layout by shape (and CPU), so the first matrix of each shape decides for
    all: its size and `LAYOUT_SAMPLES` entries (the first and last too) must match w.
    """
    shape = tuple(w.shape)
    if shape not in _layout:
        _layout[shape] = library() is not None and w.dtype == torch.float32 and _same_layout(packed, w)
    return _layout[shape]


def _same_layout(packed: torch.Tensor, w: torch.Tensor) -> bool:
    out, inp = w.shape
    padded = -(-out // BLOCK) * BLOCK * inp
    if torch.ops.mkldnn._nbytes(packed) != padded * 4:
        return False
    raw = torch.frombuffer((ctypes.c_float * padded).from_address(packed_ptr(packed)), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    flat = torch.cat([torch.tensor([0, w.numel() - 1]), torch.randint(w.numel(), (LAYOUT_SAMPLES,), generator=g)])
    o, i = flat // inp, flat % inp
    return torch.equal(raw[(o // BLOCK * inp + i) * BLOCK + o % BLOCK], w.reshape(-1)[flat])


def layout_ok(out: int, inp: int) -> bool:
    """A packed fp32 [out, in] matrix can go through the kernel (`check_layout` passed for its shape)."""
    return _layout.get((out, inp), False)


def packed_matmul(jobs: list[Job], out: int, inp: int) -> None:
    """Run every job (same `out`, `inp`) in one call on torch's threads; the caller checked `layout_ok`."""
    library().mc_packed_matmul(len(jobs), (Job * len(jobs))(*jobs), out, inp)

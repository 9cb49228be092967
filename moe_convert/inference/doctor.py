"""What the inference kernels do on this machine (`moe-convert doctor`): the CPU features they depend on,
which kernel path is on for each dtype and why the others are off, and the measured GEMM rate and memory
bandwidth that `bench layer` takes its floor from.

The rules are derived from what the machine has, not timed at first use: the native kernel runs where
it could be built (compiler, GNU OpenMP, `MOE_CONVERT_NATIVE`) and where `native.register`'s probe finds
that oneDNN packs weights in the layout it reads (on AMX CPUs oneDNN packs bf16 for its tile
instructions, the probe refuses, and bf16 stays on oneDNN, which then runs on AMX); bf16 beyond decode's
few rows needs the bf16 dot product in the build (`native.bf16_dot`). One choice is timed instead,
because it went one way on AMD and the other on Intel: FFNs of many rows through the native kernel or
through oneDNN (`kernels.prefill_timing`, once per machine and build, cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels, native

FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
PROBE_SHAPE = (2048, 512)  # (out, in) of the matrix whose packed layout is probed: an E=8 d=512 expert's first matmul


@dataclass
class KernelPath:
    """One way a dtype's matmuls can run here: on or off, and why."""

    dtype: str
    path: str
    on: bool
    why: str


@dataclass
class Report:
    cpu: str
    features: dict[str, bool]  # FEATURES from the CPU's flags; "amx usable": oneDNN may use AMX (OS-enabled)
    torch: str
    threads: int
    native: str  # "on (flags)" or why it is off
    paths: list[KernelPath] = field(default_factory=list)
    gemm_gflops: dict[str, float] = field(default_factory=dict)  # per dtype: the best measured matmul rate
    bandwidth_gbs: float | None = None  # memory read bandwidth


def cpu_features() -> dict[str, bool]:
    flags = {w for line in native.cpuinfo("flags") for w in line.split()}
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return {**{f: f in flags for f in FEATURES}, "amx usable": bool(amx and amx())}


def _layout_accepted(dtype: torch.dtype) -> bool:
    """oneDNN packs a `PROBE_SHAPE` matrix of `dtype` where the native kernel reads it."""
    packed = kernels._pack(torch.zeros(*PROBE_SHAPE, dtype=dtype)) if kernels._REORDER_WEIGHT else None
    return packed is not None and native.register(packed, kernels._pack)


def kernel_paths() -> list[KernelPath]:
    """Every dtype's kernel paths on this machine, each on or off with the reason."""
    off = native.why_unavailable()
    paths = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        onednn = kernels.onednn_ok(torch.zeros(1, 1, dtype=dtype)) and kernels._REORDER_WEIGHT is not None
        paths.append(KernelPath(name, "oneDNN, packed weights", onednn,
                                "" if onednn else "no oneDNN linear in this torch"))
        layout = not off and _layout_accepted(dtype)
        why = off or ("" if layout else f"oneDNN packs {name} another way here"
                      f"{' (AMX)' if cpu_features()['amx usable'] else ''}")
        paths.append(KernelPath(name, "native: decode, <= 8 rows", layout, why))
        prefill, prefill_why = layout, why
        if layout and dtype == torch.bfloat16 and not native.bf16_dot():
            prefill, prefill_why = False, "no bf16 dot product in this build"
        elif layout:
            timing = kernels.prefill_timing(dtype)
            prefill = timing["native"]
            if not prefill and "native_ms" in timing:
                prefill_why = f"oneDNN faster here: {timing['onednn_ms']:.1f} vs {timing['native_ms']:.1f} ms"
        paths.append(KernelPath(name, "native: FFNs > 96 rows", prefill, prefill_why))
        paths.append(KernelPath(name, "native: LM head, <= 8 rows", not off, off))
    fp16 = kernels.native_fp16_matmul()
    paths.append(KernelPath("fp16", "oneDNN fp16 matmul", fp16,
                            "" if fp16 else "not on this CPU: fp16 exports compute in fp32"))
    return paths


def diagnose(measure: bool = True) -> Report:
    """The machine report; `measure` adds the GEMM rates (fp32, bf16) and the bandwidth (a few seconds)."""
    off = native.why_unavailable()
    built = " ".join(["-march=native", *native.extra_flags()]) + (", bf16 dot product" if native.bf16_dot() else "")
    report = Report(native.cpu_model(), cpu_features(), torch.__version__, torch.get_num_threads(),
                    f"off: {off}" if off else f"on ({built})", kernel_paths())
    if measure:
        from .bench import EVICT_BYTES, measure_machine

        big = torch.ones(EVICT_BYTES // 4)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            m = measure_machine(1024, dtype, big)
            report.gemm_gflops[name] = m.gemm_gflops
            report.bandwidth_gbs = max(report.bandwidth_gbs or 0.0, m.bandwidth_gbs)
    return report

"""`moe-convert doctor`: the machine's kernel paths, each on or off with the reason, as the kernels decide them."""

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from moe_convert.inference import native
from moe_convert.cli import app
from moe_convert.inference.doctor import diagnose


def paths_of(report) -> dict[tuple[str, str], dict]:
    return {(p["dtype"], p["path"]): p for p in report["paths"]}


def test_the_report_says_what_the_kernels_do_here():
    result = CliRunner().invoke(app, ["doctor", "--no-measure", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cpu"] == native.cpu_model() and report["gemm_gflops"] == {}
    assert report["native"].startswith("on" if native.library() is not None else "off")
    for (dtype, path), p in paths_of(report).items():
        assert p["on"] == (p["why"] == ""), p  # every path that is off says why
    fp32 = paths_of(report)[("fp32", "native: decode, <= 8 rows")]
    assert fp32["on"] == (native.library() is not None)


def test_a_refused_layout_turns_the_native_paths_of_that_dtype_off(monkeypatch):
    monkeypatch.setattr(native, "_same_layout", lambda packed, w: False)
    monkeypatch.setattr(native, "_layout", {})
    report = diagnose(measure=False)
    native_paths = [p for p in report.paths if p.path.startswith("native: decode")]
    assert native_paths and not any(p.on for p in native_paths)
    assert all("another way" in p.why or p.why == native.why_unavailable() for p in native_paths)


def test_measured_rates_and_the_kernel_switched_off():
    """In a process with MOE_CONVERT_NATIVE=0: every native path off for that reason; the rates measured."""
    env = {**os.environ, "MOE_CONVERT_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-m", "moe_convert", "doctor", "--json", "--threads", "1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["native"] == "off: MOE_CONVERT_NATIVE=0"
    for (dtype, path), p in paths_of(report).items():
        assert not path.startswith("native") or (not p["on"] and p["why"] == "MOE_CONVERT_NATIVE=0")
    assert set(report["gemm_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in report["gemm_gflops"].values())
    assert report["bandwidth_gbs"] > 0 and report["threads"] == 1

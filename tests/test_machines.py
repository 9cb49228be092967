"""The kernel tests on the builds other CPUs get: native kernels off, a build without the bf16 dot product
(AVX512-BF16), and an AVX2-only build (x86-64-v3). Each runs the kernel-facing test files in a fresh
pytest process with its own build cache, so whatever CPU CI lands on, the paths narrower CPUs take are
tested too."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from moe_convert.inference import native

FILES = ["tests/test_native.py", "tests/test_decode.py", "tests/test_runtime.py", "tests/test_bench.py"]
BUILDS = {
    "native-off": {"MOE_CONVERT_NATIVE": "0"},
    "no-bf16-dot": {native.EXTRA_FLAGS_VAR: "-mno-avx512bf16"},
    "avx2": {native.EXTRA_FLAGS_VAR: "-march=x86-64-v3"},
}


@pytest.mark.slow
@pytest.mark.parametrize("build", BUILDS)
def test_the_kernel_tests_pass_on_narrower_builds(build, tmp_path):
    if build != "native-off" and native.library() is None:
        pytest.skip(f"native kernel off: {native.why_unavailable()}")
    env = {**os.environ, "MOE_CONVERT_CACHE": str(tmp_path), **BUILDS[build]}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

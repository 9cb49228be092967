"""Peak RSS and wall time of `upcycle`: a GPT-2-XL-sized model next to safetensors' own write speed, and
peak RSS against depth (12 vs 48 layers of the same width).

    python benchmarks/upcycle_memory.py [WORKDIR]     # default /tmp/upcycle-bench; needs ~50 GB of disk

1. A random-weight GPT-2 of GPT-2-XL's size (48 layers, 1600 wide, 1.56 B parameters, fp32, 4 shards)
   upcycled to `--pyramid 32,128 --dtype bf16` (`--init preserve`: routers calibrated block by block)
   in a child process (so its peak RSS is its own); then `safetensors.torch.save_file` writes the same
   number of bytes (in 1 GB files). Each output is deleted right after it is measured.
2. Random GPT-2s 1024 wide, 12 and 48 layers, upcycled to `--pyramid 2,4 --dtype bf16` with the fidelity
   check on: peak RSS should not grow with depth (one decoder block is held at a time).
"""

import gc
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

CHILD = """
import json, resource, sys, time
from moe_convert.convert.upcycle import upcycle
t = time.perf_counter()
s = upcycle(sys.argv[1], sys.argv[2], pyramid=sys.argv[3], dtype="bf16", init="preserve",
            fidelity=sys.argv[4] == "fidelity", overwrite=True)
# VmHWM, not ru_maxrss: the latter keeps the parent's RSS at fork time across exec
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak,
                  "bytes": s.size_on_disk, "total_params": s.total_params, "shards": s.shards,
                  "max_abs_logit_diff": s.max_abs_logit_diff}))
"""


def dense_gpt2(path: Path, n_layer: int, n_embd: int, n_head: int, shard: str) -> int:
    """A random GPT-2 saved as `path` (built once); its weight bytes."""
    if not path.exists():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head))
        model.save_pretrained(path, max_shard_size=shard)
        del model
        gc.collect()
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def upcycle_child(dense: Path, out: Path, pyramid: str, fidelity: bool) -> dict:
    """`upcycle` in a fresh process: its summary numbers, wall time and peak RSS; the output is deleted."""
    r = subprocess.run([sys.executable, "-c", CHILD, str(dense), str(out), pyramid,
                        "fidelity" if fidelity else "no-fidelity"], capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def safetensors_write_seconds(work: Path, nbytes: int) -> float:
    """`save_file` writing `nbytes` of bf16 tensors as 1 GiB files (deleted after)."""
    ref = work / "safetensors-ref"
    ref.mkdir(exist_ok=True)
    full, tail = divmod(nbytes // 2, 2**29)  # bf16 elements: whole 1 GiB files, then the rest
    tensors = [torch.zeros(2**29, dtype=torch.bfloat16)] * full + [torch.zeros(tail, dtype=torch.bfloat16)]
    t = time.perf_counter()
    for i, x in enumerate(tensors):
        save_file({"x": x}, str(ref / f"{i}.safetensors"))
    seconds = time.perf_counter() - t
    shutil.rmtree(ref)
    return seconds


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for n_layer in (12, 48):
        dense = work / f"gpt2-{n_layer}x1024-dense"
        dense_bytes = dense_gpt2(dense, n_layer, 1024, 16, "2GB")
        results[f"{n_layer}x1024"] = {**upcycle_child(dense, work / f"{n_layer}-prmoe", "2,4", fidelity=True),
                                      "dense_bytes": dense_bytes}
        shutil.rmtree(dense)
    xl = work / "gpt2-xl-dense"
    dense_bytes = dense_gpt2(xl, 48, 1600, 25, "1600MB")
    up = upcycle_child(xl, work / "gpt2-xl-prmoe", "32,128", fidelity=False)
    results["gpt2-xl"] = {**up, "dense_bytes": dense_bytes,
                          "safetensors_write_seconds": safetensors_write_seconds(work, up["bytes"])}
    shutil.rmtree(xl)
    print(json.dumps({**results, "this_process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
                     indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/upcycle-bench"))

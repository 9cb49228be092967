"""Peak RSS and wall time of `upcycle` on a GPT-2-small-sized model, next to safetensors' own write speed.

    python benchmarks/upcycle_memory.py [WORKDIR]     # default /tmp/upcycle-bench; needs ~4 GB of disk

Builds a random-weight GPT-2 (12 layers, 768 wide) as a dense dir, upcycles it to `--pyramid 32,64
--dtype bf16` in a child process (so its peak RSS is its own), then times
`safetensors.torch.save_file` writing the same number of bytes (in 1 GB files).
"""

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
s = upcycle(sys.argv[1], sys.argv[2], pyramid="32,64", dtype="bf16", init="preserve", fidelity=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "bytes": s.size_on_disk, "total_params": s.total_params, "shards": s.shards}))
"""


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    dense, out = work / "gpt2-small-dense", work / "gpt2-small-prmoe"
    if not dense.exists():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).save_pretrained(dense)
    r = subprocess.run([sys.executable, "-c", CHILD, str(dense), str(out)], capture_output=True, text=True, check=True)
    up = json.loads(r.stdout.strip().splitlines()[-1])

    # Baseline: safetensors writing the same number of bytes as bf16 tensors of 1 GB files.
    ref = work / "safetensors-ref"
    ref.mkdir(exist_ok=True)
    full, tail = divmod(up["bytes"] // 2, 2**29)  # bf16 elements: whole 1 GiB files, then the rest
    tensors = [torch.zeros(2**29, dtype=torch.bfloat16)] * full + [torch.zeros(tail, dtype=torch.bfloat16)]
    t = time.perf_counter()
    for i, x in enumerate(tensors):
        save_file({"x": x}, str(ref / f"{i}.safetensors"))
    ref_seconds = time.perf_counter() - t
    shutil.rmtree(ref)

    dense_bytes = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
    print(json.dumps({**up, "dense_bytes": dense_bytes, "safetensors_write_seconds": ref_seconds,
                      "this_process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/upcycle-bench"))

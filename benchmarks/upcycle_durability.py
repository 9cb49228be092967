"""What durable writes cost `upcycle`: the same upcycle with every file, directory and rename fsynced (what
the tool does) and with `io.fsync_path` replaced by a no-op, alternating (ABBA), medians and their ratio.

    python benchmarks/upcycle_durability.py [WORKDIR] [--rounds 2]   # default /tmp/upcycle-durability; ~9 GB of disk

Builds a random-weight GPT-2-medium-sized dense model (24 layers, 1024 wide) once, then upcycles it to
`--pyramid 16,32 --dtype bf16` (about 2 B parameters, 4 GB) in a child process per run. Before each run
the page cache's dirty pages are written out (`os.sync`, not timed), so every run starts alike; after a
run without fsync, the time its own deferred writes then take is reported too (`sync_after_s`): what
fsync moves into the command rather than adds.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

CHILD = """
import json, sys, time
from moe_convert import io
from moe_convert.convert.upcycle import upcycle
if sys.argv[3] == "no-fsync":
    io.fsync_path = lambda path: None
t = time.perf_counter()
s = upcycle(sys.argv[1], sys.argv[2], pyramid="16,32", dtype="bf16", init="preserve", fidelity=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": s.size_on_disk}))
"""


def run(dense: Path, out: Path, mode: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    done = subprocess.run([sys.executable, "-c", CHILD, str(dense), str(out), mode], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    os.sync()
    return {**result, "sync_after_s": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", nargs="?", type=Path, default=Path("/tmp/upcycle-durability"))
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs both modes twice)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense, out = args.work / "gpt2-medium-dense", args.work / "prmoe"
    if not dense.exists():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16)).save_pretrained(dense)
    runs = {"fsync": [], "no-fsync": []}
    for _ in range(args.rounds):
        for mode in ("fsync", "no-fsync", "no-fsync", "fsync"):
            runs[mode].append(run(dense, out, mode))
    shutil.rmtree(out, ignore_errors=True)
    from moe_convert.inference.native import cpu_model

    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    print(json.dumps({"cpu": cpu_model(), "bytes": runs["fsync"][0]["bytes"], "median_seconds": med,
                      "fsync_over_no_fsync": med["fsync"] / med["no-fsync"],
                      "median_sync_after_no_fsync_s": statistics.median(r["sync_after_s"] for r in runs["no-fsync"]),
                      "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

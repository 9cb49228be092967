"""Step time of `train` under --engine ddp and --engine fsdp on the same model, 2 torchrun processes
(gloo on CPU), in ABBA order; prints the median step time of each and the ratio fsdp / ddp.

    python benchmarks/fsdp_step_time.py [MODEL] [--steps 30] [--batch-size 8] [--seq-len 128]

MODEL defaults to the shipped checkpoints/tiny-gpt2. The first 5 steps of each run are not timed.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_seconds(model: str, engine: str, out: Path, args) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "moe_convert", "train", model, "--data", "builtin:pydoc", "-o", str(out), "--engine", engine,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--eval-every", "0", "--eval-windows", "2", "--json", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = args.batch_size * args.seq_len
    return statistics.median(tokens / r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > 5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default=str(ROOT / "checkpoints" / "tiny-gpt2"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    times = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("ddp", "fsdp", "fsdp", "ddp"):
            times[engine].append(step_seconds(args.model, engine, Path(tmp) / engine, args))
    ddp, fsdp = (statistics.mean(times[e]) for e in ("ddp", "fsdp"))
    print(json.dumps({"ddp_step_s": ddp, "fsdp_step_s": fsdp, "fsdp_over_ddp": fsdp / ddp, "runs": times}))


if __name__ == "__main__":
    main()

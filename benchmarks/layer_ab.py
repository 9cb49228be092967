"""The bench layer of this checkout against an older commit's, in one process, in ABBA order.

    python benchmarks/layer_ab.py REV [--tokens 8] [--experts 128] [--hidden 512] [--rounds 400] [--dtype fp32]

`git archive REV moe_convert` is unpacked into a temporary directory under another package name, so
both versions' `bench.impl_moe_convert` (the runtime's path: packed weights, one PR-MoE layer, top-1
+ residual) run on the same weights and input. Each round reads 256 MiB before every call (as
`bench layer` does) and alternates the order ABBA: a fixed order gives the first place a penalty of
up to ~10% on this shared machine, more than most changes are worth. Prints both medians and the
median and quartiles of the per-round ratios (now / REV), and checks both compute the same output.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_convert.cli import tune_memory_for_inference

tune_memory_for_inference()  # as `bench layer` runs (huge pages, glibc reuse); before torch is imported
import torch  # noqa: E402

from moe_convert.inference import bench

OLD_NAME = "moe_convert_rev"


def import_old(rev: str, into: Path):
    """The `bench` module of commit `rev`, imported as package `OLD_NAME` (its imports are relative)."""
    archive = subprocess.run(["git", "archive", rev, "moe_convert"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "moe_convert").rename(into / OLD_NAME)
    sys.path.insert(0, str(into))
    return __import__(f"{OLD_NAME}.bench", fromlist=["bench"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old(args.rev, Path(tmp))
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        new_fn = bench.impl_moe_convert(bench.make_weights(args.experts, args.hidden, dtype))
        old_fn = old.impl_moe_convert(old.make_weights(args.experts, args.hidden, dtype))
        x = torch.randn(args.tokens, args.hidden).to(dtype)
        evict = torch.ones(bench.EVICT_BYTES // 4)
        times = {"now": [], args.rev: []}
        with torch.inference_mode():
            diff = float((new_fn(x) - old_fn(x)).abs().max())
            for r in range(args.rounds):
                pair = [("now", new_fn), (args.rev, old_fn)]
                for name, fn in pair if r % 4 in (0, 3) else pair[::-1]:
                    evict.sum()
                    t = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - t) * 1e3)
    ratios = [a / b for a, b in zip(times["now"], times[args.rev])]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"T={args.tokens} E={args.experts} d={args.hidden} {args.dtype}, {args.rounds} rounds: now "
          f"{statistics.median(times['now']):.3f} ms, {args.rev} {statistics.median(times[args.rev]):.3f} ms; "
          f"now/{args.rev} median {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f}); "
          f"outputs differ by {diff:.1e}")


if __name__ == "__main__":
    main()

"""Training step time of a PR-MoE layer stack: `train` of the shipped checkpoint upcycled to small and large
pyramids, median seconds per optimizer step, for this checkout and optionally other checkouts of the
repository (e.g. an older commit in a `git worktree`), in alternating order (ABBA).

    python benchmarks/train_step_time.py [--pyramids 4,8 32,128] [--steps 20] [--other PATH] [-o DIR]

Each run: `moe-convert train` of `checkpoints/tiny-gpt2` upcycled with `--pyramid P` (once, by this
checkout), `builtin:pydoc`, batch 16 x 128 tokens, no evals; the first 2 steps are not counted. A run
of another checkout starts `python -m moe_convert` from that tree, so it runs that tree's code.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(tree: Path, model: Path, out: Path, steps: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "moe_convert", "train", str(model), "--data", "builtin:pydoc", "-o", str(out),
           "--batch-size", "16", "--seq-len", "128", "--steps", str(steps), "--warmup-steps", "2", "--eval-every",
           "0", "--eval-fraction", "0", "--json"]
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [16 * 128 / r["tokens_per_s"] for r in records if r.get("kind") == "train"][2:]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyramids", nargs="+", default=["4,8", "32,128"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--other", type=Path, help="another checkout to time the same way (its label: 'other')")
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/train-step-time"))
    args = parser.parse_args()
    trees = {"this": ROOT, **({"other": args.other.resolve()} if args.other else {})}
    results = {}
    for pyramid in args.pyramids:
        model = args.out / f"up-{pyramid.replace(',', '-')}"
        if not model.exists():
            subprocess.run([sys.executable, "-m", "moe_convert", "upcycle", str(ROOT / "checkpoints" / "tiny-gpt2"),
                            "-o", str(model), "--pyramid", pyramid, "--no-fidelity"], cwd=ROOT, check=True,
                           capture_output=True)
        order = list(trees) + list(trees)[::-1]  # ABBA
        runs = {name: [] for name in trees}
        for name in order:
            runs[name].append(step_seconds(trees[name], model, args.out / f"run-{name}", args.steps))
        results[pyramid] = {name: statistics.median(t) for name, t in runs.items()}
        print(pyramid, {k: f"{v:.3f} s/step" for k, v in results[pyramid].items()}, flush=True)
    from moe_convert.inference.native import cpu_model

    print(json.dumps({"cpu": cpu_model(), "s_per_step": results}, indent=2))


if __name__ == "__main__":
    main()

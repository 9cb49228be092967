"""What the KD stop saves: step time and resident memory in each phase of staged KD.

    python benchmarks/distill_phases.py -o runs/phases [--pyramid 64,128] [--steps 30]

checkpoints/tiny-gpt2 is upcycled to a teacher whose experts dominate its size (default 64 and
128 experts), then distilled one layer shallower twice with the same data order: `--kd-stop 0.5`
(staged) and `--kd-stop 0` (plain training). Prints the median step time and resident memory of
the KD phase and of the CE phase next to plain training's, and the teacher's weight bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def phase_stats(out: Path, tokens_per_step: int) -> dict:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"][2:]  # the first steps warm up allocators and caches
    stats = {}
    for phase, on in (("kd", 1.0), ("ce", 0.0)):
        sel = [r for r in rows if r["kd_on"] == on]
        if sel:
            stats[phase] = {"step_s": statistics.median(tokens_per_step / r["tokens_per_s"] for r in sel),
                            "rss_gb": statistics.median(r["rss_gb"] for r in sel)}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--pyramid", default="64,128")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()

    from moe_convert.training.distill import DistillJob, run_distill
    from moe_convert.training.train import TrainConfig
    from moe_convert.convert.upcycle import upcycle

    teacher = args.output / "teacher"
    summary = upcycle("checkpoints/tiny-gpt2", teacher, pyramid=args.pyramid, init="noise:0.01", fidelity=False,
                      overwrite=True)
    result = {"teacher_params": summary.total_params, "teacher_bytes": summary.size_on_disk}
    for name, kd_stop in (("staged", 0.5), ("plain", 0.0)):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, warmup_steps=2, eval_every=0, eval_windows=8)
        out = args.output / name
        run_distill(DistillJob(model=str(teacher), data="builtin:pydoc", output=str(out), seq_len=args.seq_len,
                               kd_stop=kd_stop, config=cfg), overwrite=True, progress=False)
        result[name] = phase_stats(out, args.batch_size * args.seq_len)
    print(json.dumps(result, indent=1))
    s, p = result["staged"], result["plain"]["ce"]
    print(f"teacher: {result['teacher_params']:,} parameters, {result['teacher_bytes'] / 1e6:.1f} MB")
    print(f"KD phase:   {s['kd']['step_s']:.3f} s/step, {s['kd']['rss_gb']:.3f} GB RSS")
    print(f"after stop: {s['ce']['step_s']:.3f} s/step, {s['ce']['rss_gb']:.3f} GB RSS  "
          f"(drop {1e3 * (s['kd']['rss_gb'] - s['ce']['rss_gb']):.0f} MB)")
    print(f"plain:      {p['step_s']:.3f} s/step, {p['rss_gb']:.3f} GB RSS")
    print(f"KD-phase overhead over plain: {s['kd']['step_s'] / p['step_s']:.2f}x; "
          f"after the stop: {s['ce']['step_s'] / p['step_s']:.2f}x")


if __name__ == "__main__":
    main()

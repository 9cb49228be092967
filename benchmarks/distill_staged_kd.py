"""Staged KD vs full KD vs no KD on the shipped checkpoint.

    python benchmarks/distill_staged_kd.py -o runs/mos [--teacher-steps 500] [--steps 200] [--kd-stops 0.5,1,0]

Pipeline: checkpoints/tiny-gpt2 -> upcycle (pyramid 4,8) -> train the teacher briefly -> distill
a student one layer shallower three ways (kd_stop 0.5 = staged, 1.0 = full KD, 0.0 = no KD), same
steps, same data order, same init. With `--kd-top-k K`, two more full-KD runs use top-K KD through
a teacher cache (`--teacher-cache`): the first fills it, the second reads every window back (the
teacher-logit cache measured against full-logit KD). Prints held-out perplexities and the median
step time of each phase, as JSON (also written to OUTPUT/results.json) and a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--teacher-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kd-top-k", type=int, default=None)
    ap.add_argument("--kd-stops", default="0.5,1,0", help="the KD stops to compare (the slow test runs 0.5,0)")
    args = ap.parse_args()

    from moe_convert.training.distill import DistillJob, run_distill
    from moe_convert.training.train import TrainConfig, TrainJob, run_training
    from moe_convert.convert.upcycle import upcycle

    out = args.output
    upcycled, teacher = out / "upcycled", out / "teacher"
    if not (upcycled / "config.json").exists():
        upcycle("checkpoints/tiny-gpt2", upcycled, pyramid="4,8", overwrite=True)
    if not (teacher / "config.json").exists():
        cfg = TrainConfig(steps=args.teacher_steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=10, eval_every=0)
        run_training(TrainJob(model=str(upcycled), data="builtin:pydoc", output=str(teacher), seq_len=args.seq_len,
                              config=cfg), overwrite=True, progress=False)
    kinds = {0.0: "no KD", 1.0: "full KD"}
    runs = [(f"{kinds.get(s, 'staged KD')} ({s})", s, {}) for s in map(float, args.kd_stops.split(","))]
    if args.kd_top_k:
        cached = {"kd_top_k": args.kd_top_k, "teacher_cache": str(out / "teacher-cache")}
        runs += [(f"top-{args.kd_top_k} KD, {state} cache", 1.0, cached) for state in ("cold", "warm")]
    rows = {}
    for i, (name, kd_stop, extra) in enumerate(runs):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=10, eval_every=0)
        job = DistillJob(model=str(teacher), data="builtin:pydoc", output=str(out / f"student-{i}"),
                         seq_len=args.seq_len, student_layers=-1, kd_stop=kd_stop, config=cfg, **extra)
        r = run_distill(job, overwrite=True, progress=False)
        rows[name] = {"student_ppl": r.student["eval_ppl"], "teacher_ppl": r.teacher["eval_ppl"],
                      "step_s_kd": r.step_seconds["kd"], "step_s_ce": r.step_seconds["ce"]}
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    print(f"{'run':<26}{'student ppl':>12}{'teacher ppl':>12}{'step s (KD)':>13}{'step s (CE)':>13}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in rows.items():
        print(f"{name:<26}{r['student_ppl']:>12.2f}{r['teacher_ppl']:>12.2f}{fmt(r['step_s_kd']):>13}{fmt(r['step_s_ce']):>13}")


if __name__ == "__main__":
    main()

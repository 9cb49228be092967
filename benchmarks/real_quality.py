"""Does upcycling a real pretrained model keep its quality, and does the PR-MoE learn faster than the dense model?

    python benchmarks/real_quality.py -o /tmp/real-quality [--steps 60] [--pyramid 8,16] [--eval-windows 64]

SmolLM2-135M-Instruct (benchmarks/real_model.py) is upcycled to `--pyramid` (function-preserving init), then the
dense model and the PR-MoE are each trained the same `--steps` on builtin:pydoc (same data order, same schedule).
Held-out perplexity of: the dense model, the PR-MoE at step 0, and both after training. JSON in OUTPUT/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pyramid", default="8,16")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args()

    from real_model import smollm2_dir

    from moe_convert.convert.upcycle import upcycle
    from moe_convert.training.train import TrainConfig, TrainJob, eval_model, run_training

    out, dense = args.output, smollm2_dir()
    upcycled = out / "upcycled"
    if not (upcycled / "config.json").exists():
        upcycle(str(dense), upcycled, pyramid=args.pyramid, overwrite=True)

    def held_out_ppl(model: Path) -> float:
        return eval_model(model, "builtin:pydoc", seq_len=args.seq_len, max_windows=args.eval_windows)["ppl"]

    rows = {"dense": {"step 0": held_out_ppl(dense)}, f"PR-MoE {args.pyramid}": {"step 0": held_out_ppl(upcycled)}}
    for name, model in zip(rows, (dense, upcycled)):
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(10, args.steps),
                          eval_every=0, eval_windows=args.eval_windows)
        trained = out / ("trained-" + name.split()[0].lower().replace("-", ""))
        r = run_training(TrainJob(model=str(model), data="builtin:pydoc", output=str(trained), seq_len=args.seq_len,
                                  config=cfg), overwrite=True, progress=False)
        rows[name] |= {f"step {args.steps}": held_out_ppl(trained), "train tokens/s": r.tokens_per_s}
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()

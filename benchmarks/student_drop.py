"""Which layers a student drops: `--drop-by measured` against `front` on real weights, at init.

For each k, the measured choice (`training/layer_drop.choose_dropped`, on the training split's
calibration sample, as `distill` runs it) and every candidate it scored; each candidate student's
held-out perplexity (the teacher run without those layers: the teacher-initialised student exactly),
the measured choice first, then front, then the rest. One JSON line per result, as it comes.

    python benchmarks/real_model.py      # SmolLM2-135M-Instruct's directory
    moe-convert upcycle <that dir> -o /tmp/drop-smol-816 --pyramid 8,16
    python benchmarks/student_drop.py /tmp/drop-smol-816 --k 3 10
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moe_convert.io import load_tokenizer
from moe_convert.training.data import load_packed
from moe_convert.training.layer_drop import calibration_windows, choose_dropped, without_layers
from moe_convert.training.train import evaluate, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--k", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--data", default="builtin:pydoc")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", default="all", choices=("all", "choice"),
                    help="held-out perplexity of every candidate, or of the measured choice and front only")
    args = ap.parse_args()
    data = load_packed(args.data, load_tokenizer(args.teacher), args.seq_len)
    teacher = load_model(args.teacher).eval()
    windows = calibration_windows(data.train, args.seed)
    print(json.dumps({"threads": torch.get_num_threads(), "calibration_windows": len(windows),
                      "heldout_windows": len(data.eval)}), flush=True)
    for k in args.k:
        start = time.perf_counter()
        choice = choose_dropped(teacher, windows, k)
        print(json.dumps({"k": k, "choice": choice.dropped, "teacher_calibration_ppl": choice.teacher_ppl,
                          "seconds": time.perf_counter() - start,
                          "candidates": [[c.dropped, c.found_by, c.score, c.calibration_ppl] for c in choice.candidates],
                          "block_influence": [round(x, 4) for x in choice.block_influence],
                          "angular_distance": [round(x, 4) for x in choice.angular_distance]}), flush=True)
        order = sorted(choice.candidates, key=lambda c: (c.dropped != choice.dropped, c.found_by != "front"))
        for c in order if args.heldout == "all" else order[:2]:
            with without_layers(teacher, c.dropped):
                heldout = evaluate(teacher, data.eval)["ppl"]
            print(json.dumps({"k": k, "dropped": c.dropped, "found_by": c.found_by, "score": c.score,
                              "calibration_ppl": c.calibration_ppl, "heldout_ppl": heldout,
                              "chosen": c.dropped == choice.dropped}), flush=True)


if __name__ == "__main__":
    main()

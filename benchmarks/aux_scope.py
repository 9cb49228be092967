"""Micro-batch vs global-batch load balancing (`--aux-scope`) on two domains: prose and code.

    python benchmarks/aux_scope.py -o runs/aux-scope [--steps 200] [--grad-accum 8] [--seeds 0]

Pipeline: checkpoints/tiny-gpt2 -> upcycle (pyramid 4,8) -> train on a mix of `builtin:pydoc` (prose)
and Python source from this interpreter's standard library (code, written to OUTPUT/code.jsonl and the
mix to OUTPUT/mix.jsonl, read through --data) with each scope: same steps, data order and init.
Reports held-out perplexity per domain, the median step time (also from short runs of both scopes in
ABBA order, `--ab-rounds`), and per layer how differently the two
domains use the experts (Jensen-Shannon divergence of their first-choice shares, bits: 0 = the same
experts, 1 = disjoint ones). Writes OUTPUT/results.json and a heatmap of the per-domain expert shares
(`--plot`, default docs/aux_scope_shares.png).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sysconfig
from pathlib import Path

DOMAINS = {"prose": "builtin:pydoc", "code": None}  # code: OUTPUT/code.jsonl


def code_documents(max_chars: int) -> list[str]:
    """Top-level blocks (a def or class with what precedes it) of the standard library's own modules,
    file by file in name order, until `max_chars`."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for block in re.split(r"\n(?=(?:def|class|async def) )", path.read_text(errors="replace")):
            if len(block) >= 200:
                docs.append(block.strip())
                total += len(block)
        if total >= max_chars:
            break
    return docs


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def expert_shares(model_dir: Path, data: str, seq_len: int, max_windows: int) -> list[list[float]]:
    """Per MoE layer, the share of first-choice tokens each expert gets on `data`'s held-out windows."""
    import torch

    from moe_convert.io import load_tokenizer
    from moe_convert.training.data import load_packed
    from moe_convert.training.train import load_model

    model = load_model(model_dir).eval()
    windows = load_packed(data, load_tokenizer(model_dir), seq_len).eval[:max_windows]
    counts = [0] * len(model.moe_layers())
    with torch.no_grad():
        for batch in windows.split(8):
            model(input_ids=batch)
            counts = [c + m.expert_counts.double() for c, m in zip(counts, model.moe_layers())]
    return [(c / c.sum()).tolist() for c in counts]


def js_bits(p: list[float], q: list[float]) -> float:
    import math

    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log2(a / b) for a, b in zip(x, m) if a > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def plot(results: dict, layers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = list(results)
    E = max(len(s) for r in results.values() for s in r["shares"]["prose"])
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rows, labels = [], []
        for i, layer in enumerate(layers):
            for domain in DOMAINS:
                share = results[run]["shares"][domain][i]
                rows.append(share + [np.nan] * (E - len(share)))
                labels.append(f"L{layer} {domain}")
        im = ax.imshow(np.array(rows), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(run, fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(E), range(E), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens")
    fig.savefig(path, dpi=80, bbox_inches="tight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0", help="data-order and dropout seeds, comma-separated")
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--ab-rounds", type=int, default=2, help="ABBA rounds of 12-step runs timing each scope")
    ap.add_argument("--plot", type=Path, default=Path("docs/aux_scope_shares.png"))
    args = ap.parse_args()

    from moe_convert.convert.upcycle import upcycle
    from moe_convert.training.data import load_documents
    from moe_convert.training.train import TrainConfig, TrainJob, eval_model, run_training

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    prose = load_documents("builtin:pydoc").texts
    code = code_documents(sum(map(len, prose)))
    DOMAINS["code"] = write_jsonl(out / "code.jsonl", code)
    mix = write_jsonl(out / "mix.jsonl", [t for pair in zip(prose, code) for t in pair]
                      + prose[len(code):] + code[len(prose):])
    upcycled = out / "upcycled"
    if not (upcycled / "config.json").exists():
        upcycle("checkpoints/tiny-gpt2", upcycled, pyramid="4,8", overwrite=True)
    layers = json.loads((upcycled / "config.json").read_text())["moe_layers"]

    results = {}
    for seed in map(int, args.seeds.split(",")):
        for scope in ("micro", "global"):
            name = f"{scope} seed {seed}"
            run = out / f"{scope}-{seed}"
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                              warmup_steps=10, eval_every=0, eval_windows=args.eval_windows, seed=seed,
                              aux_scope=scope)
            if not (run / "config.json").exists():
                run_training(TrainJob(model=str(upcycled), data=mix, output=str(run), seq_len=args.seq_len, config=cfg),
                             overwrite=True, progress=False)
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if r["kind"] == "train"]
            tokens = args.batch_size * args.seq_len
            shares = {d: expert_shares(run, data, args.seq_len, args.eval_windows) for d, data in DOMAINS.items()}
            results[name] = {
                "ppl": {d: eval_model(run, data, seq_len=args.seq_len, max_windows=args.eval_windows)["ppl"]
                        for d, data in DOMAINS.items()},
                "step_s": statistics.median(tokens / r["tokens_per_s"] for r in train[5:]),
                "aux_last10": statistics.mean(r["aux"] for r in train[-10:]),
                "entropy_micro_last10": {str(i): statistics.mean(r[f"load_entropy_micro_{i}"] for r in train[-10:])
                                         for i in layers},
                "entropy_global_last10": {str(i): statistics.mean(r[f"load_entropy_global_{i}"] for r in train[-10:])
                                          for i in layers},
                "js_bits": [js_bits(p, c) for p, c in zip(shares["prose"], shares["code"])],
                "shares": shares,
            }
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "shares"}), flush=True)
    step_s = {"micro": [], "global": []}  # ABBA: short runs alternating, so a shared machine's load hits both
    for i, scope in enumerate(["micro", "global", "global", "micro"] * args.ab_rounds):
        cfg = TrainConfig(steps=12, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                          warmup_steps=2, eval_every=0, eval_windows=1, aux_scope=scope)
        run_training(TrainJob(model=str(upcycled), data=mix, output=str(out / "timing"), seq_len=args.seq_len,
                              config=cfg), overwrite=True, progress=False)
        records = [json.loads(line) for line in (out / "timing" / "metrics.jsonl").read_text().splitlines()]
        step_s[scope] += [args.batch_size * args.seq_len / r["tokens_per_s"] for r in records[2:] if r["kind"] == "train"]
    timing = {scope: statistics.median(v) for scope, v in step_s.items() if v}
    if timing:
        print("median step seconds (ABBA):", json.dumps(timing))
    (out / "results.json").write_text(json.dumps({"runs": results, "step_s_abba": timing}, indent=1))
    plot(results, layers, args.plot)
    print(f"{'run':<16}{'prose ppl':>10}{'code ppl':>10}{'s/step':>8}  JS bits per layer  load entropy micro/global")
    for name, r in results.items():
        ent = "  ".join(f"L{i} {r['entropy_micro_last10'][str(i)]:.2f}/{r['entropy_global_last10'][str(i)]:.2f}"
                        for i in layers)
        print(f"{name:<16}{r['ppl']['prose']:>10.2f}{r['ppl']['code']:>10.2f}{r['step_s']:>8.3f}  "
              f"{' '.join(f'{j:.3f}' for j in r['js_bits'])}  {ent}")


if __name__ == "__main__":
    main()

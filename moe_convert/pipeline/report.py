"""The run report: a summary table, measured student layers, loss curves with the KD stop marked, and
expert-load heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def expert_shares(model, input_ids: torch.Tensor, batch_size: int = 8) -> dict[int, list[float]]:
    """Share of first-choice tokens each expert receives, per MoE layer index, on `input_ids` (N, S)."""
    was_training = model.training
    model.eval()
    counts: dict[int, torch.Tensor] = {}
    layers = dict(zip(model.config.moe_layers, model.moe_layers())) if hasattr(model, "moe_layers") else {}
    for start in range(0, input_ids.shape[0], batch_size):
        model(input_ids[start : start + batch_size])
        for idx, layer in layers.items():
            counts[idx] = counts.get(idx, 0) + layer.expert_counts
    model.train(was_training)
    return {idx: (c / c.sum()).tolist() for idx, c in counts.items()}


def plot_losses(metrics_path: Path, out_png: Path, title: str, kd_stop_step: int | None = None) -> Path:
    """Training and eval loss over steps from a metrics JSONL, with the KD stop marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    # CE is comparable across the KD stop (the mixed KD objective is not; a dense model logs only
    # `loss`, which is its CE); the KD term is drawn beside it
    ax.plot([r["step"] for r in train], [r.get("ce", r["loss"]) for r in train], label="train CE", linewidth=1)
    kd = [(r["step"], r["kd"]) for r in train if "kd" in r]
    if kd:
        ax.plot(*zip(*kd), label="train KD term (T^2 KL)", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval CE")
    if kd_stop_step is not None:
        ax.axvline(kd_stop_step, color="red", linestyle="--", label=f"KD stop (step {kd_stop_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_expert_shares(shares: dict[int, list[float]], out_png: Path, title: str) -> Path:
    """Heatmap: one row per MoE layer, one column per expert, colour = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(shares)
    width = max(len(shares[i]) for i in layers)
    grid = np.full((len(layers), width), np.nan)
    for row, idx in enumerate(layers):
        grid[row, : len(shares[idx])] = shares[idx]
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * width, 14), 1.5 + 0.5 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of tokens")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _label(recipe, path: str) -> str:
    """What a model directory is in this run: the step that made it, or the dense source."""
    roles = {"upcycle": "upcycled", "train": "trained", "distill": "student"}
    for step in recipe.steps:
        if step.output == path and step.kind in roles:
            return f"{roles[step.kind]} (step {step.index})"
        if step.kind == "upcycle" and step.input == path:
            return "dense source"
    return Path(path).name


def _results(state: dict, kind: str) -> list[tuple[str, object]]:
    """(step index, result) of the run's finished steps of `kind`, in step order (`state`: run_state.json;
    a stale entry, not run again since an earlier step changed, has no result)."""
    return [(index, entry["result"]) for index, entry in sorted(state.items(), key=lambda kv: int(kv[0]))
            if entry["kind"] == kind and "result" in entry]


def summary_rows(recipe, state: dict) -> list[dict]:
    """Per evaluated model: layers, experts per layer, total/active params, held-out ppl, tokens/s."""
    from ..convert.summary import summarize

    rows = []
    for _, result in _results(state, "eval"):
        for ev in result:
            s = summarize(ev["model"])
            experts = [r.experts for r in s.layers if r.experts]
            rows.append({"model": _label(recipe, ev["model"]), "path": ev["model"], "layers": len(s.layers),
                         "experts": experts, "total_params": s.total_params, "active_params": s.active_params,
                         "eval_ppl": ev["ppl"], "tokens_per_s": ev["tokens_per_s"]})
    return rows


def bench_lines(state: dict) -> list[str]:
    """Markdown tables of the run's `bench` steps: each implementation's median ms, x floor and speed-up
    over DeepSpeed per expert count, with the machine constants of that run."""
    from ..convert.summary import fmt

    lines = []
    for index, result in _results(state, "bench"):
        m, rows = result["machine"], result["rows"]
        first = rows[0] if rows else {}
        lines += [f"## Step {index}: bench layer (T={first.get('tokens')}, d={first.get('hidden')}, "
                  f"{first.get('dtype')}{', forward+backward' if first.get('backward') else ''}; GEMM {m['gemm_gflops']:.0f} GFLOP/s, bandwidth {m['bandwidth_gbs']:.1f} GB/s)",
                  "", "| experts | impl | ms | x floor | DeepSpeed ms / ms |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['experts']} | {r['impl']} | {fmt(r['ms'], '.2f')} | {fmt(r['vs_floor'], '.2f')} | "
                  f"{fmt(r['speedup_vs_deepspeed'], '.2f')} |" for r in rows]
        lines.append("")
    return lines


def drop_lines(state: dict) -> list[str]:
    """Markdown tables of the run's distill steps whose dropped layers were measured (`--drop-by measured`):
    each candidate, what proposed it, its score and the student's perplexity at init on the calibration sample."""
    from ..convert.summary import fmt

    lines = []
    for index, result in _results(state, "distill"):
        drop = result.get("drop")
        if not drop:
            continue
        lines += [f"## Step {index}: student layers (dropped {drop['dropped']}, measured on "
                  f"{drop['calibration_tokens']:,} training tokens; teacher ppl {drop['teacher_ppl']:,.2f})", "",
                  "| dropped | found by | score | student ppl at init | chosen |", "|---|---|---:|---:|---|"]
        lines += [f"| {c['dropped']} | {c['found_by']} | {fmt(c['score'], '.4f')} | {c['calibration_ppl']:,.2f} | "
                  f"{'yes' if c['dropped'] == drop['dropped'] else ''} |" for c in drop["candidates"]]
        lines.append("")
    return lines


def _eval_windows(recipe, model: str, count: int = 32):
    """A few held-out windows for expert-load plots, from the run's eval (or distill/train) data."""
    from ..io import load_tokenizer
    from ..training.data import load_packed

    source = next((s.spec for s in reversed(recipe.steps) if s.kind in ("eval", "distill", "train")), None)
    if source is None:
        return None
    packed = load_packed(source.data, load_tokenizer(model), source.seq_len, text_field=source.text_field,
                         eval_fraction=source.eval_fraction)
    return packed.eval[:count]


def write_report(recipe, state: dict) -> tuple[Path, list[dict]]:
    """`report.md` in the run directory: the summary table, loss curves, expert-load heatmaps."""
    from ..convert.summary import load_config
    from ..training.train import load_model

    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {recipe.path or out}", ""]
    rows = summary_rows(recipe, state)
    if rows:
        lines += ["| model | layers | experts per MoE layer | total params | active params | held-out ppl | tokens/s |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            experts = ", ".join(map(str, r["experts"])) or "dense"
            lines.append(f"| {r['model']} | {r['layers']} | {experts} | {r['total_params']:,} | "
                         f"{r['active_params']:,} | {r['eval_ppl']:.2f} | {r['tokens_per_s']:,.0f} |")
        lines.append("")
    lines += bench_lines(state) + drop_lines(state)
    for step in recipe.steps:
        metrics = Path(step.output) / "metrics.jsonl"
        if step.kind not in ("train", "distill") or not metrics.is_file():
            continue
        kd_stop = step.spec.kd_steps if step.kind == "distill" else None
        png = plot_losses(metrics, out / f"loss-{step.index}-{step.kind}.png",
                          f"step {step.index}: {step.kind} loss", kd_stop)
        lines += [f"## Step {step.index}: {step.kind} loss", "", f"![{step.kind} loss]({png.name})", ""]
    teacher = next((s.output for s in reversed(recipe.steps) if s.kind in ("train", "upcycle")), None)
    student = next((s.output for s in reversed(recipe.steps) if s.kind == "distill"), None)
    for role, path in (("teacher", teacher), ("student", student)):
        has_experts = path is not None and (Path(path) / "config.json").is_file() and bool(
            getattr(load_config(path), "moe_layers", None))  # from the config: a dense model is not loaded
        windows = _eval_windows(recipe, path) if has_experts else None
        if windows is None:
            continue
        png = plot_expert_shares(expert_shares(load_model(path), windows), out / f"experts-{role}.png",
                                 f"{role}: share of held-out tokens per expert")
        lines += [f"## Expert load: {role}", "", f"![{role} expert shares]({png.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report, rows

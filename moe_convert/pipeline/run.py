"""`run RECIPE`: plan a recipe's steps on configs alone, run them in order, write the report.

The plan needs no weights: each step's output config follows from its input's (upcycle adds the
MoE layout, distill removes layers, train/export keep it), and the counts come from the model
built on the meta device (`summary.summarize_config`). Peak-memory figures are estimates of
what the step holds: upcycle = dense model + one MoE layer (it streams); train and distill = the
per-device memory plan of `training/memory.py` on `devices` devices with the step's engine (weights,
gradients, AdamW state, teacher, buffers, one micro-batch's activations); export = one stacked tensor
(it streams); eval = the weights.

A step whose output is complete is skipped, so an interrupted run continues where it stopped; a
train/distill step with checkpoints resumes from the newest one. Once a step runs, every later one
runs afresh (its input changed): they are marked stale, and a stale train/distill step resumes only
from a checkpoint made after the mark. A complete step whose settings differ from those it ran with
(an override, an edited recipe) is refused before any work: remove its output to run it again. So is
a step that would run without its input (a model directory nothing makes) or an eval `models` entry
no step makes.
Results and each step's settings are kept in `<run dir>/run_state.json`; `report.md` and its plots
are written at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from pathlib import Path

from ..errors import MoEConvertError
from ..model.layout import parse_int_list
from ..training.config import WHERE_ONLY
from .recipe import MAKES_MODEL, Recipe, Step

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
STATE_FILE = "run_state.json"
RESULTS_FILE = "results.json"  # what an eval or bench step writes in its output directory
NOT_MADE = "not a model directory (and no earlier step makes it)"  # an input or eval model of no step
# a distill step with `drop_by: measured` scores the teacher's layers when it runs; its plan shows the front rule's
MEASURED_NOTE = "the dropped layers are measured on the teacher when the step runs (planned here by the front rule)"


@dataclass
class StepPlan:
    index: int
    kind: str
    output: str
    complete: bool
    model: dict | None  # the model this step produces: layers, experts, params, size
    peak_bytes: int | None  # estimated (see the module docstring); train/distill: per device
    note: str = ""
    changed: str = ""  # a complete step whose settings differ from those it ran with: why `run` refuses it
    missing: str = ""  # an input that is not there (nor made by an earlier step): `--dry-run` notes it, `run` refuses
    starts_over: bool = False  # an earlier step ran again after its checkpoints were made: not resumed
    memory: dict | None = None  # train/distill: the per-device memory plan (`MemoryPlan.to_dict`)


def _load_source_config(step: Step):
    """The config of an upcycle source: a local dir, the hub cache, or the recipe's `source_config`."""
    from ..convert.summary import load_config

    source = Path(step.spec.source)  # `~` already expanded by the recipe
    if source.is_dir():
        return load_config(source)
    if step.spec.source_config:
        return load_config(step.spec.source_config)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(step.spec.source, "config.json")
    if isinstance(cached, str):
        return load_config(cached)
    raise MoEConvertError(f"source {step.spec.source!r} is not available here; "
                          "add source_config: <a config.json describing it> to plan it")


def _dtype_bytes(name: str | None, default: int = 4) -> int:
    return DTYPE_BYTES.get(str(name).replace("torch.", ""), default) if name else default


def _model_row(config, dtype_bytes: int) -> dict:
    from ..convert.summary import summarize_config

    s = summarize_config(config)
    moe = [r for r in s.layers if r.experts]
    return {"layers": len(s.layers), "moe_layers": [r.index for r in moe], "experts": [r.experts for r in moe],
            "total_params": s.total_params, "active_params": s.active_params,
            "largest_layer_params": max((r.params for r in s.layers), default=0),
            "size_bytes": s.total_params * dtype_bytes}


def plan_recipe(recipe: Recipe, devices: int = 1, device_memory: str = "80GB") -> list[StepPlan]:
    """Every step with the model it produces and an estimate of its peak memory, from configs only;
    train and distill steps per device, on `devices` devices."""
    from ..convert.export import check_ep_size, check_prmoe
    from ..model.configuration_prmoe import PRMoEConfig
    from ..model.layout import build_layout
    from ..training.data import check_data_source
    from ..training.distill import plan_student, student_config
    from ..training.memory import plan_memory
    from ..training.train import check_job_for_model

    configs: dict[str, tuple] = {}  # model dir -> (config, its row)
    state = _read_state(recipe)
    plans = []
    for step in recipe.steps:
        spec, model, peak, missing, memory, measured = step.spec, None, None, "", None, False
        try:
            if getattr(spec, "data", None) is not None:  # train, distill, eval: fail before any step runs
                check_data_source(spec.data, offline_hub_ok=True)
            if step.kind == "upcycle":
                dense = _load_source_config(step)
                dense_row = _model_row(dense, _dtype_bytes(getattr(dense, "dtype", None)))
                configs.setdefault(spec.source, (dense, dense_row))
                layout = build_layout(dense.num_hidden_layers, moe_every=spec.moe_every, pyramid=spec.pyramid,
                                      pyramid_split=spec.pyramid_split, experts=spec.experts, top_k=spec.top_k,
                                      residual=spec.residual, capacity_factor=spec.capacity_factor,
                                      aux_loss_coef=spec.aux_loss_coef)
                config = PRMoEConfig.from_layout(dense, layout)
                out_bytes = dense_row["size_bytes"] // dense_row["total_params"] if spec.dtype == "auto" \
                    else _dtype_bytes(spec.dtype)
                model = _model_row(config, out_bytes)
                peak = dense_row["size_bytes"] + model["largest_layer_params"] * out_bytes
            elif step.kind in ("train", "distill", "export") and _absent([step.input], configs):
                missing = f"input {step.input} is {NOT_MADE}"
            elif step.kind in ("train", "distill", "export"):
                if step.input not in configs:
                    from ..convert.summary import load_config

                    configs[step.input] = (cfg := load_config(step.input), _model_row(cfg, 4))
                config, row = configs[step.input]
                if step.kind == "export":
                    check_prmoe(step.input, config.model_type)
                    check_ep_size(config, spec.ep_size)
                else:
                    check_job_for_model(spec, config)
                teacher = config if step.kind == "distill" else None
                if step.kind == "distill":
                    config = student_config(config, plan_student(config, spec.student_layers, spec.keep_layers))
                    measured = spec.drop_rule == "measured"
                dtype = spec.dtype if step.kind == "export" else spec.save_dtype
                out_bytes = row["size_bytes"] // row["total_params"] if dtype == "auto" else _dtype_bytes(dtype)
                model = _model_row(config, out_bytes)
                if step.kind in ("train", "distill"):
                    memory = plan_memory(spec, config, devices=devices, device_memory=device_memory,
                                         teacher_config=teacher)
                    peak, memory = memory.total(), memory.to_dict()
                else:
                    peak = model["largest_layer_params"] * out_bytes
            elif step.kind == "eval":
                peak = max((configs[m][1]["total_params"] * 4 for m in spec.models if m in configs), default=None)
                absent = _absent(spec.models, configs)
                missing = f"model(s) {', '.join(absent)}: {NOT_MADE}" if absent else ""
        except MoEConvertError as e:
            where = f"{recipe.path}: " if recipe.path else ""
            raise MoEConvertError(f"{where}step {step.index} ({step.kind}): {e}") from None
        if model is not None and (step.kind in MAKES_MODEL or (step.kind == "export" and spec.format == "hf")):
            configs[step.output] = (config, model)  # a model directory later steps may name
        complete, starts_over = is_complete(recipe, step, state), _starts_over(step, state)
        plans.append(StepPlan(step.index, step.kind, step.output, complete, model, peak,
                              missing or _resume_note(step, complete or starts_over)
                              or (MEASURED_NOTE if measured else ""),
                              changed=(complete and changed_settings(state, step)) or "", missing=missing,
                              starts_over=starts_over, memory=memory))
    return plans


def _absent(models: list[str], planned: dict) -> list[str]:
    """The model directories that neither exist nor come from an earlier step (`planned`)."""
    return [m for m in models if m not in planned and not (Path(m) / "config.json").is_file()]


def statuses(plans: list[StepPlan]) -> list[str]:
    """What `run` does with each planned step: "done" (skipped), "to do", "runs again" (an earlier step
    runs, so its input changed) or "refused" (an input nothing makes; complete, but with other settings)."""
    out, runs = [], False  # complete steps are skipped until one runs; from then on every step runs
    for p in plans:
        runs = runs or not p.complete
        if runs:
            out.append("refused" if p.missing else "runs again" if p.complete else "to do")
        else:
            out.append("refused" if p.changed else "done")
    return out


def _starts_over(step: Step, state: dict) -> bool:
    """Marked stale (`_mark_stale`) and no checkpoint made since: what it has predates its input."""
    from ..io import checkpoints

    since = stale_since(state.get(str(step.index), {}))
    if since is None:
        return False
    ckpts = checkpoints(Path(step.output)) if step.kind in ("train", "distill") else []
    return not (ckpts and (ckpts[-1] / "trainer_state.json").stat().st_mtime > since)


def _resume_note(step: Step, no_resume: bool) -> str:
    """An interrupted train/distill step continues from its newest checkpoint (unless an earlier step runs);
    `no_resume`: complete, or it starts over (`_starts_over`)."""
    if no_resume or step.kind not in ("train", "distill"):
        return ""
    from ..io import checkpoints

    ckpts = checkpoints(Path(step.output))
    return f"resumes from its checkpoint {ckpts[-1].name} (unless an earlier step runs)" if ckpts else ""


def is_complete(recipe: Recipe, step: Step, state: dict) -> bool:
    """The step's output is finished (`state`: the run's `run_state.json`, which records eval and bench)
    and not stale: made before an earlier step of this run ran again (`_mark_stale`)."""
    out = Path(step.output)
    if stale_since(state.get(str(step.index), {})) is not None:
        return False
    if step.kind in MAKES_MODEL:
        return (out / "config.json").is_file()  # written last by each of them
    if step.kind == "export":
        return out.is_dir()  # renamed into place only when complete
    return str(step.index) in state and (out / RESULTS_FILE).is_file()  # removing the directory runs it again


def _read_state(recipe: Recipe) -> dict:
    path = recipe.output / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(recipe: Recipe, index: int, result) -> None:
    _save_state(recipe, {**_read_state(recipe), str(index): result})


def stale_since(entry: dict) -> float | None:
    """When a step's `run_state.json` entry was marked stale (`_mark_stale`), or None (current). An entry
    of an older version says only `"stale": true`: stale since ever."""
    return entry.get("stale_since", math.inf if entry.get("stale") else None)


def _mark_stale(recipe: Recipe, steps: list[Step]) -> None:
    """`steps` (after one about to run again) are to be redone: their outputs stop counting as complete
    now, so a run interrupted before it reaches them does not skip them next time."""
    marks = {str(s.index): {"kind": s.kind, "stale_since": time.time()} for s in steps}
    _save_state(recipe, {**_read_state(recipe), **marks})


def _save_state(recipe: Recipe, state: dict) -> None:
    recipe.output.mkdir(parents=True, exist_ok=True)
    tmp = recipe.output / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    tmp.replace(recipe.output / STATE_FILE)


def _settings(step: Step) -> dict:
    """A step's validated fields as plain data, as `run_state.json` keeps them."""
    return json.loads(json.dumps(asdict(step.spec), default=str))


def _leaves(settings: dict) -> dict:
    """Nested settings (a train step's `config`) flattened to their own field names."""
    out = {}
    for k, v in settings.items():
        out.update(_leaves(v) if isinstance(v, dict) else {k: v})
    return out


def _defaults(spec) -> dict:
    """Each field's default, nested dataclasses' (a train step's `config`) flattened as `_leaves` does."""
    out = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if is_dataclass(value):
            out.update(_defaults(value))
        elif f.default is not MISSING:
            out[f.name] = f.default
    return out


def changed_settings(state: dict, step: Step) -> str | None:
    """Why a complete step cannot be skipped: the settings it ran with (`state`, the run's
    `run_state.json`) differ from the recipe's now."""
    ran = state.get(str(step.index), {}).get("settings")
    if ran is None:
        return None
    ran, now = {**_defaults(step.spec), **_leaves(ran)}, _leaves(_settings(step))  # a field added since: its default
    changed = ", ".join(f"{k}: {ran.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(ran) | set(now))
                        if ran.get(k) != now.get(k) and k not in WHERE_ONLY)
    if not changed:
        return None
    return f"step {step.index} ({step.kind}) is complete but ran with other settings ({changed}); " \
           f"remove {step.output} to run it again"


def run_step(step: Step, fresh: bool = False):
    """Run one step (`fresh`: replace a train/distill output instead of resuming it); returns its result
    as plain data."""
    spec = step.spec
    if step.kind == "upcycle":
        from ..convert.upcycle import run_upcycle

        return run_upcycle(spec, overwrite=True).to_dict()
    if step.kind in ("train", "distill"):
        from ..io import checkpoints

        resume = not fresh and bool(checkpoints(Path(spec.output)))
        if step.kind == "train":
            from ..training.train import run_training

            return asdict(run_training(spec, resume=resume, overwrite=not resume))
        from ..training.distill import run_distill

        return run_distill(spec, resume=resume, overwrite=not resume).to_dict()
    if step.kind == "export":
        from ..convert.export import run_export

        return asdict(run_export(spec, overwrite=True))
    if step.kind == "eval":
        from ..training.train import run_eval

        return [run_eval(m, spec) for m in spec.models]
    from ..inference.bench import bench_layer
    from ..io import keep_freed_memory_for_reuse

    # as `bench layer` runs; its other setting, huge pages, must be asked for before torch starts (docs/kernels.md)
    keep_freed_memory_for_reuse()
    machine, rows = bench_layer(spec.tokens, spec.hidden, parse_int_list(spec.experts, "experts"), spec.dtype,
                                repeats=spec.repeats, backward=spec.backward)
    return {"machine": asdict(machine), "rows": [asdict(r) for r in rows]}


def execute(recipe: Recipe, on_step=lambda step, status: None) -> dict:
    """Run every step not yet complete, in order, and every step after one that ran;
    `on_step(step, "skip" | "start" | "done")` reports."""
    plans = plan_recipe(recipe)  # validates the whole chain before any work
    todo = statuses(plans)
    for plan, status in zip(plans, todo):
        if status == "refused":
            raise MoEConvertError(f"step {plan.index} ({plan.kind}): {plan.missing}" if plan.missing else plan.changed)
    ran = False
    for step, plan, status in zip(recipe.steps, plans, todo):
        if status == "done":
            on_step(step, "skip")
            continue
        on_step(step, "start")
        if not ran:  # every later step runs again: until it has, its old output is not the recipe's
            _mark_stale(recipe, [s for s in recipe.steps if s.index > step.index])
        start = time.perf_counter()
        result = run_step(step, fresh=ran or plan.starts_over)
        ran = True
        if step.kind in ("eval", "bench"):  # their output directory holds their results
            Path(step.output).mkdir(parents=True, exist_ok=True)
            (Path(step.output) / RESULTS_FILE).write_text(json.dumps(result, indent=1, default=str))
        _write_state(recipe, step.index, {"kind": step.kind, "seconds": time.perf_counter() - start,
                                          "result": result, "settings": _settings(step)})
        on_step(step, "done")
    return _read_state(recipe)

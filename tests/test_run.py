"""`run`: recipes validate and dry-run (paper-scale plans show the paper's sizes), overrides, errors
before any work, and a real run that is killed mid-train and finishes without redoing steps."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, metrics_of
from moe_convert.cli import app
from moe_convert.errors import MoEConvertError
from moe_convert.pipeline.recipe import apply_overrides, load_recipe, parse_recipe
from moe_convert.pipeline.run import MEASURED_NOTE, plan_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name paths relative to the repository root


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_dry_runs(recipe):
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.output)
    assert len(plans) == len(load_recipe(recipe).steps)


def _totals(recipe: str) -> dict[str, float]:
    return {p.kind: p.model["total_params"] / 1e9 for p in plan_recipe(load_recipe(ROOT / "recipes" / recipe)) if p.model}


def test_paper_scale_plans_show_the_papers_sizes():
    t350 = _totals("paper-350m-prmoe-32-64-mos.yaml")
    assert t350["upcycle"] == pytest.approx(4.12, rel=5e-3)  # PAPER.md: 350M+PR-MoE-32/64 4.12B
    assert t350["distill"] == pytest.approx(3.5, rel=2e-2)  # "+MoS 3.5B"
    t13 = _totals("paper-1.3b-prmoe-64-128-mos.yaml")
    assert t13["upcycle"] == pytest.approx(31.39, rel=5e-3)  # 1.3B+PR-MoE-64/128 31.39B
    assert t13["distill"] == pytest.approx(27, rel=2e-2)  # "+MoS 27B"
    xl = plan_recipe(load_recipe(ROOT / "recipes" / "gpt2-xl-prmoe-32-128.yaml"))[0].model
    assert xl["experts"] == [32] * 22 + [128] * 2 and 20e9 < xl["total_params"] < 22e9  # "≈ 21B"


def test_chaining_and_overrides():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["distill.kd_stop=0.7", "1.steps=3", "output=/tmp/x"])
    up, train, distill, export, ev = recipe.steps
    assert train.spec.model == up.output and distill.spec.model == train.output and export.spec.model == distill.output
    assert distill.spec.kd_stop == 0.7 and train.spec.config.steps == 3 and str(recipe.output) == "/tmp/x"
    assert ev.spec.models == ["checkpoints/tiny-gpt2", up.output, train.output, distill.output]


def test_upcycle_step_defaults_to_8_experts_like_the_cli():
    from moe_convert.model.layout import build_layout

    (step,) = parse_recipe({"output": "/tmp/x", "steps": [{"upcycle": {"source": "s"}}]}).steps
    assert step.spec.pyramid is None and step.spec.experts is None
    assert build_layout(6).num_experts == [8, 8, 8]  # what upcycle then builds for those options


@pytest.mark.parametrize("doc, overrides, message", [
    ({"steps": [{"bake": {}}]}, [], "unknown kind 'bake'"),
    ({"steps": [{"train": {"model": "m", "data": "d", "stepz": 3}}]}, [], "unknown field(s) stepz"),
    ({"steps": [{"train": {"model": "m", "data": "d", "lr": "3e-4"}}]}, [], "lr: expected float"),
    ({"steps": [{"train": {"model": "m", "data": "d", "batch_size": 0}}]}, [], "batch_size: must be >= 1"),
    ({"steps": [{"upcycle": {"source": "s", "pyramid": "8,x"}}]}, [], "pyramid"),
    ({"steps": [{"upcycle": {"source": "s", "pyramid": "8", "init": "magic"}}]}, [], "init"),
    ({"steps": [{"distill": {"teacher": "t", "data": "d", "kd_stop": 1.5}}]}, [], "kd_stop"),
    ({"steps": [{"distill": {"teacher": "t", "data": "d", "aux_scope": "rank"}}]}, [], "aux_scope: must be one of micro, global"),
    ({"steps": [{"export": {"model": "m", "format": "onnx"}}]}, [], "format"),
    ({"steps": [{"export": {"model": "m", "format": "hf", "ep_size": 2}}]}, [], "--ep-size applies to --format safetensors only"),
    ({"steps": [{"bench": {"dtype": "int8"}}]}, [], "--dtype 'int8' is not known"),
    ({"steps": [{"bench": {"tokens": 0}}]}, [], "must be >= 1"),
    ({"steps": [{"upcycle": {"source": "s", "pyramid": "8", "experts": "4,4"}}]}, [], "not both"),
    ({"steps": [{"train": {"model": "m", "data": "d"}}]}, ["distill.kd_stop=0.7"], "no step 'distill'"),
    ({"stepz": []}, [], "expected a mapping with 'steps'"),
    ({"steps": [{"upcycle": {"source": "s", "capacity_factor": "abc"}}]}, [], "capacity_factor: expected float | None"),
    ({"steps": [{"upcycle": {"source": "s", "residual": "no"}}]}, [], "residual: expected bool"),
    ({"steps": [{"upcycle": {"source": "s", "fidelity": 0}}]}, [], "fidelity: expected bool"),
    ({"output": "o", "steps": [{"upcycle": {"source": "s"}}]}, ["output="], "'output' must name a directory, got ''"),
    ({"steps": [{"eval": {"data": "d", "models": ["m"], "batch_size": 0}}]}, [], "batch_size must be >= 1"),  # at plan time
    ({"steps": [{"eval": {"data": "d"}}]}, [], "models: nothing to score"),  # no model made before it either
    ({"steps": [{"upcycle": {"source": "s", "pyramid": [4, "x"]}}]}, [], "pyramid: expected str"),
    ({"steps": [{"upcycle": {"source": "s", "seed": -1}}]}, [], "seed: must be in 0.."),
])
def test_bad_recipes_fail_naming_the_field(doc, overrides, message):
    with pytest.raises(MoEConvertError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(apply_overrides(doc, overrides))


def test_bad_recipe_cli_is_one_line_and_does_no_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'run'}\nsteps:\n  - upcycle: {{source: checkpoints/tiny-gpt2, pyramid: '4,8'}}\n"
                      "  - train: {data: 'builtin:pydoc', stepz: 3}\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "step 1 (train)" in result.output and "stepz" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


SMALL = ["train.steps=24", "train.save_every=4", "train.seq_len=32", "train.eval_every=0", "train.log_every=1",
         "train.batch_size=8", "distill.steps=4", "distill.seq_len=32", "distill.eval_every=0",
         "distill.batch_size=8", "eval.seq_len=32", "eval.max_windows=8"]


def _run_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "moe_convert", "run", "recipes/demo.yaml", *SMALL, f"output={out}"]


@pytest.mark.slow
def test_killed_mid_train_resumes_without_redoing_steps(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}  # a wide table: rows on one line each
    proc = subprocess.Popen(_run_cmd(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ckpts = out / "1-train" / "checkpoints"
    deadline = time.time() + 240
    while not any(ckpts.glob("step-*/trainer_state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # as hard as a kill gets: no cleanup code runs
    proc.wait()
    assert not (out / "1-train" / "config.json").exists()
    upcycled = (out / "0-upcycle" / "config.json").stat().st_mtime_ns
    dry = subprocess.run([*_run_cmd(out), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "step 1: resumes from its checkpoint step-" in dry.stdout, dry.stdout

    done = subprocess.run(_run_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 0 upcycle: skip" in done.stdout and (out / "0-upcycle" / "config.json").stat().st_mtime_ns == upcycled
    steps = [r["step"] for r in metrics_of(out / "1-train")]
    assert steps == list(range(1, 25))  # resumed from the checkpoint: every step logged exactly once
    assert "summary" in done.stdout and "student (step 2)" in done.stdout

    report = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"loss-1-train.png", "loss-2-distill.png", "experts-teacher.png",
                                      "experts-student.png"}
    for png in pngs:
        assert png.name in report and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # an override on a finished step is refused before any work (it used to be skipped silently) ...
    kd_stop = [*_run_cmd(out), "distill.kd_stop=1"]
    refused = subprocess.run(kd_stop, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "step 2 (distill) is complete but ran with other settings" in refused.stderr
    assert "kd_stop: 0.5 -> 1" in refused.stderr, refused.stderr
    dry = subprocess.run([*kd_stop, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "step 2: step 2 (distill) is complete but ran with other settings" in dry.stdout
    rows = re.findall(r"^\s*(\d)\s+(\w+)\s+(refused|done)\b", dry.stdout, re.M)
    assert ("2", "distill", "refused") in rows and ("3", "export", "done") in rows, dry.stdout
    lr = subprocess.run([*_run_cmd(out), "train.lr=0.5"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)  # a TrainConfig field is named, not the whole config
    assert "step 1 (train) is complete but ran with other settings (lr: 0.001 -> 0.5)" in lr.stderr, lr.stderr
    # ... and runs once its output is removed, with every later step run again on the new student
    shutil.rmtree(out / "2-distill")
    exported = (out / "3-export").stat().st_mtime_ns
    again = subprocess.run(kd_stop, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "step 1 train: skip" in again.stdout and "step 3 export: run" in again.stdout
    assert (out / "3-export").stat().st_mtime_ns != exported
    assert {r["kd_on"] for r in metrics_of(out / "2-distill")} == {1}  # KD throughout: the new setting


def test_recipe_yaml_takes_integer_lists_and_home_paths(tmp_path, monkeypatch):
    """`pyramid: 8`, `pyramid: [2, 4]`, `keep_layers: [0, 3]` as the CLI's `8` / `2,4` / `0,3`; `~` in a
    path is the home directory, as a shell gives it on the command line (it made a folder named ~)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text("output: ~/runs\nsteps:\n  - upcycle: {source: ~/dense, source_config: ~/c.json, pyramid: [2, 4]}\n"
                                     "  - distill: {data: ~/d.txt, keep_layers: [0, 3]}\n")
    up, distill = load_recipe(tmp_path / "r.yaml", ["upcycle.experts=null"]).steps
    assert (up.spec.pyramid, up.spec.source, up.output) == ("2,4", f"{tmp_path}/dense", f"{tmp_path}/runs/0-upcycle")
    assert up.spec.source_config == f"{tmp_path}/c.json"
    assert (distill.spec.keep_layers, distill.spec.data, distill.spec.model) == ("0,3", f"{tmp_path}/d.txt", up.output)
    (up, _) = load_recipe(tmp_path / "r.yaml", ["upcycle.pyramid=null", "upcycle.experts=8"]).steps
    assert up.spec.experts == "8"


def test_recipe_yaml_reads_numbers_and_words_as_written(tmp_path):
    """`lr: 3e-4` is a float and `mixed_precision: no` the word (PyYAML's YAML 1.1 rules read a
    string and False), in the file and in overrides."""
    (tmp_path / "r.yaml").write_text("steps:\n  - train: {model: m, data: d, lr: 3e-4, mixed_precision: no}\n")
    (step,) = load_recipe(tmp_path / "r.yaml").steps
    assert step.spec.config.lr == 3e-4 and step.spec.config.mixed_precision == "no"
    (step,) = load_recipe(tmp_path / "r.yaml", ["train.lr=1e-3", "train.warmup_steps=5"]).steps
    assert step.spec.config.lr == 1e-3 and step.spec.config.warmup_steps == 5


def test_eval_and_bench_steps_write_their_results(tmp_path):
    """An eval or bench step's output directory holds its results; report.md shows the bench table."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output: {tmp_path / 'run'}\n"
        "steps:\n"
        "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n"
        "  - eval: {data: 'builtin:pydoc', seq_len: 32, max_windows: 4}\n"
        "  - bench: {tokens: 16, hidden: 64, experts: '2', repeats: 1}\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    evals = json.loads((tmp_path / "run" / "1-eval" / "results.json").read_text())
    assert [Path(e["model"]).name for e in evals] == ["tiny-gpt2", "0-upcycle"] and all(e["windows"] == 4 for e in evals)
    bench = json.loads((tmp_path / "run" / "2-bench" / "results.json").read_text())
    ours = next(r for r in bench["rows"] if r["impl"] == "moe_convert")
    assert ours["experts"] == 2 and ours["ms"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Step 2: bench layer (T=16, d=64, fp32" in report and "| 2 | moe_convert |" in report
    changed = CliRunner().invoke(app, ["run", str(recipe), "1.max_windows=2"])
    assert changed.exit_code == 2 and "(max_windows: 4 -> 2); remove" in changed.output, changed.output
    shutil.rmtree(tmp_path / "run" / "1-eval")  # as the error says: the step runs again
    again = CliRunner().invoke(app, ["run", str(recipe), "1.max_windows=2"])
    assert again.exit_code == 0, again.output
    evals = json.loads((tmp_path / "run" / "1-eval" / "results.json").read_text())
    assert all(e["windows"] == 2 for e in evals)


def test_missing_data_is_refused_before_any_step_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'run'}\nsteps:\n"
                      "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n"
                      f"  - eval: {{data: {tmp_path / 'missing.txt'}}}\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and f"step 1 (eval): data: {tmp_path / 'missing.txt'} does not exist" in result.output
    assert not (tmp_path / "run" / "0-upcycle").exists()


@pytest.mark.parametrize("steps, message", [
    ("  - train: {data: 'builtin:pydoc', seq_len: 1000}\n", "step 1 (train): seq_len: 1000 is larger than the model's"),
    ("  - distill: {data: 'builtin:pydoc', kd_top_k: 100000}\n", "step 1 (distill): kd_top_k: 100000 is more than"),
    ("  - export: {ep_size: 3}\n", "step 1 (export): --ep-size 3 does not divide the 2 experts"),
    ("  - export: {model: checkpoints/tiny-gpt2}\n", "step 1 (export): checkpoints/tiny-gpt2 is not a moe-convert"),
    ("  - eval: {data: 'builtin:pydoc', models: [nowhere]}\n", "step 1 (eval): model(s) nowhere: not a model directory"),
    ("  - train: {model: nowhere, data: 'builtin:pydoc'}\n", "step 1 (train): input nowhere is not a model directory"),
])
def test_what_the_models_decide_is_refused_before_any_step_runs(tmp_path, steps, message):
    """Checks that need the step's model run on the planned configs: the upcycle never starts."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'run'}\nsteps:\n"
                      "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n" + steps)
    dry = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--json"])
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run" / "0-upcycle").exists()
    if "not a model directory" in message:  # the plan itself stands: --dry-run shows it, refused
        assert dry.exit_code == 0 and message.split(": ", 1)[1] in json.loads(dry.stdout)[1]["missing"], dry.output
    else:
        assert dry.exit_code == 2 and message in dry.output


def test_a_run_interrupted_after_a_rerun_step_does_not_skip_the_later_ones(tmp_path):
    """Once a step runs again, every later output is stale until redone, also across an interruption
    (the next run used to skip them: an export and eval of the old model, reported as current)."""
    from moe_convert.pipeline.run import execute

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'run'}\nsteps:\n"
                      "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n"
                      "  - export: {}\n"
                      "  - eval: {data: 'builtin:pydoc', seq_len: 32, max_windows: 4}\n")
    execute(load_recipe(recipe))
    shutil.rmtree(tmp_path / "run" / "0-upcycle")
    exported = (tmp_path / "run" / "1-export").stat().st_mtime_ns

    def stop_at_export(step, status):
        if step.kind == "export" and status == "start":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        execute(load_recipe(recipe, ["upcycle.seed=2"]), on_step=stop_at_export)
    plans = plan_recipe(load_recipe(recipe, ["upcycle.seed=2"]))
    assert [p.complete for p in plans] == [True, False, False]  # the old export and eval no longer count
    state = execute(load_recipe(recipe, ["upcycle.seed=2"]))
    no_eval = tmp_path / "no_eval.yaml"  # a recipe that scores nothing ends with a line, not an empty table
    no_eval.write_text(f"output: {tmp_path / 'run2'}\nsteps:\n"
                       "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n")
    done = CliRunner().invoke(app, ["run", str(no_eval)])
    assert done.exit_code == 0 and "no eval step scored a model; report:" in done.output, done.output
    assert (tmp_path / "run" / "1-export").stat().st_mtime_ns != exported
    assert state["0"]["settings"]["seed"] == 2 and not any("stale_since" in e for e in state.values())


def test_an_hf_export_is_a_model_later_steps_read(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'run'}\nsteps:\n"
                      "  - upcycle: {source: checkpoints/tiny-gpt2, pyramid: '2,4', fidelity: false}\n"
                      "  - export: {format: hf}\n"
                      f"  - eval: {{data: 'builtin:pydoc', models: [{tmp_path / 'run' / '1-export'}]}}\n")
    dry = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--json"])
    assert dry.exit_code == 0 and not json.loads(dry.stdout)[2]["missing"], dry.output


def test_a_bench_step_is_planned_whatever_memory_is_free_now():
    """Free memory is checked when the bench runs, not when the recipe is read (a --dry-run elsewhere)."""
    (step,) = parse_recipe({"steps": [{"bench": {"hidden": 8192, "experts": "512"}}]}).steps
    assert step.spec.hidden == 8192


def test_a_moved_teacher_cache_is_no_changed_setting():
    """`--resume` and `run` share which settings only say where something is kept (config.WHERE_ONLY)."""
    from dataclasses import asdict

    from moe_convert.pipeline.run import changed_settings

    def step(cache):
        doc = {"steps": [{"distill": {"teacher": "t", "data": "d", "kd_top_k": 8, "teacher_cache": cache}}]}
        return parse_recipe(doc).steps[0]
    ran = {"0": {"settings": json.loads(json.dumps(asdict(step("/a").spec), default=str))}}
    assert changed_settings(ran, step("/b")) is None
    assert "kd_top_k: 8 -> 4" in changed_settings(ran, parse_recipe({"steps": [{"distill": {
        "teacher": "t", "data": "d", "kd_top_k": 4, "teacher_cache": "/a"}}]}).steps[0])


def test_a_stale_step_is_planned_to_start_over_not_to_resume(tmp_path):
    """A train step stopped at a checkpoint resumes; once an earlier step has run again after that
    checkpoint (the step is stale), the checkpoint predates its input: the plan no longer says it resumes,
    and `run` starts it over. (The dry-run said "resumes" while `run` started over.)"""
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {out}\nsteps:\n"
                      "  - train: {model: checkpoints/tiny-gpt2, data: 'builtin:pydoc', seq_len: 32, batch_size: 4,"
                      " steps: 4, eval_windows: 4}\n")
    (step,) = load_recipe(recipe).steps
    stopped = CliRunner().invoke(app, ["train", "checkpoints/tiny-gpt2", "--data", "builtin:pydoc", "-o", step.output,
                                       "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--eval-windows", "4",
                                       "--stop-after", "1"])
    assert stopped.exit_code == 0, stopped.output
    (plan,) = plan_recipe(load_recipe(recipe))
    assert "resumes from its checkpoint step-" in plan.note and not plan.starts_over
    mark = {"kind": "train", "stale_since": time.time()}  # as `run` marks it when an earlier step runs
    (out / "run_state.json").write_text(json.dumps({"0": mark}))
    (plan,) = plan_recipe(load_recipe(recipe))
    assert plan.starts_over and "resumes" not in plan.note
    (out / "run_state.json").write_text(json.dumps({"0": {**mark, "stale_since": mark["stale_since"] - 3600}}))
    (plan,) = plan_recipe(load_recipe(recipe))  # a checkpoint made after the mark was made from the new input
    assert not plan.starts_over and "resumes from its checkpoint step-" in plan.note


def test_a_missing_input_is_refused_wherever_the_step_would_run():
    """A complete step whose input is gone is skipped while nothing before it runs; once an earlier step
    runs it would run too, without its input: refused before any work, not half-way through the run."""
    from moe_convert.pipeline.run import StepPlan, statuses

    upcycle = StepPlan(0, "upcycle", "0", complete=False, model=None, peak_bytes=None)
    train = StepPlan(1, "train", "1", complete=True, model=None, peak_bytes=None, missing="input x: not made")
    assert statuses([upcycle, train]) == ["to do", "refused"]
    assert statuses([StepPlan(0, "upcycle", "0", True, None, None), train]) == ["done", "done"]


def test_a_setting_added_since_a_step_ran_counts_at_its_default():
    """A run made before a step kind gained a field (eval's `split`) is not refused for it."""
    from dataclasses import asdict

    from moe_convert.pipeline.recipe import parse_recipe
    from moe_convert.pipeline.run import changed_settings

    step = parse_recipe({"steps": [{"eval": {"data": "d", "models": ["m"]}}]}).steps[0]
    ran = {k: v for k, v in asdict(step.spec).items() if k != "split"}
    assert changed_settings({"0": {"settings": ran}}, step) is None
    assert "max_windows: 3 -> 0" in changed_settings({"0": {"settings": {**ran, "max_windows": 3}}}, step)


def test_the_report_shows_a_measured_student_and_the_plan_notes_it():
    from moe_convert.pipeline.report import drop_lines

    candidates = [{"dropped": [2, 3], "found_by": "angular distance", "score": 0.11, "calibration_ppl": 47.7},
                  {"dropped": [1, 2], "found_by": "front", "score": None, "calibration_ppl": 30870.0}]
    state = {"1": {"kind": "train", "result": {}},
             "2": {"kind": "distill", "result": {"drop": {"dropped": [2, 3], "calibration_tokens": 4096,
                                                          "teacher_ppl": 38.0, "candidates": candidates}}},
             "3": {"kind": "distill", "result": {"drop": None}}}  # --drop-by front: nothing measured
    lines = drop_lines(state)
    assert lines[0] == "## Step 2: student layers (dropped [2, 3], measured on 4,096 training tokens; teacher ppl 38.00)"
    assert "| [2, 3] | angular distance | 0.1100 | 47.70 | yes |" in lines
    assert "| [1, 2] | front | - | 30,870.00 |  |" in lines and len([x for x in lines if x.startswith("## ")]) == 1
    plans = plan_recipe(load_recipe(ROOT / "recipes" / "demo.yaml"))
    assert [p.note for p in plans if p.kind == "distill"] == [MEASURED_NOTE]
    paper = plan_recipe(load_recipe(ROOT / "recipes" / "paper-350m-prmoe-32-64-mos.yaml"))
    assert MEASURED_NOTE not in [p.note for p in paper]  # drop_by: front, the paper's L21 student

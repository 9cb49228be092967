"""`--engine fsdp` (FSDP2) under torchrun --nproc_per_node 2 (gloo) against DDP on 2 processes and one
process: loss curves, saved models, exact resume, the per-process bytes each rank holds, and the
memory plan's figures for the same runs. The refusals run in process."""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_convert.cli import app
from moe_convert.training.config import DistillJob, TrainConfig, TrainJob
from moe_convert.training.memory import plan_job
from moe_convert.training.train import load_model

import conftest
from conftest import CHECKPOINT, ROOT, metrics_of, pydoc_corpus, tiny_gpt2_config

STATE = ("params", "grads", "optimizer", "teacher")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return pydoc_corpus(tmp_path_factory.mktemp("data"), 300)


@pytest.fixture(scope="module")
def prmoe_dir(tmp_path_factory):
    """A tiny PR-MoE made in code: pyramid 4, 8 at layers 1 and 3, dropout off, the shipped tokenizer."""
    from moe_convert.io import load_tokenizer
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    tokenizer = load_tokenizer(CHECKPOINT)
    torch.manual_seed(1)
    cfg = PRMoEConfig(text_config=tiny_gpt2_config(vocab_size=len(tokenizer)).to_dict(), moe_layers=[1, 3],
                      num_experts=[4, 8])
    out = tmp_path_factory.mktemp("prmoe")
    PRMoEForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cache_env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MOE_CONVERT_CACHE": str(tmp_path / "cache")}


def torchrun(args: list[str], env: dict) -> None:
    proc = conftest.torchrun("-m", "moe_convert", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def held(out: Path) -> dict[str, int]:
    """The largest process's bytes of each kind of state, at the run's last step."""
    last = metrics_of(out)[-1]
    return {k: last.get(f"held_{k}", 0) for k in STATE}


def assert_curves_match(a: Path, b: Path, keys=("loss",)) -> None:
    ra, rb = metrics_of(a), metrics_of(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-7), (k, x["step"], x[k], y[k])


def assert_same_model(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir() if p.is_file() and p.name != "metrics.jsonl") == \
        sorted(p.name for p in b.iterdir() if p.is_file() and p.name != "metrics.jsonl")
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    batch = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = (load_model(d).eval()(input_ids=batch).logits for d in (a, b))
    assert torch.allclose(la, lb, rtol=1e-3, atol=1e-3), (la - lb).abs().max()


def assert_plan_close(out: Path, job, devices: int) -> None:
    """The plan's parameters, gradients, optimizer state and teacher within 20% of the counted bytes."""
    plan, counted = plan_job(job, devices=devices), held(out)
    for k in STATE:
        assert abs(getattr(plan, k) - counted[k]) <= 0.2 * max(counted[k], 1), (k, getattr(plan, k), counted[k])


@pytest.mark.slow
def test_fsdp_trains_a_prmoe_as_ddp_does_with_half_the_state(prmoe_dir, data_file, tmp_path):
    """10 steps, same global batch: fsdp on 2 processes == DDP on 2 (losses to 1e-4, saved logits to 1e-3);
    stopped at step 5 and resumed, the same losses bit for bit; each process holds <= 0.55x a DDP one's."""
    env = cache_env(tmp_path)
    args = ["train", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4", "--steps", "10",
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "5", "--eval-windows", "6", "--json"]
    ddp, fsdp, part = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "part"
    torchrun([*args, "-o", str(ddp)], env)
    torchrun([*args, "-o", str(fsdp), "--engine", "fsdp"], env)
    assert_curves_match(ddp, fsdp, ("loss", "ce", "aux"))
    assert_same_model(ddp, fsdp)

    torchrun([*args, "-o", str(part), "--engine", "fsdp", "--stop-after", "5"], env)
    assert (part / "checkpoints" / "step-000005" / "sharded").is_dir()
    for extra, message in [(["--engine", "ddp"], "engine ddp (the checkpoint's: fsdp)"),
                           (["--engine", "fsdp"], "engine: fsdp shards the model over processes and this is one")]:
        refused = CliRunner(env={"MOE_CONVERT_CACHE": env["MOE_CONVERT_CACHE"]}).invoke(
            app, [*args, "-o", str(part), "--resume", *extra])
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert len(refused.output.strip().splitlines()) == 1
    torchrun([*args, "-o", str(part), "--engine", "fsdp", "--resume"], env)
    assert [r["loss"] for r in metrics_of(part)] == [r["loss"] for r in metrics_of(fsdp)]
    assert [r["eval_loss"] for r in metrics_of(part, "eval")] == [r["eval_loss"] for r in metrics_of(fsdp, "eval")]

    mine, theirs = sum(held(fsdp).values()), sum(held(ddp).values())
    assert mine <= 0.55 * theirs, (held(fsdp), held(ddp))
    job = TrainJob(model=str(prmoe_dir), data=str(data_file), output="-", seq_len=32,
                   config=TrainConfig(batch_size=4, engine="fsdp"))
    assert_plan_close(fsdp, job, 2)
    assert_plan_close(ddp, TrainJob(model=str(prmoe_dir), data=str(data_file), output="-", seq_len=32,
                                    config=TrainConfig(batch_size=4)), 2)


@pytest.mark.slow
def test_fsdp_dense_on_two_processes_equals_one(data_file, tmp_path):
    from moe_convert.io import load_tokenizer
    from transformers import GPT2LMHeadModel

    tokenizer = load_tokenizer(CHECKPOINT)
    torch.manual_seed(3)
    model_dir = tmp_path / "dense"
    GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = cache_env(tmp_path)
    args = ["train", str(model_dir), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4", "--steps", "6",
            "--warmup-steps", "1", "--lr", "3e-3", "--eval-every", "0", "--eval-windows", "5", "--json"]
    torchrun([*args, "-o", str(tmp_path / "two"), "--engine", "fsdp"], env)
    one = CliRunner(env={"MOE_CONVERT_CACHE": env["MOE_CONVERT_CACHE"]}).invoke(
        app, [*args, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    assert_curves_match(tmp_path / "one", tmp_path / "two")
    assert metrics_of(tmp_path / "two", "eval")[0]["eval_loss"] == pytest.approx(
        metrics_of(tmp_path / "one", "eval")[0]["eval_loss"], rel=1e-4)
    assert_same_model(tmp_path / "one", tmp_path / "two")


def distill_matches_ddp(prmoe_dir, data_file, tmp_path, engine: list[str], env: dict) -> tuple[list, list]:
    """kd-stop 0.5 over 6 steps under `engine` on 2 processes: per-step loss, CE and KD as DDP's on 2; the
    teacher released at the stop; a run stopped at step 2 and resumed crosses the stop exactly; the same
    saved student. Returns both runs' train records (DDP's, the engine's)."""
    args = ["distill", "--teacher", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4",
            "--steps", "6", "--warmup-steps", "1", "--lr", "2e-3", "--eval-every", "0", "--eval-windows", "5",
            "--kd-stop", "0.5", "--student-layers", "-1", "--drop-by", "front", "--json"]
    ddp, other, part = tmp_path / "ddp", tmp_path / "other", tmp_path / "part"
    torchrun([*args, "-o", str(ddp)], env)
    torchrun([*args, "-o", str(other), *engine], env)
    torchrun([*args, "-o", str(part), *engine, "--stop-after", "2"], env)
    torchrun([*args, "-o", str(part), *engine, "--resume"], env)
    a, b = metrics_of(ddp), metrics_of(other)
    assert [r["kd_on"] for r in b] == [1, 1, 1, 0, 0, 0]
    assert_curves_match(ddp, other, ("loss", "ce"))
    for x, y in zip(a[:3], b[:3]):
        assert y["kd"] == pytest.approx(x["kd"], rel=1e-4, abs=1e-7)
    assert [r["held_teacher"] > 0 for r in b] == [True] * 3 + [False] * 3  # released at the stop
    assert [r["loss"] for r in metrics_of(part)] == [r["loss"] for r in b]
    assert_same_model(ddp, other)
    return a, b


@pytest.mark.slow
def test_fsdp_distill_matches_ddp_and_shards_the_teacher(prmoe_dir, data_file, tmp_path):
    """`distill_matches_ddp` under fsdp, and the teacher (sharded) takes 1/2 per process."""
    a, b = distill_matches_ddp(prmoe_dir, data_file, tmp_path, ["--engine", "fsdp"], cache_env(tmp_path))
    kd_bytes = [sum(r[f"held_{k}"] for k in STATE) for r in (a[0], b[0])]  # step 1: teacher held
    assert kd_bytes[1] <= 0.55 * kd_bytes[0], kd_bytes
    assert b[0]["held_teacher"] <= 0.55 * a[0]["held_teacher"]
    job = DistillJob(model=str(prmoe_dir), data=str(data_file), output="-", seq_len=32, student_layers=-1,
                     drop_by="front", kd_stop=0.5, config=TrainConfig(steps=6, batch_size=4, engine="fsdp"))
    plan, first = plan_job(job, devices=2), b[0]
    for k in STATE:
        assert abs(getattr(plan, k) - first[f"held_{k}"]) <= 0.2 * first[f"held_{k}"], k


def test_engine_refusals_one_line_nothing_written(prmoe_dir, data_file, tmp_path):
    base = ["train", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--steps", "2"]
    for extra, message in [(["--engine", "fsdp"], "engine: fsdp shards the model over processes"),
                           (["--engine", "zero"], "engine: must be one of ddp, fsdp"),
                           (["--engine", "fsdp", "--batch-size", "3", "--grad-accum", "3", "--dry-run", "--devices",
                             "2"], "batch_size: 3 is not divisible by grad_accum (3) x devices (2)"),
                           (["--engine", "fsdp", "--dry-run"], "devices: --engine fsdp shards over devices")]:
        out = tmp_path / "out"
        r = CliRunner().invoke(app, [*base, "-o", str(out), *extra])
        assert r.exit_code == 2 and message in r.output and not out.exists(), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_memory_plans_fit_80_columns(prmoe_dir):
    """Rich renders at 80 columns off a terminal: no truncated cell (an ellipsis) in either plan."""
    r = CliRunner().invoke(app, ["distill", "--teacher", str(prmoe_dir), "--data", "x", "-o", "y", "--dry-run",
                                 "--devices", "2", "--engine", "fsdp", "--steps", "10", "--drop-by", "front"])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and max(map(len, r.output.splitlines())) <= 80
    assert "teacher (frozen)" in r.output and "checkpointed" in r.output
    recipe = ROOT / "recipes" / "gpt2-xl-prmoe-32-128.yaml"
    r = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "train.engine=fsdp", "--devices", "8"])
    assert r.exit_code == 0, r.output
    assert "…" not in r.output and max(map(len, r.output.splitlines())) <= 80, r.output
    assert "fsdp x 8" in r.output


@pytest.mark.slow
def test_the_global_aux_loss_under_fsdp_equals_ddp(prmoe_dir, data_file, tmp_path):
    """--aux-scope global with --grad-accum 2 on 2 processes: the counts' all-reduce and the routing pre-pass
    under FSDP2 give DDP's losses and aux values."""
    env = cache_env(tmp_path)
    args = ["train", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--batch-size", "8", "--steps", "4",
            "--warmup-steps", "1", "--lr", "3e-3", "--eval-every", "0", "--eval-windows", "4", "--aux-scope", "global",
            "--grad-accum", "2", "--json"]
    torchrun([*args, "-o", str(tmp_path / "ddp")], env)
    torchrun([*args, "-o", str(tmp_path / "fsdp"), "--engine", "fsdp"], env)
    assert_curves_match(tmp_path / "ddp", tmp_path / "fsdp", ("loss", "ce", "aux"))

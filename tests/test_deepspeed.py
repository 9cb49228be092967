"""`--engine deepspeed --ep-size 2` (DeepSpeed MoE with expert parallelism, ZeRO-2) under torchrun
--nproc_per_node 2 (gloo, DeepSpeed's CPU accelerator) against DDP on 2 processes and one process: loss
curves, saved models, exact resume, what each rank holds, and the memory plan. The refusals run in process.
(DeepSpeed builds its CPU shared-memory op once per machine on first use, which takes minutes.)"""

import pytest
import torch
from typer.testing import CliRunner

from moe_convert.cli import app
from moe_convert.training.config import DistillJob, TrainConfig, TrainJob
from moe_convert.training.memory import plan_job

from conftest import metrics_of
from test_fsdp import (STATE, assert_curves_match, assert_same_model, cache_env, data_file,  # noqa: F401
                       distill_matches_ddp, held, prmoe_dir, torchrun)

pytest.importorskip("deepspeed")
EP = ["--engine", "deepspeed", "--ep-size", "2"]
PER_EXPERT = 2 * 32 * 37 + 37 + 32  # the tiny GPT-2 host's FFN: c_fc and c_proj with biases


def ds_env(tmp_path) -> dict:
    return {**cache_env(tmp_path), "DS_ACCELERATOR": "cpu"}


def expert_shards(ckpt) -> list[int]:
    """Per rank, the parameters its ZeRO optimizer partition of the expert groups covers."""
    sizes = []
    for rank in (0, 1):
        state = torch.load(ckpt / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        groups = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        parts = state["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        sizes.append(sum(p.numel() for g, p in zip(groups, parts) if g.get("moe")))
    return sizes


def assert_plan_is_held(plan, counted: dict) -> None:
    """The memory plan's state is what the ranks' tensors add up to (up to AdamW's step counters)."""
    for k in STATE:
        assert getattr(plan, k) == pytest.approx(counted[k], rel=1e-3), (k, getattr(plan, k), counted[k])


@pytest.mark.slow
def test_deepspeed_ep_trains_a_prmoe_as_ddp_does(prmoe_dir, data_file, tmp_path):
    """Pyramid 4, 8; 10 steps, same global batch: EP 2 + ZeRO-2 == DDP on 2 processes (losses, aux and grad
    norms to 1e-4, saved logits to 1e-3, the same files); stopped at step 5 and resumed, the same losses bit for
    bit; each rank holds E/2 experts of every layer, and its ZeRO-2 share of the rest; --aux-scope global
    with --grad-accum 2: EP on 2 processes == one process."""
    env = ds_env(tmp_path)
    args = ["train", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4", "--steps", "10",
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "5", "--eval-windows", "6", "--json"]
    ddp, ds, part = tmp_path / "ddp", tmp_path / "ds", tmp_path / "part"
    torchrun([*args, "-o", str(ddp)], env)
    torchrun([*args, "-o", str(ds), *EP], env)
    assert_curves_match(ddp, ds, ("loss", "ce", "aux", "grad_norm"))
    assert [r["eval_loss"] for r in metrics_of(ds, "eval")] == pytest.approx(
        [r["eval_loss"] for r in metrics_of(ddp, "eval")], rel=1e-5)
    assert_same_model(ddp, ds)

    torchrun([*args, "-o", str(part), *EP, "--stop-after", "5"], env)
    ckpt = part / "checkpoints" / "step-000005"
    assert expert_shards(ckpt) == [(4 + 8) // 2 * PER_EXPERT] * 2  # E/2 experts of each layer per rank
    assert len(list((ckpt / "deepspeed").glob("layer_*_expert_*_model_states.pt"))) == 4 + 8
    refused = CliRunner(env={"MOE_CONVERT_CACHE": env["MOE_CONVERT_CACHE"]}).invoke(
        app, [*args, "-o", str(part), "--resume"])
    assert refused.exit_code == 2 and "engine ddp (the checkpoint's: deepspeed)" in refused.output, refused.output
    torchrun([*args, "-o", str(part), *EP, "--resume"], env)
    assert [r["loss"] for r in metrics_of(part)] == [r["loss"] for r in metrics_of(ds)]
    assert [r["eval_loss"] for r in metrics_of(part, "eval")] == [r["eval_loss"] for r in metrics_of(ds, "eval")]

    mine, theirs = held(ds), held(ddp)  # AdamW's step counters: a few bytes apart
    assert mine["grads"] == theirs["grads"] // 2, (mine, theirs)
    assert mine["optimizer"] == pytest.approx(theirs["optimizer"] / 2, rel=1e-3), (mine, theirs)
    plan = plan_job(TrainJob(model=str(prmoe_dir), data=str(data_file), output="-", seq_len=32,
                             config=TrainConfig(batch_size=4, engine="deepspeed", ep_size=2)), devices=2)
    assert_plan_is_held(plan, mine)

    glob = [*args[:7], "8", "--steps", "4", *args[10:], "--aux-scope", "global", "--grad-accum", "2"]
    torchrun([*glob, "-o", str(tmp_path / "ep-global"), *EP], env)
    one = CliRunner(env={"MOE_CONVERT_CACHE": env["MOE_CONVERT_CACHE"]}).invoke(
        app, [*glob, "-o", str(tmp_path / "one-global")])
    assert one.exit_code == 0, one.output
    assert_curves_match(tmp_path / "one-global", tmp_path / "ep-global", ("loss", "ce", "aux"))


@pytest.mark.slow
def test_deepspeed_ep_distill_matches_ddp_and_splits_the_teacher(prmoe_dir, data_file, tmp_path):
    """`distill_matches_ddp` under EP 2 + ZeRO-2, and the PR-MoE teacher holds half its experts per process."""
    a, b = distill_matches_ddp(prmoe_dir, data_file, tmp_path, EP, ds_env(tmp_path))
    assert a[0]["held_teacher"] - b[0]["held_teacher"] == 4 * (4 + 8) // 2 * PER_EXPERT  # half its experts, fp32
    job = DistillJob(model=str(prmoe_dir), data=str(data_file), output="-", seq_len=32, student_layers=-1,
                     drop_by="front", kd_stop=0.5, config=TrainConfig(steps=6, batch_size=4, engine="deepspeed", ep_size=2))
    assert_plan_is_held(plan_job(job, devices=2), {k: b[0][f"held_{k}"] for k in STATE})


def test_deepspeed_refusals_one_line_nothing_written(prmoe_dir, data_file, tmp_path, monkeypatch):
    from moe_convert.convert.summary import load_config
    from moe_convert.errors import MoEConvertError
    from moe_convert.training.deepspeed_engine import check_deepspeed

    base = ["train", str(prmoe_dir), "--data", str(data_file), "--seq-len", "32", "--steps", "2"]
    cases = [(["--ep-size", "2"], "ep_size: 2 splits experts over processes, which --engine ddp does not do"),
             (["--engine", "deepspeed", "--ep-size", "2"], "ep_size: 2 does not divide the 1 processes"),
             (["--engine", "deepspeed", "--ep-size", "0"], "ep_size: must be >= 1"),
             (["--engine", "deepspeed", "--ep-size", "3", "--dry-run", "--devices", "2"],
              "devices: --ep-size 3 does not divide 2 devices")]
    for extra, message in cases:
        out = tmp_path / "out"
        r = CliRunner().invoke(app, [*base, "-o", str(out), *extra])
        assert r.exit_code == 2 and message in r.output and not out.exists(), r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    with pytest.raises(MoEConvertError, match="--ep-size 8 does not divide the 4 experts of MoE layer 1"):
        check_deepspeed(8, 8, load_config(prmoe_dir))  # the pyramid's small layer
    with pytest.raises(MoEConvertError, match="teacher_cache: under --ep-size > 1"):
        DistillJob(model="t", data="d", output="o", kd_top_k=4, teacher_cache="c",
                   config=TrainConfig(engine="deepspeed", ep_size=2))
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)  # as if not installed
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*base, "-o", str(out), "--engine", "deepspeed"])
    assert r.exit_code == 2 and not out.exists(), r.output
    assert r.output.strip() == "error: engine: deepspeed is not installed; pip install 'moe-convert[deepspeed]'"


def test_deepspeed_layer_is_ours_both_ways(host, deepspeed_moe):
    """One process, ep 1: a PR-MoE layer moved into DeepSpeed's MoE (GPT-2's Conv1D experts, Llama's
    transposed gated ones) gives our layer's output, aux loss, load and gradients on fresh random input,
    and gathered back it is our layer again, tensor for tensor."""
    from conftest import tiny_prmoe
    from moe_convert.model.modeling import host_spec
    from moe_convert.training.deepspeed_engine import DeepSpeedPRMoE, import_deepspeed

    import_deepspeed().init_distributed(dist_backend="gloo")  # adopts the fixture's process group
    model = tiny_prmoe(host, num_experts=(4, 6), seed=5)
    ours = model.moe_layers()[1]
    theirs = DeepSpeedPRMoE(ours, 1, host_spec(model.config.text_config.model_type))
    theirs.moe.set_deepspeed_parallelism()
    x = torch.randn(3, 7, 32) * 3
    y_ours, y_theirs = ours(x), theirs(x)
    assert (ours.expert_counts > 0).sum() > 1  # several experts really used
    torch.testing.assert_close(y_theirs, y_ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.aux_loss, ours.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.load.prob_sum, ours.load.prob_sum)
    assert torch.equal(theirs.load.counts, ours.load.counts)
    (y_ours.square().sum() + ours.aux_loss).backward()
    (y_theirs.square().sum() + theirs.aux_loss).backward()
    torch.testing.assert_close(theirs.moe.deepspeed_moe.gate.wg.weight.grad, ours.router.weight.grad,
                               rtol=1e-4, atol=1e-6)
    back = theirs.gathered()
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name

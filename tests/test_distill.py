"""`distill`: staged KD on the shipped checkpoint — exact resume across the KD stop, the teacher
released at the switch, `--kd-stop 0` equal to plain training, two processes equal to one, and
one-line errors for bad input."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import CHECKPOINT, ROOT, VOCAB, metrics_of, pydoc_corpus, tiny_prmoe, torchrun
from moe_convert.cli import app
from moe_convert.training.distill import DistillJob, StagedKD, build_student, plan_student, run_distill
from moe_convert.errors import MoEConvertError
from moe_convert.training.train import TrainConfig, TrainJob, load_model, run_training



@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return pydoc_corpus(tmp_path_factory.mktemp("data"), 600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The shipped checkpoint upcycled to a 4-layer PR-MoE (experts 2 and 4 at layers 1 and 3)."""
    from moe_convert.convert.upcycle import upcycle

    out = tmp_path_factory.mktemp("teacher") / "t"
    upcycle(str(CHECKPOINT), out, experts="2,4", init="noise:0.01", fidelity=False)
    # no dropout: one process and two draw different dropout masks, and this file compares them
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def job(teacher, data_file, out, **kw):
    cfg = TrainConfig(**{"steps": 6, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "eval_every": 0,
                         "eval_windows": 4, **kw.pop("cfg", {})})
    return DistillJob(model=str(teacher), data=str(data_file), output=str(out), seq_len=32, config=cfg, **kw)


def losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["kd_on"]) for r in metrics_of(out)]


@pytest.mark.parametrize("stop_at", [2, 4])  # before and after the KD stop (steps 1-3 use KD)
def test_resume_across_the_kd_stop_is_exact(teacher, data_file, tmp_path, stop_at):
    full = run_distill(job(teacher, data_file, tmp_path / "full", kd_stop=0.5), progress=False)
    assert full.kd_steps == 3
    recorded = json.loads((tmp_path / "full" / "layer_drop.json").read_text())  # --drop-by measured, the default
    assert recorded["dropped"] == full.drop.dropped == full.plan.dropped
    ref = losses(tmp_path / "full")
    assert [kd for _, _, kd in ref] == [1, 1, 1, 0, 0, 0]
    ce = [r["ce"] for r in metrics_of(tmp_path / "full")]  # logged on every step, with KD on or off
    assert full.train.train_ce == pytest.approx(sum(ce) / len(ce))  # the summary's CE, not the KD mix

    part = job(teacher, data_file, tmp_path / "part", kd_stop=0.5)
    run_distill(part, stop_after=stop_at, progress=False)
    assert not (tmp_path / "part" / "config.json").exists()  # a stopped run does not look complete
    with pytest.raises(MoEConvertError, match=r"kd_stop 0.9 \(the checkpoint's: 0.5\)"):  # refused, nothing changed
        run_distill(job(teacher, data_file, tmp_path / "part", kd_stop=0.9), resume=True, progress=False)
    other = shutil.copytree(teacher, tmp_path / "other-teacher")  # the same teacher, one tensor changed
    weights = load_file(other / "model.safetensors")
    weights["host.lm_head.weight" if "host.lm_head.weight" in weights else sorted(weights)[0]] += 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoEConvertError, match="resume: teacher config"):
        run_distill(job(other, data_file, tmp_path / "part", kd_stop=0.5), resume=True, progress=False)
    run_distill(part, resume=True, progress=False)
    assert losses(tmp_path / "part") == ref
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_gives_what_the_teacher_gives(teacher, data_file, tmp_path):
    """Top-K KD with the teacher's logits kept: a second run reads every window back (no teacher forward)
    and logs exactly the first run's losses, which are those of top-K KD without a cache."""
    runs = {}
    for name in ("cold", "warm"):
        run_distill(job(teacher, data_file, tmp_path / name, kd_stop=1.0, kd_top_k=8, teacher_cache=str(tmp_path / "tc"),
                        cfg={"steps": 12}), progress=False)
        runs[name] = metrics_of(tmp_path / name)
    assert [r["loss"] for r in runs["warm"]] == [r["loss"] for r in runs["cold"]]
    assert all(r["teacher_cached"] == 1.0 for r in runs["warm"])
    (entries,) = [d for d in (tmp_path / "tc").iterdir()]
    assert entries.name.endswith("-fp32-top8-T1.0-v2") and len(list(entries.glob("*.safetensors"))) > 0
    nocache = run_distill(job(teacher, data_file, tmp_path / "plain", kd_stop=1.0, kd_top_k=8, cfg={"steps": 12}),
                          progress=False)
    assert [r["loss"] for r in metrics_of(tmp_path / "plain")] == [r["loss"] for r in runs["cold"]]
    assert nocache.kd_steps == 12


def test_partly_kept_batches_and_damaged_entries(tmp_path):
    """A batch with some windows kept gives their kept values (not the teacher's of this batch), and an
    entry that cannot be read is computed again instead of stopping the run with a traceback."""
    from moe_convert.training.teacher_cache import TeacherCache

    torch.manual_seed(0)
    teacher = tiny_prmoe("gpt2", seed=1).eval()
    student = tiny_prmoe("gpt2", seed=2)
    cache = TeacherCache(tmp_path, "config+weights abc", 4, 1.0, "fp32")
    kd = StagedKD(teacher, kd_steps=10, alpha=0.5, temperature=1.0, top_k=4, cache=cache)
    batch = torch.randint(0, VOCAB, (3, 9))
    kd.loss(student, batch[:2], 0)  # keeps windows 0 and 1
    files = [cache._file(w) for w in batch]
    kept = [cache._read(f) for f in files[:2]]
    kept[0] = (kept[0][0] + 0.25, *kept[0][1:])  # what another batch's forward might have left there
    save_file({"values": kept[0][0], "ids": kept[0][1].int(), "rest_lse": kept[0][2]}, files[0])
    files[1].write_bytes(b"\x00" * 10)  # damaged
    logs = kd.loss(student, batch, 1)
    assert logs["teacher_cached"] == 0 and all(f.is_file() for f in files)  # rewritten and added
    assert torch.equal(cache._read(files[0])[0], kept[0][0])  # the kept entry stays, and is what was used:
    got = kd.loss(student, batch, 2)
    assert got["teacher_cached"] == 1 and torch.equal(got["kd"], logs["kd"])


def test_a_bad_teacher_cache_is_refused_before_the_old_output_goes(teacher, data_file, tmp_path):
    run_distill(job(teacher, data_file, tmp_path / "s", cfg={"steps": 2}), progress=False)
    (tmp_path / "file").write_text("x")
    for cache, message in [(tmp_path / "file", "Not a directory"), (tmp_path / "s" / "tc", "is inside")]:
        bad = job(teacher, data_file, tmp_path / "s", kd_top_k=4, teacher_cache=str(cache), cfg={"steps": 2})
        with pytest.raises((MoEConvertError, OSError), match=message):
            run_distill(bad, overwrite=True, progress=False)
        assert (tmp_path / "s" / "config.json").exists()  # the finished student is still there


def test_teacher_is_released_at_the_switch():
    model = torch.nn.Linear(3, 3)
    ref = weakref.ref(model)
    kd = StagedKD(model, kd_steps=2, alpha=0.5, temperature=1.0)
    del model
    kd.on_step(1)
    assert ref() is not None
    kd.on_step(2)
    gc.collect()
    assert ref() is None and kd.teacher is None


def test_kd_stop_zero_is_plain_training(teacher, data_file, tmp_path):
    kd0 = run_distill(job(teacher, data_file, tmp_path / "kd0", kd_stop=0.0), progress=False)
    # the same student, saved, then trained by `train` with the same settings
    t = load_model(teacher)
    student = build_student(t, plan_student(t.config, None, kd0.plan.kept))
    student.save_pretrained(tmp_path / "student0")
    from moe_convert.io import load_tokenizer

    load_tokenizer(teacher).save_pretrained(tmp_path / "student0")
    plain = job(teacher, data_file, tmp_path / "plain").config
    run_training(TrainJob(model=str(tmp_path / "student0"), data=str(data_file), output=str(tmp_path / "plain"),
                          seq_len=32, config=plain), progress=False)
    kd0 = [(r["step"], r["loss"]) for r in metrics_of(tmp_path / "kd0")]
    ref = [(r["step"], r["loss"]) for r in metrics_of(tmp_path / "plain")]
    assert kd0 == ref


def _cli(args):
    return CliRunner().invoke(app, ["distill", *args])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--student-layers", "4"], "student_layers"),
        (["--student-layers", "0"], "student_layers"),
        (["--student-layers", "-4"], "student_layers"),
        (["--kd-stop", "1.5"], "kd_stop"),
        (["--temperature", "0"], "temperature"),
        (["--temperature", "inf"], "temperature: must be > 0 and at most"),  # NaN weights, saved as complete
        (["--temperature", "1e300"], "temperature: must be > 0 and at most"),  # T^2 overflowed: a traceback
        (["--alpha", "2"], "alpha"),
        (["--kd-stop", "0.1"], "rounds to no KD step"),  # 0.1 of 2 steps
        (["--kd-stop", "0.9"], "rounds to KD at every step"),  # 0.9 of 2 steps
        (["--keep-layers", "0,3", "--student-layers", "3"], "give one of them"),
        (["--teacher-cache", "tc"], "give --kd-top-k too"),
        (["--kd-top-k", "0"], "kd_top_k: must be >= 1"),
        (["--kd-top-k", "100000", "--teacher-cache", "tc"], "is more than the teacher's"),
        (["--kd-top-k", "100000"], "is more than the teacher's"),  # without a cache too: before any output
    ],
)
def test_bad_options_one_line_nothing_written(teacher, data_file, tmp_path, extra, message):
    out = tmp_path / "s"
    r = _cli(["--teacher", str(teacher), "--data", str(data_file), "-o", str(out), "--steps", "2", *extra])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_dry_run_shows_the_measured_choice_and_writes_nothing(teacher, data_file, tmp_path):
    out = tmp_path / "s"
    args = ["--teacher", str(teacher), "--data", str(data_file), "-o", str(out), "--seq-len", "32"]
    r = _cli([*args, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    drop = plan["drop"]
    assert plan["student"]["kept"] == drop["kept"] and len(drop["dropped"]) == 1 and plan["teacher"] > 0
    assert drop["dropped"] == min(drop["candidates"], key=lambda c: c["calibration_ppl"])["dropped"]
    r = _cli([*args, "--dry-run"])
    assert r.exit_code == 0 and "dropped layers, measured on" in r.output and "student ppl" in r.output, r.output
    assert f"teacher layers {drop['dropped'][0]} dropped" in r.output
    r = _cli([*args, "--dry-run", "--drop-by", "front"])
    assert r.exit_code == 0 and "measured" not in r.output and "teacher layers 1 dropped" in r.output, r.output
    assert not out.exists()


def test_teacher_that_is_not_a_model(data_file, tmp_path):
    out = tmp_path / "s"
    r = _cli(["--teacher", str(data_file.parent), "--data", str(data_file), "-o", str(out)])
    assert r.exit_code == 2 and "not a model directory" in r.output and not out.exists()


def test_tokenizer_larger_than_teacher_vocabulary(teacher, data_file, tmp_path):
    import shutil

    from moe_convert.training.data import load_documents, train_bpe_tokenizer

    mismatched = tmp_path / "t"
    shutil.copytree(teacher, mismatched)
    for f in mismatched.glob("tokenizer*"):
        f.unlink()
    train_bpe_tokenizer(load_documents("builtin:pydoc").texts[:800], vocab_size=3000).save_pretrained(mismatched)
    out = tmp_path / "s"
    r = _cli(["--teacher", str(mismatched), "--data", str(data_file), "-o", str(out)])
    assert r.exit_code == 2 and "tokenizer" in r.output and not out.exists(), r.output


@pytest.mark.slow
def test_two_processes_share_one_teacher_cache(teacher, data_file, tmp_path):
    """torchrun --nproc_per_node 2 writing one --teacher-cache: a second two-process run and a one-process
    run read every window back (no teacher forward) and log exactly the first run's losses."""
    args = ["distill", "--teacher", str(teacher), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4",
            "--steps", "3", "--warmup-steps", "1", "--lr", "2e-3", "--eval-every", "0", "--eval-windows", "4",
            "--kd-stop", "1", "--kd-top-k", "8", "--teacher-cache", str(tmp_path / "tc"), "--student-layers", "-1",
            "--json"]
    for name in ("cold", "warm"):
        proc = torchrun("-m", "moe_convert", *args, "-o", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    cold, warm, one = (metrics_of(tmp_path / name) for name in ("cold", "warm", "one"))
    assert [r["teacher_cached"] for r in cold] == [0, 0, 0]
    assert [r["teacher_cached"] for r in warm] == [r["teacher_cached"] for r in one] == [1, 1, 1]
    assert [r["kd"] for r in warm] == [r["kd"] for r in cold]
    assert [r["kd"] for r in one][0] == pytest.approx(cold[0]["kd"], rel=1e-5)  # the same teacher values, one shard


def test_two_processes_reproduce_one(teacher, data_file, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): same global batch, same losses as one process (KD and CE phases)."""
    args = ["distill", "--teacher", str(teacher), "--data", str(data_file), "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--warmup-steps", "1", "--lr", "2e-3", "--eval-every", "0", "--eval-windows", "4",
            "--kd-stop", "0.5", "--student-layers", "-1", "--json"]
    proc = torchrun("-m", "moe_convert", *args, "-o", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two, one = metrics_of(tmp_path / "two"), metrics_of(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and [r["kd_on"] for r in two] == [1, 1, 0, 0]
    # Step 1 sees identical weights: CE and KD (means over equal shards) agree to fp32 rounding. The MoE
    # aux loss is computed per process (as DeepSpeed does per rank), so its small gradient differs and
    # later steps agree to float tolerance of that, not bit for bit.
    assert two[0]["ce"] == pytest.approx(one[0]["ce"], rel=1e-5)
    assert two[0]["kd"] == pytest.approx(one[0]["kd"], rel=1e-4, abs=1e-6)
    for a, b in zip(two[1:], one[1:]):
        assert a["ce"] == pytest.approx(b["ce"], rel=2e-3)


@pytest.mark.slow
def test_staged_kd_beats_no_kd_on_held_out_perplexity(tmp_path):
    """The issue's quality check, end to end on the shipped checkpoint (benchmarks/distill_staged_kd.py):
    upcycle -> train the teacher 500 steps -> distill one layer shallower for 200 steps, staged and without KD
    (the benchmark's full-KD run is left out: the assertion does not read it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MOE_CONVERT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "benchmarks/distill_staged_kd.py", "-o", str(tmp_path / "mos"),
                           "--kd-stops", "0.5,0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "mos" / "results.json").read_text())
    ppl = {name: r["student_ppl"] for name, r in results.items()}
    assert ppl["staged KD (0.5)"] < ppl["no KD (0.0)"], ppl

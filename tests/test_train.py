"""The training loop: exact resume (also across a loss-phase switch), accumulation and multi-process
equivalence, the LR schedule, PR-MoE CE/aux logging, and the saved model (recipes: test_run.py)."""

import inspect
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moe_convert.cli import app
from moe_convert.io import load_tokenizer
from moe_convert.training.data import load_documents, load_packed, split_documents, train_bpe_tokenizer
from moe_convert.training.train import TrainConfig, Trainer, causal_lm_loss, load_model

from conftest import metrics_of, tiny_gpt2_config, torchrun

DATA = "builtin:pydoc"
SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get("MOE_CONVERT_CACHE")
    os.environ["MOE_CONVERT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MOE_CONVERT_CACHE")
    else:
        os.environ["MOE_CONVERT_CACHE"] = old


@pytest.fixture(scope="module")
def tokenizer():
    texts = split_documents(load_documents(DATA).texts, 0.1)["train"][:500]
    return train_bpe_tokenizer(texts, vocab_size=300)


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_dir(tokenizer, tmp_path_factory):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = tiny_gpt2_config(n_layer=2, vocab_size=len(tokenizer), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return save(GPT2LMHeadModel(cfg), tokenizer, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def moe_dir(tokenizer, tmp_path_factory):
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    torch.manual_seed(1)
    cfg = PRMoEConfig(text_config=tiny_gpt2_config(vocab_size=len(tokenizer)).to_dict(), moe_layers=[1, 3],
                      num_experts=[3, 4])
    return save(PRMoEForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("moe"))


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(model), "--data", DATA, "-o", str(out), "--seq-len", str(SEQ), "--batch-size", "4",
            "--steps", "8", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "4", "--eval-windows", "8",
            "--json", *extra]


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_of(out)}


def test_resume_continues_exactly(dense_dir, moe_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    whole = json.loads(invoke(train_args(dense_dir, full)).stdout)
    stopped = invoke(train_args(dense_dir, part, "--stop-after", "4"))
    assert (json.loads(stopped.stdout)["complete"], json.loads(stopped.stdout)["total_steps"]) == (False, 8)
    assert "stopped after step 4 of 8" in stopped.stderr  # said on stderr, --json or not
    unfinished = CliRunner().invoke(app, ["eval", str(part), "--data", DATA])
    assert unfinished.exit_code == 2 and "unfinished training run (checkpoint step-000004)" in unfinished.output
    assert not (part / "config.json").exists(), "a stopped run must not look like a finished model"
    assert (part / "checkpoints" / "step-000004" / "trainer_state.json").exists()
    assert sorted(losses(part)) == [1, 2, 3, 4]
    for extra, message in [(["--lr", "1"], "lr 1.0 (the checkpoint's: 0.003)"),
                           (["--aux-scope", "global"], "aux_scope global (the checkpoint's: micro)"),
                           (["--seq-len", "16"], "seq_len 16 (the checkpoint's: 32)"),
                           (["--stop-after", "3"], "already at step 4")]:  # refused before anything changes
        refused = CliRunner().invoke(app, train_args(dense_dir, part, "--resume", *extra))
        assert refused.exit_code == 2 and message in refused.output, refused.output
    refused = CliRunner().invoke(app, train_args(moe_dir, part, "--resume"))  # another model
    assert refused.exit_code == 2 and "resume: model config+weights" in refused.output, refused.output
    assert sorted(losses(part)) == [1, 2, 3, 4]
    moved = shutil.copytree(dense_dir, tmp_path / "moved")  # the same model elsewhere may resume
    resumed = json.loads(invoke(train_args(moved, part, "--resume", "--eval-every", "2")).stdout)  # logging may change
    assert resumed["complete"] and resumed["train_ce"] == whole["train_ce"] == whole["train_loss"]  # dense: CE is the loss
    assert resumed["train_loss"] == whole["train_loss"]  # its last 10 steps span the resume
    again = CliRunner().invoke(app, train_args(dense_dir, part, "--resume"))
    assert again.exit_code == 2 and "is already complete" in again.output, again.output
    a, b = losses(full), losses(part)
    assert sorted(a) == list(range(1, 9)) and a == b  # bit-identical at every step (dropout on)
    wa, wb = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[8] < a[1]


def test_a_refused_resume_loads_no_model(dense_dir, tmp_path, monkeypatch):
    from moe_convert.training import train

    invoke(train_args(dense_dir, tmp_path / "o", "--stop-after", "2"))
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    refused = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "o", "--resume", "--lr", "1"))
    assert refused.exit_code == 2 and "lr 1.0 (the checkpoint's: 0.003)" in refused.output, refused.output


def test_resume_compares_model_and_data_by_content(dense_dir, tmp_path):
    """Other weights at the same place, or other text in the same file, are refused; a copy elsewhere resumes."""
    texts = load_documents("builtin:pydoc").texts
    data, copy = tmp_path / "a.txt", tmp_path / "b.txt"
    data.write_text("\n\n".join(texts[:300]))
    shutil.copy(data, copy)

    def args(model, text, *extra):
        return ["train", str(model), "--data", str(text), "-o", str(tmp_path / "o"), "--seq-len", "32",
                "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--eval-windows", "2", *extra]
    invoke(args(dense_dir, data, "--stop-after", "2"))
    other = shutil.copytree(dense_dir, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[len(weights) // 2]  # a tensor in the middle of the file
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    refused = CliRunner().invoke(app, args(other, data, "--resume"))
    assert refused.exit_code == 2 and "resume: model config+weights" in refused.output, refused.output
    data.write_text("\n\n".join(texts[300:600]))  # same path, other text
    refused = CliRunner().invoke(app, args(dense_dir, data, "--resume"))
    assert refused.exit_code == 2 and "resume: data windows" in refused.output, refused.output
    assert json.loads(invoke(args(dense_dir, copy, "--resume", "--json")).stdout)["complete"]  # same text elsewhere


class Counter:
    """Extra checkpointed state: counts the steps that ran in this object's lifetime plus restored ones."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, d):
        self.n = d["n"]


def phased_run(dense_dir, tokenizer, out, resume=False, stop_after=None):
    """A two-phase loss (extra penalty before step 3, as distill's KD switch) with an on_step hook."""
    counter, calls = Counter(), []

    def loss_fn(model, batch, step):
        logs = causal_lm_loss(model, batch, step)
        if step < 3:
            logs["penalty"] = model(input_ids=batch).logits.float().pow(2).mean()
            logs["loss"] = logs["loss"] + 0.1 * logs["penalty"]
        return logs

    def on_step(step):
        calls.append(step)
        counter.n += 1

    data = load_packed(DATA, tokenizer, SEQ)
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=1, lr=3e-3, eval_every=0, eval_windows=4)
    trainer = Trainer(load_model(dense_dir), data, cfg, out, loss_fn=loss_fn, on_step=on_step,
                      extra_state=[counter], progress=False)
    trainer.fit(resume=resume, stop_after=stop_after)
    return calls, counter.n


def test_resume_across_a_phase_switch_is_exact(dense_dir, tokenizer, tmp_path):
    calls, n = phased_run(dense_dir, tokenizer, tmp_path / "a")
    assert calls == list(range(6)) and n == 6
    phased_run(dense_dir, tokenizer, tmp_path / "b", stop_after=2)
    calls, n = phased_run(dense_dir, tokenizer, tmp_path / "b", resume=True)
    assert calls == [2, 3, 4, 5] and n == 6  # the hook sees the resumed step first; extra state restored
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_grad_accumulation_matches_the_full_batch(tokenizer, tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(2)
    model_dir = save(GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, vocab_size=len(tokenizer))), tokenizer,
                     tmp_path / "m")
    invoke(train_args(model_dir, tmp_path / "a1", "--steps", "5"))
    invoke(train_args(model_dir, tmp_path / "a4", "--steps", "5", "--grad-accum", "4"))
    a, b = losses(tmp_path / "a1"), losses(tmp_path / "a4")
    assert a.keys() == b.keys() and all(math.isclose(a[s], b[s], rel_tol=1e-5) for s in a)


def test_lr_schedule_warmup_then_cosine(dense_dir, tmp_path):
    invoke(train_args(dense_dir, tmp_path / "o", "--min-lr-ratio", "0.2"))
    lrs = [r["lr"] for r in metrics_of(tmp_path / "o")]
    peak, warm, steps = 3e-3, 2, 8
    want = [peak * (s + 1) / warm if s < warm else
            peak * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))) for s in range(steps)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert [r["step"] for r in metrics_of(tmp_path / "o", "eval")] == [4, 8]


def test_no_held_out_split_trains_without_evals(dense_dir, tmp_path):
    """--eval-fraction 0: every document trains, no eval runs (the resume fingerprint hashed an empty split)."""
    result = json.loads(invoke(train_args(dense_dir, tmp_path / "o", "--eval-fraction", "0", "--steps", "2")).stdout)
    assert result["complete"] and result["eval_loss"] is None and metrics_of(tmp_path / "o", "eval") == []
    assert sorted(losses(tmp_path / "o")) == [1, 2]


def test_prmoe_logs_ce_and_aux_and_saves_a_loadable_model(moe_dir, tmp_path):
    out = tmp_path / "o"
    result = json.loads(invoke(train_args(moe_dir, out, "--steps", "10")).stdout)
    train = metrics_of(out)
    for r in train:  # loss = ce + aux_loss_coef * aux, as the model defines it
        assert r["loss"] == pytest.approx(r["ce"] + 0.01 * r["aux"], rel=1e-5) and r["aux"] >= 0.99
    evals = [r["eval_loss"] for r in metrics_of(out, "eval")]
    assert evals[-1] < evals[0] and result["eval_loss"] == pytest.approx(evals[-1])
    model = load_model(out)
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # save_pretrained wrote 0600
    assert type(model).__name__ == "PRMoEForCausalLM" and [m.experts.num_experts for m in model.moe_layers()] == [3, 4]
    ev = json.loads(invoke(["eval", str(out), "--data", DATA, "--seq-len", str(SEQ), "--max-windows", "8",
                            "--json"]).stdout)
    assert ev["loss"] == pytest.approx(result["eval_loss"], rel=1e-4)  # same 8 held-out windows
    assert ev["ppl"] == pytest.approx(math.exp(ev["loss"]))
    assert (ev["windows"], ev["tokens"], ev["scored_tokens"]) == (8, 8 * SEQ, 8 * (SEQ - 1))  # the last has no next


def test_mixed_precision_and_refusals(dense_dir, moe_dir, tmp_path):
    out = tmp_path / "bf16"
    result = json.loads(invoke(train_args(dense_dir, out, "--steps", "3", "--mixed-precision", "bf16")).stdout)
    assert math.isfinite(result["train_loss"])
    # PR-MoE evals run the experts without autograd, under autocast
    moe = json.loads(invoke(train_args(moe_dir, tmp_path / "moe-bf16", "--steps", "4", "--mixed-precision", "bf16")).stdout)
    assert math.isfinite(moe["eval_loss"]) and len(metrics_of(tmp_path / "moe-bf16", "eval")) == 1
    refused = CliRunner().invoke(app, train_args(dense_dir, out))  # non-empty output without --overwrite
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    both = CliRunner().invoke(app, train_args(dense_dir, out, "--resume", "--overwrite"))  # on a finished output
    assert both.exit_code == 2 and "give one of them" in both.output and (out / "config.json").exists(), both.output
    bad = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "x", "--batch-size", "6", "--grad-accum", "4"))
    assert bad.exit_code == 2 and "not divisible" in bad.output
    for extra, message in [(["--lr", "inf"], "lr: must be a finite number"), (["--stop-after", "0"], "--stop-after")]:
        bad = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "z", *extra))
        assert bad.exit_code == 2 and message in bad.output, bad.output
    nothing = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "never", "--resume"))
    assert nothing.exit_code == 2 and "no complete checkpoint" in nothing.output and not (tmp_path / "never").exists()
    for extra in (["--batch-size", "0"], ["--max-windows", "-1"]):
        bad = CliRunner().invoke(app, ["eval", str(dense_dir), "--data", DATA, "--seq-len", str(SEQ), *extra])
        assert bad.exit_code == 2 and "eval: batch_size must be >= 1" in bad.output, bad.output
    files = sorted(p.name for p in dense_dir.iterdir())
    into_input = CliRunner().invoke(app, train_args(dense_dir, dense_dir, "--overwrite"))
    assert into_input.exit_code == 2 and "is the input" in into_input.output, into_input.output
    assert sorted(p.name for p in dense_dir.iterdir()) == files  # the model is untouched
    (tmp_path / "a-file").write_text("x")
    into_file = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "a-file"))
    assert into_file.exit_code == 2 and "is a file" in into_file.output, into_file.output
    if not torch.cuda.is_available():
        fp16 = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "y", "--mixed-precision", "fp16"))
        assert fp16.exit_code == 2 and "fp16 needs a GPU" in fp16.output


def test_cli_defaults_are_the_config_defaults():
    from typer.main import get_command

    params = {p.name: p.default for p in get_command(app).commands["train"].params}
    for name, param in inspect.signature(TrainConfig).parameters.items():
        assert params[name] == param.default, name


def torchrun_vs_one(model_dir: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """Train 4 steps with batch 4 under torchrun --nproc_per_node 2 (gloo) and in this process."""
    args = train_args(model_dir, tmp_path / "two", "--steps", "4", *extra)
    proc = torchrun("-m", "moe_convert", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["processes"] == 2  # printed once, by rank 0
    invoke(train_args(model_dir, tmp_path / "one", "--steps", "4", *extra))
    return tmp_path / "one", tmp_path / "two"


@pytest.mark.slow
def test_two_processes_match_one(tokenizer, tmp_path):
    """Per-process micro-batch 2 on 2 processes == one process with batch 4, to float tolerance."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(3)
    model_dir = save(GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, vocab_size=len(tokenizer))), tokenizer,
                     tmp_path / "m")
    load_packed(DATA, tokenizer, SEQ)  # fill the cache once
    one, two = torchrun_vs_one(model_dir, tmp_path)
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(math.isclose(a[s], b[s], rel_tol=1e-5) for s in a), (a, b)
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow
def test_two_processes_train_a_prmoe(moe_dir, tmp_path):
    """DDP with experts that get no tokens. The aux loss is computed per process over its own tokens
    (as DeepSpeed does per rank), so only the first step's CE (same weights) must match exactly."""
    load_packed(DATA, load_tokenizer(moe_dir), SEQ)
    one, two = torchrun_vs_one(moe_dir, tmp_path)
    ce = [{r["step"]: r["ce"] for r in metrics_of(d)} for d in (one, two)]
    assert ce[0][1] == pytest.approx(ce[1][1], rel=1e-5)
    assert all(ce[0][s] == pytest.approx(ce[1][s], rel=1e-2) for s in ce[0])
    assert load_model(two).moe_layers()


def logits_of(model_dir: Path) -> torch.Tensor:
    windows = torch.randint(0, 300, (4, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return load_model(model_dir).eval()(input_ids=windows).logits


@pytest.mark.slow
def test_global_aux_scope_trains_as_one_batch(moe_dir, tmp_path):
    """--aux-scope global (dropout off): 2 processes with 2 accumulated micro-batches each, and 4
    micro-batches in one process, train as one process with the whole batch at once: losses to 1e-5,
    the saved models' logits to 1e-4. The micro scope's accumulation does not, by more than that."""
    load_packed(DATA, load_tokenizer(moe_dir), SEQ)
    one, two = torchrun_vs_one(moe_dir, tmp_path, "--aux-scope", "global", "--grad-accum", "2")
    invoke(train_args(moe_dir, tmp_path / "four", "--steps", "4", "--aux-scope", "global", "--grad-accum", "4"))
    invoke(train_args(moe_dir, tmp_path / "micro", "--steps", "4", "--grad-accum", "4"))
    whole = losses(one)
    for run in (two, tmp_path / "four"):
        assert losses(run).keys() == whole.keys() == {1, 2, 3, 4}
        assert all(math.isclose(losses(run)[s], whole[s], rel_tol=1e-5) for s in whole), (losses(run), whole)
        torch.testing.assert_close(logits_of(run), logits_of(one), rtol=0, atol=1e-4)
        assert metrics_of(run)[-1]["load_entropy_global_3"] == pytest.approx(metrics_of(one)[-1]["load_entropy_global_3"])
    assert not all(math.isclose(losses(tmp_path / "micro")[s], whole[s], rel_tol=1e-5) for s in whole)




def test_eval_refuses_a_checkpoint_with_missing_weights(dense_dir, tmp_path):
    """transformers would initialise a missing tensor at random and score the model as if whole."""
    broken = shutil.copytree(dense_dir, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    drop = next(k for k in sorted(weights) if ".mlp." in k)
    save_file({k: v for k, v in weights.items() if k != drop}, broken / "model.safetensors", metadata={"format": "pt"})
    res = CliRunner().invoke(app, ["eval", str(broken), "--data", DATA, "--seq-len", str(SEQ), "--max-windows", "4"])
    assert res.exit_code == 2 and "lacks 1 weight(s)" in res.output and drop in res.output, res.output
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated: a SafetensorError traceback
    res = CliRunner().invoke(app, ["eval", str(broken), "--data", DATA, "--seq-len", str(SEQ), "--max-windows", "4"])
    assert res.exit_code == 2 and "model: could not load" in res.output and len(res.output.strip().splitlines()) == 1


def test_eval_of_one_split_needs_no_window_in_the_other(dense_dir, tmp_path):
    from moe_convert.training.data import is_eval_document
    from moe_convert.training.train import perplexity

    text = next(t for t in (f"alpha{i} beta gamma " * 300 for i in range(50)) if not is_eval_document(t.strip(), 0.1))
    (tmp_path / "one.txt").write_text(text)  # one document (no blank line), in the train split
    args = ["eval", str(dense_dir), "--data", str(tmp_path / "one.txt"), "--seq-len", str(SEQ), "--json"]
    held_out = CliRunner().invoke(app, args)
    assert held_out.exit_code == 2 and "(0 of 1 documents; a .txt file's documents are separated by blank lines)" \
        in held_out.output, held_out.output
    train = json.loads(invoke([*args, "--split", "train", "--max-windows", "4"]).stdout)
    assert train["windows"] == 4 and math.isfinite(train["ppl"])
    held = next(t for t in (f"delta{i} beta gamma " * 300 for i in range(50)) if is_eval_document(t.strip(), 0.1))
    (tmp_path / "held.txt").write_text(held)  # one document, held out: no train split for the baseline
    scored = json.loads(invoke([*args[:3], str(tmp_path / "held.txt"), *args[4:], "--max-windows", "4"]).stdout)
    assert scored["windows"] == 4 and scored["unigram_ppl"] is None
    assert perplexity(1e4) == math.inf and math.isnan(perplexity(float("nan")))  # a diverged model: no crash


def test_log_cadence_survives_a_stop_and_resume(dense_dir, tmp_path):
    """--log-every 2 stopped at an odd step: the resumed log has the records of an uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    invoke(train_args(dense_dir, full, "--steps", "6", "--log-every", "2", "--save-every", "3"))
    invoke(train_args(dense_dir, part, "--steps", "6", "--log-every", "2", "--save-every", "3", "--stop-after", "3"))
    invoke(train_args(dense_dir, part, "--steps", "6", "--log-every", "2", "--save-every", "3", "--resume"))
    assert [r["step"] for r in metrics_of(part)] == [r["step"] for r in metrics_of(full)] == [2, 4, 6]
    assert losses(part) == losses(full)


def test_a_run_that_is_all_warmup_says_how_far_the_lr_rose(dense_dir, tmp_path):
    res = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "o", "--steps", "2", "--warmup-steps", "10"))
    assert res.exit_code == 0 and "the lr rose to 0.0006, 20% of --lr" in " ".join(res.stderr.split()), res.stderr


def test_an_interrupted_final_save_leaves_no_half_model(dense_dir, tokenizer, tmp_path):
    """Ctrl-C while the final model is written: nothing that looks like a model is left (the temporary
    folder held config.json beside a partial model.safetensors)."""
    data = load_packed(DATA, tokenizer, SEQ)
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=1, eval_every=0, eval_windows=4)
    trainer = Trainer(load_model(dense_dir), data, cfg, tmp_path / "o", progress=False)
    trainer.fit()

    class InterruptedTokenizer:  # what Ctrl-C during the tokenizer's write looks like to save_model
        def save_pretrained(self, path):
            (Path(path) / "tokenizer.json").write_text("{")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(InterruptedTokenizer())
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.jsonl"]


def test_a_diverged_run_stops_with_an_error_and_no_final_model(dense_dir, tmp_path):
    """An lr far too high: the loss turns inf/NaN; the run stops there with a one-line error, logs that
    step, and writes no model that looks complete."""
    res = CliRunner().invoke(app, train_args(dense_dir, tmp_path / "o", "--lr", "1e12", "--clip", "0",
                                             "--warmup-steps", "0", "--save-every", "1"))
    assert res.exit_code == 2 and "training diverged: the loss is" in res.output, res.output
    logged = metrics_of(tmp_path / "o")
    assert not math.isfinite(logged[-1]["loss"]) and all(math.isfinite(r["loss"]) for r in logged[:-1])
    assert not (tmp_path / "o" / "config.json").exists()

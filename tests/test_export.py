"""`moe-convert export`: the inference layout against the source weights, EP splits, the HF and
DeepSpeed formats (loaded into real `deepspeed.moe.layer.MoE` modules), and bad input."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import ROOT, save_tiny_prmoes, tiny_gpt2_config
from moe_convert.cli import app
from moe_convert.convert.export import export
from moe_convert.formats import MANIFEST_KEY, SHARED_FILE, SINGLE_FILE, experts_file

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """host -> (model, saved dir)."""
    return save_tiny_prmoes(tmp_path_factory, seed=10)


def read(path):
    with safe_open(str(path), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, json.loads(h.metadata()[MANIFEST_KEY])


def test_safetensors_layout_holds_the_source_weights(saved, host, tmp_path):
    model, src = saved[host]
    result = export(src, tmp_path / "out")
    assert result.files == [SINGLE_FILE]
    tensors, manifest = read(tmp_path / "out" / SINGLE_FILE)
    expected = {k.removeprefix("host."): v for k, v in model.state_dict().items()
                if not (k == "host.lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert torch.equal(tensors[k], v), k
    assert manifest["format"] == "moe-convert-inference" and manifest["version"] == 1
    assert manifest["top_k"] == 1 and manifest["dtype"] == "fp32" and manifest["host"] == host
    assert manifest["source"] == str(src.resolve())  # traceable wherever the export goes
    assert [(e["layer"], e["experts"]) for e in manifest["layers"]] == [(1, 4), (3, 6)]
    d, f = model.config.text_config.hidden_size, 37
    first = manifest["layers"][0]["prefix"]
    w = "w_in" if host == "gpt2" else "w_gate"
    assert tensors[f"{first}.experts.{w}"].shape == (4, d, f)  # stacked [E, in, out]
    assert tensors[f"{first}.experts.w_out"].shape == (4, f, d)


def test_bf16_export_casts_every_float(saved, tmp_path):
    model, src = saved["llama"]
    export(src, tmp_path / "out", dtype="bf16")
    tensors, manifest = read(tmp_path / "out" / SINGLE_FILE)
    assert manifest["dtype"] == "bf16" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    ref = model.state_dict()["host.model.layers.1.mlp.experts.w_up"]
    assert torch.equal(tensors["model.layers.1.mlp.experts.w_up"], ref.to(torch.bfloat16))


def test_ep_size_2_files_recombine_to_the_unsplit_weights(saved, host, tmp_path):
    _, src = saved[host]
    export(src, tmp_path / "full")
    result = export(src, tmp_path / "ep", ep_size=2)
    assert result.files == [SHARED_FILE, experts_file(0, 2), experts_file(1, 2)]
    full, _ = read(tmp_path / "full" / SINGLE_FILE)
    shared, manifest = read(tmp_path / "ep" / SHARED_FILE)
    ranks = [read(tmp_path / "ep" / experts_file(r, 2))[0] for r in range(2)]
    assert manifest["ep_size"] == 2 and manifest["layers"][1]["ranks"] == [[0, 3], [3, 6]]
    assert not any(".experts." in k for k in shared) and set(ranks[0]) == set(ranks[1])
    assert all(".experts." in k for k in ranks[0])
    for k in ranks[0]:
        assert ranks[0][k].shape[0] == full[k].shape[0] // 2
    recombined = {**shared, **{k: torch.cat([ranks[0][k], ranks[1][k]]) for k in ranks[0]}}
    assert set(recombined) == set(full)
    for k, v in full.items():
        assert torch.equal(recombined[k], v), k


def test_ep_size_that_does_not_divide_is_refused(saved, tmp_path):
    _, src = saved["gpt2"]
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out"), "--ep-size", "4"])
    assert res.exit_code == 2
    assert "does not divide the 6 experts of MoE layer 3" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # no half output left


def test_hf_format_round_trips(saved, tmp_path):
    from moe_convert.model.modeling import PRMoEForCausalLM

    model, src = saved["gpt2"]
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "hf"), "--format", "hf",
                              "--max-shard-size", "100KB", "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded with an index
    umask = os.umask(0)
    os.umask(umask)
    files = [f for f in (tmp_path / "hf").iterdir() if f.is_file()]
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}  # save_pretrained's shards were 0600
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    assert json.loads(res.stdout)["bytes"] == weights  # weights only, as inspect counts
    again = PRMoEForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 101, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_deepspeed_format_loads_into_deepspeed_moe(saved, host, tmp_path, deepspeed_moe):
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    model, src = saved[host]
    export(src, tmp_path / "ds", fmt="deepspeed")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    host_cfg = model.config.text_config
    for entry, layer in zip(manifest["layers"], model.moe_layers()):
        sd, meta = read(tmp_path / "ds" / entry["file"])
        assert meta["layers"] == manifest["layers"]
        expert = GPT2MLP(37, host_cfg) if host == "gpt2" else LlamaMLP(host_cfg)
        ds = deepspeed_moe(host_cfg.hidden_size, expert, num_experts=entry["experts"], k=manifest["top_k"],
                           use_residual=True, drop_tokens=False).eval()
        ds.load_state_dict(sd, strict=True)
        x = torch.randn(3, 7, host_cfg.hidden_size) * 3
        with torch.no_grad():
            ours = layer(x)
            theirs, aux, _ = ds(x)
        assert (layer.expert_counts > 0).sum() > 1  # several experts really used
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux, layer.aux_loss, rtol=1e-5, atol=1e-6)
    non_moe, _ = read(tmp_path / "ds" / "non_moe.safetensors")
    assert not any(".mlp.router" in k or ".experts." in k for k in non_moe)


def test_not_our_model_is_a_one_line_error(tmp_path):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(tmp_path / "dense")
    res = runner.invoke(app, ["export", str(tmp_path / "dense"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "is not a moe-convert PR-MoE model" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def test_config_that_disagrees_with_the_weights_is_a_one_line_error(saved, tmp_path):
    import shutil

    _, src = saved["gpt2"]
    bad = shutil.copytree(src, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts"] = [4, 16]  # layer 3 holds 6
    (bad / "config.json").write_text(json.dumps(cfg))
    for fmt in ("safetensors", "deepspeed", "hf"):
        res = runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / fmt), "--format", fmt])
        assert res.exit_code == 2 and "MoE layer 3 has 6 experts in" in res.output and "config.json says 16" in res.output
        assert not (tmp_path / fmt).exists()


def test_unknown_format_and_existing_output(saved, tmp_path):
    _, src = saved["gpt2"]
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out"), "--format", "onnx"])
    assert res.exit_code == 2 and "--format 'onnx' is not known" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out"), "--max-shard-size", "1GB"])
    assert res.exit_code == 2 and "--max-shard-size applies to --format hf only" in res.output, res.output
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out"), "--format", "hf", "--max-shard-size", "x"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists(), res.output
    (tmp_path / "out").mkdir()
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "already exists" in res.output
    (tmp_path / "file").write_text("x")  # the file system refuses: one line too
    res = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "file" / "out")])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [f"error: File exists: {tmp_path / 'file'}"]


def test_json_is_all_of_stdout_in_a_fresh_process(saved, tmp_path):
    """`--json` output parses as it is, even where a library logs to stdout while the command runs
    (DeepSpeed, when installed, does as accelerate imports it: only in a fresh process)."""
    _, src = saved["gpt2"]
    proc = subprocess.run([sys.executable, "-m", "moe_convert", "export", str(src), "-o", str(tmp_path / "hf"),
                           "--format", "hf", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["format"] == "hf"


def test_output_that_is_the_model_is_refused(saved):
    _, src = saved["llama"]
    files = sorted(p.name for p in src.iterdir())
    r = runner.invoke(app, ["export", str(src), "-o", str(src), "--overwrite"])
    assert r.exit_code == 2 and "is the input" in r.output, r.output
    assert sorted(p.name for p in src.iterdir()) == files


def test_default_dtype_is_the_stored_one(saved, tmp_path):
    """A bf16 model exports as bf16 unless --dtype says otherwise (it was widened to fp32, twice the size)."""
    model, _ = saved["llama"]
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the shared fixture stays fp32
    auto = export(tmp_path / "bf16", tmp_path / "auto")
    tensors, manifest = read(tmp_path / "auto" / SINGLE_FILE)
    assert auto.dtype == manifest["dtype"] == "bf16" and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    wide = export(tmp_path / "bf16", tmp_path / "fp32", dtype="fp32")
    assert wide.dtype == "fp32" and wide.bytes > 1.9 * auto.bytes


def test_tokenizer_of_vocab_and_merges_only_loads_from_the_export(tmp_path):
    """A dense model whose tokenizer is vocab.json + merges.txt and a tokenizer_config.json without a class
    (which comes from config.json): the PR-MoE model and its export, whose configs do not name it, get the
    tokenizer saved in full."""
    import shutil

    from tokenizers import Tokenizer

    from moe_convert.io import load_tokenizer
    from moe_convert.convert.upcycle import upcycle

    dense = shutil.copytree(ROOT / "checkpoints" / "tiny-gpt2", tmp_path / "dense")
    Tokenizer.from_file(str(dense / "tokenizer.json")).model.save(str(dense))  # vocab.json + merges.txt
    (dense / "tokenizer.json").unlink()
    (dense / "tokenizer_config.json").write_text('{"model_max_length": 256}')  # the old hub layout: no class
    upcycle(str(dense), tmp_path / "moe", pyramid="2,4", fidelity=False)
    result = export(tmp_path / "moe", tmp_path / "out")
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(result.tokenizer_files)
    text = "def main(): return sorted(x)"
    want = load_tokenizer(dense)(text)["input_ids"]
    assert load_tokenizer(tmp_path / "moe")(text)["input_ids"] == want
    assert load_tokenizer(tmp_path / "out")(text)["input_ids"] == want


def test_generate_checks_the_tokenizer_before_loading_weights(saved, tmp_path, monkeypatch):
    from moe_convert.inference import runtime

    export(saved["gpt2"][1], tmp_path / "out")  # no tokenizer: one that cannot be read is put there
    (tmp_path / "out" / "tokenizer.json").write_text("{not json")
    monkeypatch.setattr(runtime, "load_runtime", lambda *a, **k: pytest.fail("loaded the weights first"))
    res = runner.invoke(app, ["generate", str(tmp_path / "out"), "--prompt", "x", "--max-new-tokens", "2"])
    assert res.exit_code == 2 and "tokenizer: could not load the tokenizer" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_export_job_knows_every_registered_format():
    """`ExportJob` validates --format without importing torch, against the registry's own names."""
    from moe_convert.convert.config import EXPORT_FORMATS
    from moe_convert.convert.export import FORMATS

    assert tuple(FORMATS) == EXPORT_FORMATS

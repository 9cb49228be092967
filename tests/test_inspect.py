"""`inspect`: paper sizes from config alone (meta device, fast), and exact counts against real models."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from moe_convert.cli import app
from moe_convert.model.layout import build_layout
from moe_convert.model.configuration_prmoe import PRMoEConfig
from moe_convert.convert.summary import summarize, summarize_config

from conftest import tiny_prmoe

# (d_model, layout, paper total): GPT-2 vocab, 2048 positions, 24 layers, 16 heads (paper Table 1/4)
PAPER = {
    "350M+MoE-128": (1024, dict(pyramid="128", residual=False), 13.15e9),
    "350M+PR-MoE-32/64": (1024, dict(pyramid="32,64"), 4.12e9),
    "1.3B+MoE-128": (2048, dict(pyramid="128", residual=False), 52.47e9),
    "1.3B+PR-MoE-64/128": (2048, dict(pyramid="64,128"), 31.39e9),
}


def paper_config(d: int, layout: dict) -> PRMoEConfig:
    from transformers import GPT2Config

    host = GPT2Config(vocab_size=50257, n_positions=2048, n_embd=d, n_layer=24, n_head=16)
    return PRMoEConfig.from_layout(host, build_layout(24, **layout))


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_sizes_from_config_alone(name, tmp_path):
    d, layout, total = PAPER[name]
    cfg = paper_config(d, layout)
    summarize_config(cfg)  # warm the imports
    start = time.perf_counter()
    s = summarize_config(cfg)
    assert time.perf_counter() - start < 1.0
    assert abs(s.total_params - total) / total < 0.005, s.total_params
    assert [r.index for r in s.layers if r.experts] == list(range(1, 24, 2))
    # active: the dense model (+ the residual FFN) + one expert per MoE layer -> ~350M / 1.3B class
    dense_class = 0.35e9 if d == 1024 else 1.3e9
    extra_ffn = 12 * (8 * d * d + 5 * d) if layout.get("residual", True) else 0
    assert s.active_params == pytest.approx(dense_class + extra_ffn, rel=0.05)
    # the CLI reads a config file alone, no weights
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "config.json"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["total_params"] == s.total_params


def test_counts_match_a_real_model(host, tmp_path):
    model = tiny_prmoe(host, moe_layers=(1, 3), num_experts=(3, 5), num_experts_per_tok=2)
    model.save_pretrained(tmp_path)
    s = summarize(tmp_path)
    real_total = sum(p.numel() for p in model.parameters())
    per_expert = {i: sum(p.numel() for p in m.experts.parameters()) // m.experts.num_experts
                  for i, m in zip((1, 3), model.moe_layers())}
    assert s.total_params == real_total
    assert s.active_params == real_total - (3 - 2) * per_expert[1] - (5 - 2) * per_expert[3]
    assert [(r.ffn, r.experts) for r in s.layers] == [("dense", 0), ("PR-MoE", 3), ("dense", 0), ("PR-MoE", 5)]
    layers = model.host.get_submodule("transformer.h" if host == "gpt2" else "model.layers")
    assert [r.params for r in s.layers] == [sum(p.numel() for p in layer.parameters()) for layer in layers]
    weights = [f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]
    assert s.size_on_disk == sum(f.stat().st_size for f in weights) and s.dtype == "float32"


def test_dense_model_with_tied_embeddings_counts_them_once(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=24, n_head=2, vocab_size=97, n_positions=16))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    out = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert out.exit_code == 0, out.output
    s = summarize(tmp_path)
    assert s.total_params == s.active_params == sum(p.numel() for p in model.parameters())
    assert s.dtype == "bfloat16" and "dense" in out.output


def test_inspect_bad_path_is_one_line(tmp_path):
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "config" in out.output


def test_unknown_model_type_is_a_short_line(tmp_path):
    (tmp_path / "c.json").write_text('{"model_type": "nosuch"}')
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "c.json")])
    assert out.exit_code == 2 and "model_type 'nosuch' is not known" in out.output and len(out.output) < 200, out.output


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gpt2", "n_layer": "x"}, "is not a model config"),  # a field of the wrong type
    ({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}},
     "model_type 'llava' is not a causal LM"),  # a wrapper of a supported host
])
def test_configs_transformers_refuses_are_one_line(tmp_path, config, message):
    (tmp_path / "c.json").write_text(json.dumps(config))
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "c.json")])
    assert out.exit_code == 2 and message in out.output and len(out.output.strip().splitlines()) == 1, out.output


def test_inspect_of_corrupt_weights_is_one_line(tmp_path):
    tiny_prmoe("gpt2", seed=2).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:40])
    out = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert out.exit_code == 2 and "model.safetensors" in out.output and len(out.output.strip().splitlines()) == 1


def test_size_on_disk_counts_the_weights_the_model_loads(tmp_path):
    """Other formats and checkpoints beside the weights (a hub snapshot's .bin, a trainer's optimizer.pt)."""
    from safetensors.torch import load_file

    model = tiny_prmoe("gpt2", seed=2)
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").stat().st_size
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    torch.save({"state": torch.zeros(1000)}, tmp_path / "optimizer.pt")
    assert summarize(tmp_path).size_on_disk == weights


@pytest.mark.parametrize("fmt, ep", [("safetensors", 2), ("deepspeed", 1)])
def test_inspect_an_export_from_its_manifest(tmp_path, fmt, ep):
    """The same counts as the model it was made from, its own weight files' size and dtype."""
    from moe_convert.convert.export import export

    model = tiny_prmoe(num_experts=(4, 6))
    model.save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "e", fmt, "bf16", ep)
    source, exported = summarize(tmp_path / "m"), summarize(tmp_path / "e")
    assert (exported.total_params, exported.active_params) == (source.total_params, source.active_params)
    assert [r.experts for r in exported.layers] == [r.experts for r in source.layers]
    assert exported.dtype == "bfloat16" and exported.export.endswith(f"v1, ep size {ep}")
    weights = sum(f.stat().st_size for f in (tmp_path / "e").iterdir() if f.suffix == ".safetensors")
    assert exported.size_on_disk == weights


def test_inspect_names_the_missing_files_of_an_incomplete_export(tmp_path):
    from moe_convert.errors import MoEConvertError
    from moe_convert.convert.export import export

    tiny_prmoe(num_experts=(4, 6)).save_pretrained(tmp_path / "m")
    export(tmp_path / "m", tmp_path / "e", ep_size=2)
    (tmp_path / "e" / "experts-00001-of-00002.safetensors").unlink()
    with pytest.raises(MoEConvertError, match="incomplete export, experts-00001-of-00002.safetensors missing"):
        summarize(tmp_path / "e")

"""`moe-convert from-deepspeed`: the DeepSpeed layout back to our model directory, unchanged (a round trip)
and after training inside real `deepspeed.moe.layer.MoE` modules (their outputs are the oracle)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import save_tiny_prmoes
from moe_convert.cli import app
from moe_convert.convert.export import export
from moe_convert.model.modeling import PRMoEForCausalLM

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_prmoes(tmp_path_factory, seed=40)


def test_round_trip_is_exact(saved, host, tmp_path):
    model, src = saved[host]
    export(src, tmp_path / "ds", fmt="deepspeed")
    res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "back"), "--json"])
    assert res.exit_code == 0, res.output
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, back = (json.loads((p / "config.json").read_text()) for p in (src, tmp_path / "back"))
    for key in ("moe_layers", "num_experts", "num_experts_per_tok", "residual", "capacity_factor", "min_capacity",
                "aux_loss_coef"):
        assert back[key] == ours[key], key
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(PRMoEForCausalLM.from_pretrained(tmp_path / "back").eval()(ids).logits,
                                   model(ids).logits, rtol=0, atol=0)


def test_layers_trained_in_deepspeed_come_back(saved, host, tmp_path, deepspeed_moe):
    """Each layer file loaded into DeepSpeed's MoE, trained a step there, saved again in bf16 (as a bf16 run
    saves it; the export was fp32): our model's layers, written in the export's fp32, then compute what
    DeepSpeed's modules compute."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    model, src = saved[host]
    export(src, tmp_path / "ds", fmt="deepspeed")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    cfg = model.config.text_config
    modules = []
    for entry in manifest["layers"]:
        file = tmp_path / "ds" / entry["file"]
        expert = GPT2MLP(37, cfg) if host == "gpt2" else LlamaMLP(cfg)
        ds = deepspeed_moe(cfg.hidden_size, expert, num_experts=entry["experts"], k=manifest["top_k"],
                           use_residual=True, drop_tokens=False)
        ds.load_state_dict(load_file(file), strict=True)
        opt = torch.optim.SGD(ds.parameters(), lr=0.5)
        out, aux, _ = ds(torch.randn(4, 8, cfg.hidden_size) * 3)
        (out.pow(2).mean() + aux).backward()
        opt.step()
        ds.to(torch.bfloat16).float()  # the weights a bf16 save keeps, exactly
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in ds.state_dict().items()}, file)
        modules.append(ds.eval())
    res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert {t.dtype for t in load_file(tmp_path / "back" / "model.safetensors").values()} == {torch.float32}
    back = PRMoEForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = torch.randn(3, 7, cfg.hidden_size) * 3
    with torch.no_grad():
        for ds, layer, old in zip(modules, back.moe_layers(), model.moe_layers()):
            theirs = ds(x)[0]
            torch.testing.assert_close(layer(x), theirs, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(old(x), theirs, atol=1e-4)  # the step really changed the layer


def test_bad_input_is_one_line(saved, tmp_path):
    _, src = saved["gpt2"]
    res = runner.invoke(app, ["from-deepspeed", str(src), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "is not a `moe-convert export --format deepspeed` directory" in res.output
    export(src, tmp_path / "ds", fmt="deepspeed")
    layer_file = tmp_path / "ds" / "moe_layer_003.safetensors"
    sd = load_file(layer_file)
    expert = "deepspeed_moe.experts.deepspeed_experts"
    no_router = {k: v for k, v in sd.items() if k != "deepspeed_moe.gate.wg.weight"}
    extra_expert = {**sd, f"{expert}.6.c_fc.bias": sd[f"{expert}.0.c_fc.bias"].clone()}  # the manifest says 6
    odd_shape = {**sd, f"{expert}.2.c_fc.weight": torch.zeros(5, 7)}
    for change, message in [(no_router, "has no tensor deepspeed_moe.gate.wg.weight"),
                            (extra_expert, "holds 1 tensor(s) the manifest's model has no place for"),
                            (odd_shape, "tensors differ in shape")]:
        save_file(change, layer_file)
        res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "y")])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "y").exists()
    save_file(sd, layer_file)
    res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "y"), "--dtype", "fp8"])
    assert res.exit_code == 2 and "--dtype 'fp8' is not known" in res.output and not (tmp_path / "y").exists()
    good = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for field, value in [("file", None), ("experts", "6"), ("prefix", 3), ("layer", None)]:
        manifest = json.loads(json.dumps(good))
        manifest["layers"][0][field] = value
        (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
        res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "y")])
        assert res.exit_code == 2 and "incomplete or damaged manifest" in res.output, (field, res.output)
    del manifest["layers"][0]["file"]
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["from-deepspeed", str(tmp_path / "ds"), "-o", str(tmp_path / "y")])
    assert res.exit_code == 2 and "incomplete or damaged manifest" in res.output

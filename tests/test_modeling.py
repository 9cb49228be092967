"""PRMoEForCausalLM: round-trips, generate(), Auto classes, trust_remote_code, training, bad configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig

from conftest import HOST_CONFIGS, VOCAB, tiny_prmoe
from moe_convert.model.configuration_prmoe import PRMoEConfig
from moe_convert.errors import MoEConvertError
from moe_convert.model.modeling import PRMoEForCausalLM
from moe_convert.model.moe import PRMoELayer


@pytest.fixture
def saved(tmp_path, host):
    model = tiny_prmoe(host, seed=3).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_save_reload_identical_logits_and_generate(saved):
    model, path = saved
    reloaded = PRMoEForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    prompt = ids[:1, :4]
    a = model.generate(prompt, max_new_tokens=8, do_sample=False)
    b = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert a.shape == (1, 12) and torch.equal(a, b)


def test_generate_with_cache_equals_full_forward(saved):
    model, _ = saved
    prompt = torch.randint(0, VOCAB, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():  # greedy by hand, no cache
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_auto_classes_after_import(saved):
    model, path = saved
    assert isinstance(AutoConfig.from_pretrained(path), PRMoEConfig)
    auto = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(auto) is PRMoEForCausalLM
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_import_is_light_and_registers_lazily():
    code = (
        "import sys, moe_convert; assert 'torch' not in sys.modules, 'import pulled torch';"
        "from transformers import AutoConfig, AutoModelForCausalLM;"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING;"
        "from moe_convert.model.configuration_prmoe import PRMoEConfig;"
        "assert MODEL_FOR_CAUSAL_LM_MAPPING[PRMoEConfig].__name__ == 'PRMoEForCausalLM'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_model_runs_on_the_cpu_kernels_once_imported_from_the_package():
    """Importing the model from the package registers the CPU kernels' no-grad versions of its ops (what
    eval and a distill teacher run); the checkpoint's own copy of the code runs the plain ones."""
    code = (
        "from moe_convert.model.modeling import PRMoEForCausalLM\n"
        "from moe_convert.model.routing import BACKENDS\n"
        "assert all(BACKENDS[op].no_grad.__module__ == 'moe_convert.inference.kernels' for op in ('loop', 'linear'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# What `save_pretrained` copies beside the weights: `model/`'s files, which import only each other.
REMOTE_CODE = {"modeling.py", "configuration_prmoe.py", "moe.py", "routing.py", "layout.py", "errors.py"}


def test_trust_remote_code_without_moe_convert(saved, tmp_path_factory):
    """The checkpoint carries the model's code and nothing else of ours (at most 900 lines), and a fresh
    process where moe_convert cannot be imported loads it from that code alone, with the same logits."""
    model, path = saved
    lines = {f.name: len(f.read_text().splitlines()) for f in path.glob("*.py")}
    assert set(lines) == REMOTE_CODE and sum(lines.values()) <= 900, lines
    ids = torch.randint(0, VOCAB, (2, 9))
    out = tmp_path_factory.mktemp("remote") / "logits.pt"
    # -I -S: no PYTHONPATH, working directory, user site or .pth files (so no editable install of ours),
    # only the directories torch and transformers were imported from
    deps = sorted({str(Path(m.__file__).parents[1]) for m in (torch, transformers)})
    code = (
        f"import sys\nsys.path[:0] = {deps!r}\n"
        "try:\n    import moe_convert\nexcept ImportError:\n    pass\n"
        "else:\n    raise AssertionError(f'moe_convert is importable here: {moe_convert.__file__}')\n"
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules.'), type(m).__module__\n"
        f"torch.save(m(torch.tensor({ids.tolist()})).logits.detach(), {str(out)!r})\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path_factory.mktemp("modules")))
    subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True, env=env, cwd=tmp_path_factory.mktemp("cwd"))
    with torch.no_grad():  # our CPU kernels here, plain torch there: fp32 rounding, not exact bits
        torch.testing.assert_close(torch.load(out), model(ids).logits, rtol=1e-5, atol=1e-6)


def test_config_json_records_layout(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "prmoe" and cfg["moe_layers"] == [1, 3] and cfg["num_experts"] == [3, 5]
    assert cfg["auto_map"]["AutoModelForCausalLM"].endswith("PRMoEForCausalLM")


def test_training_reduces_loss_and_reaches_every_moe_parameter(host):
    model = tiny_prmoe(host, seed=5).train()
    ids = torch.randint(0, VOCAB, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        out = model(ids, labels=ids)
        assert torch.allclose(out.loss, out.ce_loss + model.config.aux_loss_coef * out.aux_loss)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for layer in model.moe_layers():
                for name, p in layer.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(host, enable):
    """`activation_checkpointing_enable(every_n_layers=1)` (what HF's Trainer calls) or its deprecated alias:
    the MoE layers recompute inside the host's checkpointed decoder layers; dropout off, so both runs
    compute the same function."""
    model = tiny_prmoe(host, seed=6).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, VOCAB, (3, 10))

    def loss_and_grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), out.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    plain = loss_and_grads()
    getattr(model, enable)(**({"every_n_layers": 1} if enable == "activation_checkpointing_enable" else {}))
    assert model.is_gradient_checkpointing
    ckpt = loss_and_grads()
    torch.testing.assert_close(ckpt[:2], plain[:2], rtol=0, atol=0)
    for name, g in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_return_dict_false_gives_the_hosts_tuple(host):
    """As the host returns it: (loss, logits, ...) with labels, logits first without (the loss holds the aux term)."""
    model = tiny_prmoe(host, seed=7).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        full = model(ids, labels=ids)
        loss, logits, *_ = model(ids, labels=ids, return_dict=False)
        no_labels = model(ids, return_dict=False)
    assert torch.equal(loss, full.loss) and torch.equal(logits, full.logits)
    assert torch.equal(no_labels[0], full.logits)


def test_reentrant_checkpointing_is_refused(host):
    """Reentrant checkpointing runs the forward without autograd: the aux loss would lose its gradient."""
    model = tiny_prmoe(host, seed=8)
    with pytest.raises(ValueError, match="use_reentrant=True would cut the MoE aux loss"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True would cut the MoE aux loss"):
        model.activation_checkpointing_enable({"use_reentrant": True}, every_n_layers=1)


def test_moe_layers_placed_as_configured(host):
    model = tiny_prmoe(host, moe_layers=(0, 2), num_experts=(2, 7), num_experts_per_tok=2, residual=False)
    layers = model.moe_layers()
    assert [m.experts.num_experts for m in layers] == [2, 7]
    assert all(m.top_k == 2 and not m.residual for m in layers)
    assert sum(isinstance(m, PRMoELayer) for m in model.modules()) == 2


@pytest.mark.parametrize(
    "layout, field",
    [
        (dict(moe_layers=[1], num_experts=[0]), "num_experts"),
        (dict(moe_layers=[1], num_experts=[2], num_experts_per_tok=3), "top_k"),
        (dict(moe_layers=[4], num_experts=[2]), "moe_layers"),
        (dict(moe_layers=[1, 3], num_experts=[2]), "num_experts"),
        (dict(moe_layers=[1], num_experts=[2], capacity_factor=0.0), "capacity_factor"),
    ],
)
def test_bad_layout_names_the_field(layout, field):
    with pytest.raises(MoEConvertError, match=field):
        PRMoEConfig(text_config=HOST_CONFIGS["gpt2"]().to_dict(), **layout)


def test_unknown_host_names_supported_ones():
    cfg = PRMoEConfig(text_config=BertConfig(num_hidden_layers=2).to_dict(), moe_layers=[1], num_experts=[2])
    with pytest.raises(MoEConvertError, match="gpt2, llama, mistral, qwen2"):
        PRMoEForCausalLM(cfg)

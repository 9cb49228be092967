"""`moe-convert upcycle`: fidelity, DeepSpeed's copy init, layouts, streaming memory, input spellings, bad input."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import CHECKPOINT, HOST_CONFIGS, tiny_prmoe
from moe_convert.cli import app
from moe_convert.model.layout import build_layout
from moe_convert.convert.upcycle import upcycle

DENSE_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def save_dense(path, host="gpt2", seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, DENSE_CLASSES[host])(HOST_CONFIGS[host](**overrides))
    with torch.no_grad():  # a trained model's biases are not zero; neither are ours
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {host: save_dense(root / host, host, seed=7) for host in HOST_CONFIGS}


def load_pair(src, out):
    from transformers import AutoModelForCausalLM

    from moe_convert.model.modeling import PRMoEForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    moe, info = PRMoEForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return dense, moe.eval()


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def test_preserve_default_reproduces_dense_and_spreads_tokens(dense_dirs, host, tmp_path):
    out = tmp_path / "moe"
    s = upcycle(str(dense_dirs[host]), out, pyramid="3,5")
    assert s.init == "preserve" and s.experts_per_layer == [3, 5]
    assert s.max_abs_logit_diff <= 1e-3 and abs(s.kl) < 1e-6
    assert all(share <= 3 / e for share, e in zip(s.max_expert_share, [3, 5]))
    # independent oracle: fresh random tokens, models loaded here
    dense, moe = load_pair(dense_dirs[host], out)
    ids = torch.randint(0, 101, (4, 40))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() <= 1e-3
    for layer, e in zip(moe.moe_layers(), [3, 5]):
        assert layer.expert_counts.max() / layer.expert_counts.sum() <= 3 / e


def test_copy_is_deepspeed_init(dense_dirs, host, tmp_path):
    """Every expert and the residual FFN equal the dense FFN; an expert computes exactly the dense FFN."""
    from moe_convert.inference.kernels import ffn

    out = tmp_path / "moe"
    upcycle(str(dense_dirs[host]), out, experts="4,2", init="copy", fidelity=False)
    dense, moe = load_pair(dense_dirs[host], out)
    dense_layers = dense.get_submodule("transformer.h" if host == "gpt2" else "model.layers")
    x = torch.randn(9, 32)
    for layer_idx, layer in zip([1, 3], moe.moe_layers()):
        dense_mlp = dense_layers[layer_idx].mlp
        for (name, p), (_, q) in zip(layer.mlp.state_dict().items(), dense_mlp.state_dict().items()):
            assert torch.equal(p, q), name
        with torch.no_grad():
            want = dense_mlp(x)
            for j in range(layer.experts.num_experts):  # Conv1D [in, out] / Linear [out, in] handled
                got = ffn(x, {k: v[j] for k, v in layer.experts.stacked().items()}, layer.experts.act)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if host == "gpt2":  # stored exactly as Conv1D keeps it, no transpose
        assert torch.equal(moe.moe_layers()[0].experts.w_in[1], dense_layers[1].mlp.c_fc.weight)
    else:
        assert torch.equal(moe.moe_layers()[0].experts.w_gate[1], dense_layers[1].mlp.gate_proj.weight.t())


def test_drop_and_noise_inits(dense_dirs, tmp_path):
    upcycle(str(dense_dirs["gpt2"]), tmp_path / "drop", experts="3,3", init="drop:0.5", seed=3, fidelity=False)
    upcycle(str(dense_dirs["gpt2"]), tmp_path / "noise", experts="3,3", init="noise:0.01", fidelity=False)
    dense = load_file(dense_dirs["gpt2"] / "model.safetensors")
    drop = load_file(tmp_path / "drop" / "model.safetensors")
    noise = load_file(tmp_path / "noise" / "model.safetensors")
    p, d = "host.transformer.h.1.mlp.", "transformer.h.1.mlp."
    subsets = []
    for e in range(3):
        cols = (drop[p + "experts.w_in"][e] != dense[d + "c_fc.weight"]).any(0)  # (f,) re-initialised units
        rows = (drop[p + "experts.w_out"][e] != dense[d + "c_proj.weight"]).any(1)
        bias = drop[p + "experts.b_in"][e] != dense[d + "c_fc.bias"]
        assert cols.sum() == round(0.5 * 37) and torch.equal(cols, rows) and torch.equal(cols, bias)
        subsets.append(cols)
    assert not torch.equal(subsets[0], subsets[1])  # a different subset per expert
    diff = noise[p + "experts.w_in"] - dense[d + "c_fc.weight"]
    assert 0.008 < diff.std() < 0.012


def test_pyramid_layout_reaches_config(tmp_path):
    layout = build_layout(24, pyramid="32,64")
    assert layout.moe_layers == list(range(1, 24, 2)) and layout.num_experts == [32] * 10 + [64] * 2
    src = save_dense(tmp_path / "d24", n_layer=24, n_embd=8, n_head=2, n_inner=4)
    runner = CliRunner()
    cases = {
        ("--pyramid", "32,64"): (list(range(1, 24, 2)), [32] * 10 + [64] * 2),
        ("--pyramid", "32,64", "--pyramid-split", "8,4"): (list(range(1, 24, 2)), [32] * 8 + [64] * 4),
        ("--experts", ",".join(map(str, range(2, 14)))): (list(range(1, 24, 2)), list(range(2, 14))),
        ("--pyramid", "4,8", "--moe-every", "3"): (list(range(2, 24, 3)), [4] * 6 + [8] * 2),
        (): (list(range(1, 24, 2)), [8] * 12),  # neither option: 8 experts per MoE layer (build_layout's default)
    }
    for i, (args, (layers, counts)) in enumerate(cases.items()):
        out = tmp_path / f"o{i}"
        r = runner.invoke(app, ["upcycle", str(src), "-o", str(out), "--init", "copy", "--no-fidelity", "--json", *args])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        config = json.loads((out / "config.json").read_text())
        assert config["moe_layers"] == summary["moe_layers"] == layers
        assert config["num_experts"] == summary["experts_per_layer"] == counts
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_slice(f"host.transformer.h.{layers[-1]}.mlp.experts.w_in").get_shape() == [counts[-1], 8, 4]


def test_inputs_sharded_bin_and_hub_spelling_give_identical_output(dense_dirs, tmp_path):
    """Sharded safetensors, a .bin, and hub-style GPT-2 keys (no `transformer.` prefix, stray lm_head)."""
    from transformers import GPT2LMHeadModel

    src = dense_dirs["gpt2"]
    model = GPT2LMHeadModel.from_pretrained(src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    variants = {"sharded": sharded}
    for name in ("bin", "hub"):
        variants[name] = tmp_path / name
        variants[name].mkdir()
        (variants[name] / "config.json").write_text((src / "config.json").read_text())
    torch.save(state, variants["bin"] / "pytorch_model.bin")
    hub = {k.removeprefix("transformer."): v.clone() for k, v in state.items()}  # lm_head kept, as old files
    save_file(hub, str(variants["hub"] / "model.safetensors"), metadata={"format": "pt"})

    upcycle(str(src), tmp_path / "ref", pyramid="2,3", max_shard_size="30KB", fidelity=False)
    ref = shard_bytes(tmp_path / "ref")
    assert len(ref) > 3  # output sharded too
    for name, path in variants.items():
        upcycle(str(path), tmp_path / f"out-{name}", pyramid="2,3", max_shard_size="30KB", fidelity=False)
        assert shard_bytes(tmp_path / f"out-{name}") == ref, name


def test_tied_lm_head(dense_dirs, tmp_path):
    upcycle(str(dense_dirs["gpt2"]), tmp_path / "g", experts="2,2", fidelity=False)
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        assert "host.lm_head.weight" not in f.keys()
    _, moe = load_pair(dense_dirs["gpt2"], tmp_path / "g")
    assert moe.host.lm_head.weight.data_ptr() == moe.host.transformer.wte.weight.data_ptr()
    untied = save_dense(tmp_path / "untied", "llama", tie_word_embeddings=False)
    upcycle(str(untied), tmp_path / "l", experts="2,2", fidelity=False)
    dense, moe = load_pair(untied, tmp_path / "l")
    assert torch.equal(moe.host.lm_head.weight, dense.lm_head.weight)
    assert not torch.equal(moe.host.lm_head.weight, moe.host.model.embed_tokens.weight)


def test_same_seed_byte_identical_and_loadable_by_auto_classes(dense_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    for name, seed, n in (("a", 5, 2), ("b", 5, 1), ("c", 6, 2)):  # the thread count must not matter
        torch.set_num_threads(n)
        try:
            upcycle(str(dense_dirs["llama"]), tmp_path / name, pyramid="2,4", seed=seed, fidelity=False)
        finally:
            torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["provenance"]["seed"] == 5 and config["provenance"]["init"] == "preserve"
    assert "AutoModelForCausalLM" in config["auto_map"] and (tmp_path / "a" / "modeling.py").is_file()
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "a")).__name__ == "PRMoEForCausalLM"


def test_interrupted_run_leaves_nothing(dense_dirs, tmp_path):
    def interrupt(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        upcycle(str(dense_dirs["gpt2"]), tmp_path / "out", experts="4,4", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_cli_table_and_json(dense_dirs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["upcycle", str(dense_dirs["gpt2"]), "-o", str(tmp_path / "a"), "--pyramid", "2,4"])
    assert r.exit_code == 0, r.output
    assert "active params / token" in r.stdout and "max |dlogits|" in r.stdout
    r = runner.invoke(app, ["upcycle", str(dense_dirs["gpt2"]), "-o", str(tmp_path / "b"), "--pyramid", "2,4",
                            "--json", "--dtype", "bf16", "--top-k", "2", "--no-residual"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    for key in ("total_params", "active_params", "experts_per_layer", "moe_layers", "max_abs_logit_diff", "kl",
                "max_expert_share"):
        assert key in s
    per_expert = 2 * 32 * 37 + 37 + 32
    assert s["total_params"] - s["active_params"] == (2 - 2 + 4 - 2) * per_expert
    assert s["dtype"] == "bfloat16" and json.loads((tmp_path / "b" / "config.json").read_text())["residual"] is False


def _unsupported_host(tmp_path):
    from transformers import BertConfig

    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(BertConfig(hidden_size=8, num_hidden_layers=2).to_json_string())
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 8)}, str(d / "model.safetensors"))
    return d


def _truncated(tmp_path, src):
    d = tmp_path / "trunc"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("case,message", [
    ("missing", "is not a local directory"),
    ("bert", "'bert' is not supported; supported hosts: gpt2, llama, mistral, qwen2"),
    ("pyramid0", "pyramid: every stage needs >= 1 expert"),
    ("pyramidx", "pyramid: expected comma-separated integers"),
    ("stages", "pyramid: 3 stages but the model has only 2 MoE layers"),
    ("experts", "experts: needs one count per MoE layer"),
    ("truncated", "model.safetensors"),
    ("exists", "already exists"),
    ("init", "init: expected one of"),
    ("noise_inf", "needs a finite SIGMA > 0"),
    ("aux_nan", "aux_loss_coef: must be a finite number"),
    ("seed", "seed: must be in 0..4294967295"),
    ("split_alone", "give --pyramid too"),
    ("pyramid_huge", "num_experts: every MoE layer needs 1 to 1,000,000 experts"),  # a torch overflow traceback
])
def test_bad_input_one_line_nonzero_nothing_written(dense_dirs, tmp_path, case, message):
    work = tmp_path / "work"
    work.mkdir()
    src, out = str(dense_dirs["gpt2"]), work / "out"
    args = ["--pyramid", "2,4"]
    if case == "missing":
        src = str(tmp_path / "no-such-dir")
    elif case == "bert":
        src = str(_unsupported_host(tmp_path))
    elif case == "truncated":
        src = str(_truncated(tmp_path, dense_dirs["gpt2"]))
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    else:
        args = {"pyramid0": ["--pyramid", "0,8"], "pyramidx": ["--pyramid", "8,x"], "stages": ["--pyramid", "1,2,3"],
                "experts": ["--experts", "2,2,2"], "init": ["--init", "zeros"], "noise_inf": ["--init", "noise:inf"],
                "aux_nan": ["--aux-loss-coef", "nan"], "seed": ["--seed", "-1"],
                "split_alone": ["--pyramid-split", "1,1"], "pyramid_huge": ["--pyramid", "99999999999999999999"]}[case]
    before = sorted(p.name for p in work.iterdir())
    r = CliRunner().invoke(app, ["upcycle", src, "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert "\n" not in err and err.startswith("error:") and message in err, err
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written (OUT untouched if it existed)
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep"]


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from moe_convert.convert.upcycle import upcycle
    upcycle(sys.argv[1], sys.argv[2], pyramid=sys.argv[3], init="copy", max_shard_size="20MB", fidelity=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes (Linux reports KiB)
""")


def test_streaming_peak_memory_does_not_grow_with_experts(tmp_path):
    """4 vs 64 experts of 0.5 MB: a 64-expert layer is 32 MB, a stacked tensor 16 MB, a shard 20 MB.

    Buffering a layer, a stacked tensor or a shard would add >= 16 MB to the 64-expert peak RSS.
    """
    src = save_dense(tmp_path / "dense", n_layer=8, n_embd=128, n_inner=512, n_head=2)
    peaks = {}
    for e in (4, 64):
        out = tmp_path / f"moe{e}"
        r = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(src), str(out), str(e)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        peaks[e] = int(r.stdout.split()[-1])
    shards = [p.stat().st_size for p in (tmp_path / "moe64").glob("*.safetensors")]
    assert sum(shards) > 5 * max(shards) and max(shards) <= 20e6  # output many times the largest shard
    assert peaks[64] - peaks[4] < 8e6, peaks


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_that_is_or_holds_the_source_is_refused(dense_dirs, where):
    """--overwrite must never replace the directory being read."""
    src = dense_dirs["gpt2"]
    out = src if where == "same" else src.parent
    files = sorted(p.name for p in src.iterdir())
    r = CliRunner().invoke(app, ["upcycle", str(src), "-o", str(out), "--overwrite"])
    assert r.exit_code == 2 and ("is the input" if where == "same" else "contains the input") in r.output, r.output
    assert sorted(p.name for p in src.iterdir()) == files


def test_upcycling_a_prmoe_model_says_so(tmp_path):
    tiny_prmoe().save_pretrained(tmp_path / "moe")
    r = CliRunner().invoke(app, ["upcycle", str(tmp_path / "moe"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "is already a PR-MoE model" in r.output and not (tmp_path / "out").exists(), r.output


def test_gated_host_with_ffn_biases_is_refused_by_name(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(HOST_CONFIGS["llama"](mlp_bias=True)).save_pretrained(tmp_path / "dense")
    r = CliRunner().invoke(app, ["upcycle", str(tmp_path / "dense"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "mlp_bias=True) are not supported" in r.output and not (tmp_path / "out").exists()


def test_fidelity_sample_is_held_out_corpus_text(tmp_path):
    """With a tokenizer the sample is 16 rows of held-out text, each starting at one of 16 evenly spaced held-out
    paragraphs and running on into the next: recomputed here, the shares agree."""
    from moe_convert.io import load_tokenizer
    from moe_convert.training.data import load_documents, split_documents

    s = upcycle(str(CHECKPOINT), tmp_path / "moe", experts="2,4")
    assert "held-out builtin:pydoc" in s.fidelity
    tokenizer = load_tokenizer(CHECKPOINT)
    held_out = split_documents(load_documents("builtin:pydoc").texts, 0.1)["eval"]
    starts = [r * len(held_out) // 16 for r in range(16)]
    rows = [sum((tokenizer(t)["input_ids"] for t in held_out[i:i + 30]), [])[:64] for i in starts]
    _, moe = load_pair(CHECKPOINT, tmp_path / "moe")
    with torch.no_grad():
        moe(torch.tensor(rows))
    shares = [float(m.expert_counts.max() / m.expert_counts.sum()) for m in moe.moe_layers()]
    assert s.max_expert_share == pytest.approx(shares, abs=0.01)  # near-tied first choices, as below


def test_models_run_block_by_block_equal_the_whole_models(dense_dirs, host, tmp_path):
    """What calibration and the fidelity check see: the dense and the written model, each run one decoder block at
    a time from its checkpoint, give the whole models' FFN inputs and logits on fresh random tokens."""
    from transformers import AutoConfig

    from moe_convert.convert.upcycle import _dense_model, _upcycled_model
    from moe_convert.io import CheckpointReader
    from moe_convert.model.modeling import host_spec

    out = tmp_path / "moe"
    upcycle(str(dense_dirs[host]), out, pyramid="3,5", fidelity=False)
    dense, moe = load_pair(dense_dirs[host], out)
    spec = host_spec(host)
    streamed = {"dense": _dense_model(CheckpointReader(dense_dirs[host]), spec,
                                      AutoConfig.from_pretrained(dense_dirs[host])),
                "moe": _upcycled_model(out, spec, moe.config)}
    ids = torch.randint(0, 101, (9, 40))  # chunks of 4 rows, the last one short
    for name, whole in (("dense", dense), ("moe", moe)):
        layers = whole.get_submodule(("host." if name == "moe" else "") + spec.layers)
        want = {}
        hooks = [getattr(layer, spec.ffn_attr).register_forward_pre_hook(
            lambda m, args, i=i: want.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))) for i, layer in enumerate(layers)]
        with torch.no_grad():
            want_logits = whole(ids).logits
        for h in hooks:
            h.remove()
        got = {}
        hidden = streamed[name].run(ids, {i: lambda x, block, i=i: got.__setitem__(i, x.clone()) for i in range(4)})
        assert sorted(got) == sorted(want) == [0, 1, 2, 3]
        for i in want:
            torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(streamed[name].logits(hidden), want_logits, rtol=1e-5, atol=1e-5)


def test_fidelity_numbers_are_the_whole_models(dense_dirs, host, tmp_path):
    """The summary's max |dlogits|, KL and expert shares, measured block by block, equal those of the whole models."""
    from transformers import AutoConfig

    from moe_convert.convert.upcycle import _fidelity_sample

    out = tmp_path / "moe"
    s = upcycle(str(dense_dirs[host]), out, pyramid="3,5")
    sample, note = _fidelity_sample(dense_dirs[host], AutoConfig.from_pretrained(dense_dirs[host]))
    assert s.fidelity == f"on {note}, fp32"
    dense, moe = load_pair(dense_dirs[host], out)
    with torch.no_grad():
        want, got = dense(sample).logits.double(), moe(sample).logits.double()
    assert s.max_abs_logit_diff == pytest.approx((got - want).abs().max().item(), abs=2e-6)
    log_p, log_q = want.log_softmax(-1), got.log_softmax(-1)
    assert s.kl == pytest.approx((log_p.exp() * (log_p - log_q)).sum(-1).mean().item(), abs=1e-9)
    shares = [(m.expert_counts.max() / m.expert_counts.sum()).item() for m in moe.moe_layers()]
    # a token whose two best router logits agree to fp32 rounding (the logits cancel a large mean state) may go
    # either way in a differently batched run: up to 1% of the tokens
    assert s.max_expert_share == pytest.approx(shares, abs=0.01)


def test_balanced_router_spreads_unseen_tokens_evenly():
    """Hidden states with a large mean, a few loud features and clusters: argmax of the fitted router splits the
    calibration tokens into equal shares and fresh tokens of the same kind nearly so; the logits are tiny and blind
    to the mean state."""
    from moe_convert.convert.calibrate import ROUTER_LOGIT_STD, balanced_router

    g = torch.Generator().manual_seed(0)
    d, E = 48, 16
    loudness = torch.ones(d)
    loudness[:3] = 30.0  # outlier features
    centres = 2 * torch.randn(5, d, generator=g)

    def tokens(n: int) -> torch.Tensor:  # (n, d)
        return 5 + centres[torch.randint(0, 5, (n,), generator=g)] + torch.randn(n, d, generator=g) * loudness

    x = tokens(4096)
    w = balanced_router(x, E, torch.Generator().manual_seed(1))  # (E, d)
    for sample, bound in ((x, 1.1), (tokens(4096), 1.3)):
        counts = torch.bincount((sample @ w.t()).argmax(-1), minlength=E)
        assert counts.max() / counts.sum() <= bound / E, counts
    logits = x @ w.t()
    assert logits.std(0).mean() == pytest.approx(ROUTER_LOGIT_STD, rel=1e-3)
    assert (w @ x.mean(0)).abs().max() < 1e-3 * ROUTER_LOGIT_STD

"""`bench layer` at a tiny size (every implementation runs and computes the same layer; no timing
assertions), and the kernels' two expert-matmul backends and fused activations against each other."""

import json

import pytest
import torch
from transformers.activations import ACT2FN
from typer.testing import CliRunner

from moe_convert.inference.bench import IMPLS, Machine, floor_ms, layer_work, make_weights
from moe_convert.cli import app
from moe_convert.errors import MoEConvertError
from moe_convert.inference import kernels
from moe_convert.inference.kernels import (ACTIVATIONS, PackedExperts, ffn, fused_activation, is_packed, moe_forward,
                                           pack_experts, pack_ffn)


def test_bench_layer_json_runs_every_implementation():
    res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "24", "--hidden", "32", "--experts", "4,6",
                                   "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    for E in (4, 6):
        got = {r["impl"]: r for r in rows if r["experts"] == E}
        assert set(got) == set(IMPLS) | {"floor"}
        for r in got.values():
            assert {"impl", "tokens", "hidden", "experts", "dtype", "ms"} <= set(r)
            assert r["tokens"] == 24 and r["hidden"] == 32 and r["dtype"] == "fp32"
            assert r["ms"] is not None and 0 < r["ms"] < 60_000, r
            assert r["gemm_gflops"] > 0 and r["bandwidth_gbs"] > 0 and r["load_avg_at_start"] >= 0
            if r["impl"] not in ("floor", "dense_ffn"):
                assert r["max_err"] < 1e-4, r  # every implementation computes the same layer
        assert got["floor"]["ms"] <= min(r["ms"] for r in got.values()) * 1.0001 or got["floor"]["vs_floor"] == 1.0
        assert got["moe_convert"]["speedup_vs_deepspeed"] == pytest.approx(got["deepspeed"]["ms"] / got["moe_convert"]["ms"])
        # every floor from the constants reported (the best of the whole run), recomputed here
        x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
        machine = Machine(got["floor"]["gemm_gflops"], got["floor"]["bandwidth_gbs"])
        assert got["floor"]["ms"] == pytest.approx(floor_ms(layer_work(make_weights(E, 32, torch.float32), x), machine)[0])


def test_bench_layer_one_token_and_impls_lists():
    """One token (decode) with DeepSpeed, which refuses fewer tokens than its min_capacity unless told;
    duplicate and blank --impls entries are dropped, an empty list is refused."""
    res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "1", "--hidden", "32", "--experts", "4",
                                   "--repeats", "1", "--impls", "moe_convert, deepspeed,moe_convert,", "--json"])
    assert res.exit_code == 0, res.output
    assert [r["impl"] for r in json.loads(res.stdout)] == ["moe_convert", "deepspeed", "floor"]
    res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "1", "--experts", "4", "--impls", " ,"])
    assert res.exit_code == 2 and "--impls: name at least one of" in res.output


def test_bench_layer_bad_input():
    res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "8", "--experts", "4", "--impls", "nope"])
    assert res.exit_code == 2 and "unknown nope" in res.output
    for size in (["--experts", "99999999999999999999"], ["--hidden", "100000", "--experts", "64"],
                 ["--tokens", "1000000000000", "--experts", "4"]):
        res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "8", *size])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # (a busy host adds a load warning)
        assert res.exit_code == 2 and len(errors) == 1 and "GB is free" in errors[0], res.output


def test_bench_layer_without_deepspeed(monkeypatch):
    """Asked for by name, a missing DeepSpeed is an error; in the default set its row says why it is empty."""
    from moe_convert.inference import bench

    def not_installed():
        raise MoEConvertError("engine: deepspeed is not installed; pip install 'moe-convert[deepspeed]'")
    monkeypatch.setattr(bench, "deepspeed_moe_class", not_installed)
    args = ["bench", "layer", "--tokens", "8", "--hidden", "32", "--experts", "4", "--repeats", "1"]
    res = CliRunner().invoke(app, [*args, "--impls", "moe_convert,deepspeed"])
    assert res.exit_code == 2 and "DeepSpeed is not installed" in res.output, res.output
    rows = json.loads(CliRunner().invoke(app, [*args, "--impls", "moe_convert,hf_eager", "--json"]).stdout)
    assert [r["impl"] for r in rows] == ["moe_convert", "hf_eager", "floor"]  # not asked for: no row
    rows = {r["impl"]: r for r in json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)}
    assert rows["deepspeed"]["ms"] is None and rows["deepspeed"]["note"] == "skipped: DeepSpeed is not installed"
    assert rows["moe_convert"]["ms"] > 0 and rows["moe_convert"]["speedup_vs_deepspeed"] is None


@pytest.mark.parametrize("kind", ["mlp", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_forward_and_backward(kind, dtype):
    """loop and grouped_mm (16-byte aligned sizes) give the same outputs and gradients, empty experts included."""
    torch.manual_seed(0)
    T, d, f, E = 40, 16, 24, 6
    names = {"mlp": {"w_in": (E, d, f), "b_in": (E, f), "w_out": (E, f, d), "b_out": (E, d)},
             "gated": {"w_gate": (E, d, f), "w_up": (E, d, f), "w_out": (E, f, d)}}[kind]
    stacked = {k: (torch.randn(*s) * 0.3).to(dtype).requires_grad_() for k, s in names.items()}
    router = torch.randn(E, d)
    router[2] = -100  # expert 2 gets no token (inputs are positive)
    x = (torch.rand(T, d) + 0.1).to(dtype).requires_grad_()
    outs, grads = [], []
    for backend in ("loop", "grouped_mm"):
        y, routing = moe_forward(x, router, stacked, ACTIVATIONS["silu"], top_k=2, backend=backend)
        assert routing.counts[2] == 0
        y.float().pow(2).sum().backward()
        outs.append(y.detach().float())
        grads.append([t.grad.clone().float() for t in (x, *stacked.values())])
        for t in (x, *stacked.values()):
            t.grad = None
    for a, b in zip([outs[0], *grads[0]], [outs[1], *grads[1]]):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # bf16 sums in a different order: compare as a whole, to bf16 precision
            assert (a - b).norm() / a.norm() < 2e-2


def test_no_grad_path_equals_autograd_path():
    torch.manual_seed(1)
    E, d, f = 5, 12, 20
    stacked = {"w_in": torch.randn(E, d, f), "b_in": torch.randn(E, f), "w_out": torch.randn(E, f, d),
               "b_out": torch.randn(E, d)}
    x, router = torch.randn(30, 12), torch.randn(E, d)
    residual = (torch.rand(30, 2).softmax(-1), torch.randn(30, d))
    with torch.no_grad():
        a, _ = moe_forward(x, router, stacked, ACTIVATIONS["gelu_new"], residual=residual)
    b, _ = moe_forward(x.requires_grad_(), router, stacked, ACTIVATIONS["gelu_new"], residual=residual)
    torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and the fused combine equals the unfused mix
        moe, _ = moe_forward(x, router, stacked, ACTIVATIONS["gelu_new"])  # the expert branch alone
    coef, dense = residual
    torch.testing.assert_close(a, coef[:, :1] * moe + coef[:, 1:] * dense, rtol=1e-5, atol=1e-5)


def test_in_place_combine_equals_the_autograd_path():
    """With the residual FFN's weights, inference scales its own temporaries in place (`combine(overwrite=)`):
    bit for bit what the path that keeps them computes, and the caller's tensors stay as they were."""
    torch.manual_seed(2)
    E, d, f = 6, 16, 24
    stacked = {"w_in": torch.randn(E, d, f), "b_in": torch.randn(E, f), "w_out": torch.randn(E, f, d),
               "b_out": torch.randn(E, d)}
    dense = {"w_in": torch.randn(d, f), "b_in": torch.randn(f), "w_out": torch.randn(f, d), "b_out": torch.randn(d)}
    x, router, coef = torch.randn(40, d), torch.randn(E, d), torch.rand(40, 2).softmax(-1)
    kept = (x.clone(), coef.clone())
    with torch.no_grad():
        a, _ = moe_forward(x, router, stacked, ACTIVATIONS["gelu_new"], residual=(coef, dense))
    b, _ = moe_forward(x, router, stacked, ACTIVATIONS["gelu_new"], residual=(coef, dense), backend="loop")
    assert torch.equal(a, b)
    assert torch.equal(x, kept[0]) and torch.equal(coef, kept[1])


@pytest.mark.parametrize("name", ["gelu_new", "gelu_pytorch_tanh", "gelu", "silu", "relu"])
def test_fused_activations_equal_transformers(name):
    x = torch.randn(1000) * 4
    torch.testing.assert_close(fused_activation(ACT2FN[name])(x), ACT2FN[name](x), rtol=1e-6, atol=1e-6)


def random_ffn(kind: str, d: int, f: int, dtype=torch.float32, E: int | None = None) -> dict[str, torch.Tensor]:
    """One FFN's (or E stacked experts') [in, out] weights with non-zero biases."""
    lead = () if E is None else (E,)
    shapes = {"mlp": {"w_in": (d, f), "b_in": (f,), "w_out": (f, d), "b_out": (d,)},
              "gated": {"w_gate": (d, f), "w_up": (d, f), "w_out": (f, d)}}[kind]
    return {k: (torch.randn(*lead, *s) * 0.3).to(dtype) for k, s in shapes.items()}


def naive_ffn(x, w, act):
    """The FFN formula in fp64, nothing fused."""
    x, w = x.double(), {k: v.double() for k, v in w.items()}
    if "w_gate" in w:
        return (act(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_out"]
    return act(x @ w["w_in"] + w["b_in"]) @ w["w_out"] + w["b_out"]


@pytest.mark.parametrize("kind,act", [("mlp", "gelu_new"), ("gated", "silu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 8, 300])
def test_packed_and_plain_ffn_equal_the_formula(kind, act, dtype, rows, monkeypatch):
    """Packed weights, transposed views (oneDNN from 8 rows) and addmm (below) all compute the FFN; 300 rows
    run in several row blocks (a 4 KiB block budget here)."""
    monkeypatch.setattr(kernels, "ROW_BLOCK_BYTES", 4096)
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    torch.manual_seed(rows)
    w = random_ffn(kind, 24, 40, dtype)
    x = torch.randn(rows, 24).to(dtype)
    packed = pack_ffn(w)
    assert is_packed(packed) and not is_packed(w)
    ref = naive_ffn(x, w, ACT2FN[act])
    with torch.inference_mode():
        for weights in (packed, w):
            got = ffn(x, weights, ACTIVATIONS[act]).double()
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            else:
                assert (got - ref).norm() / ref.norm() < 2e-2


def test_packed_weights_on_huge_pages_compute_the_same():
    """`back_with_huge_pages` moves the runtime's packed matrices (here 4 MiB each) onto huge pages where
    the kernel can: every byte stays where oneDNN and the native kernel read it."""
    torch.manual_seed(3)
    experts = pack_experts(random_ffn("mlp", 512, 2048, E=2))
    if not isinstance(experts, PackedExperts):
        pytest.skip("no oneDNN packing in this torch")
    x, router = torch.randn(9, 512), torch.randn(2, 512)
    with torch.inference_mode():
        before = [moe_forward(x[:n], router, experts, ACTIVATIONS["gelu_new"])[0] for n in (1, 9)]
        matrices = kernels.packed_matrices(experts)
        assert len(matrices) == 4
        done = kernels.back_with_huge_pages(matrices)
        assert done % (2 * 2**20) == 0 and done <= 4 * 6 * 2**20
        after = [moe_forward(x[:n], router, experts, ACTIVATIONS["gelu_new"])[0] for n in (1, 9)]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_pack_leaves_weights_alone_where_onednn_does_not_apply(monkeypatch):
    w = random_ffn("mlp", 8, 16)
    assert pack_ffn(w) is w  # small matrices: a plain addmm is cheaper than a oneDNN call
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    assert pack_ffn({k: v.half() for k, v in w.items()})["w_in"].dtype == torch.float16  # fp16: no oneDNN path
    trained = {k: v.requires_grad_() for k, v in w.items()}
    assert pack_ffn(trained) is trained  # autograd needs the plain tensors
    assert pack_experts(random_ffn("mlp", 8, 16, torch.float16, E=3))["w_in"].shape == (3, 8, 16)


@pytest.mark.parametrize("kind,act", [("mlp", "gelu_new"), ("gated", "silu")])
@pytest.mark.parametrize("top_k", [1, 2])
def test_packed_experts_equal_stacked_weights(kind, act, top_k, monkeypatch):
    """The runtime's packed experts give the module path's outputs (an expert without tokens included)."""
    monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    torch.manual_seed(top_k)
    E, d = 7, 16
    stacked = random_ffn(kind, d, 36, E=E)
    router = torch.randn(E, d)
    router[4] = -100  # expert 4 gets no token (inputs are positive)
    x = torch.rand(50, d) + 0.1
    residual = (torch.rand(50, 2).softmax(-1), torch.randn(50, d))
    packed = pack_experts(stacked)
    assert isinstance(packed, PackedExperts) and len(packed.weights) == E
    with torch.inference_mode():
        ref, routing = moe_forward(x, router, stacked, ACTIVATIONS[act], top_k, residual=residual)
        got, _ = moe_forward(x, router, packed, ACTIVATIONS[act], top_k, residual=residual)
    assert routing.counts[4] == 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bench_layer_backward_every_implementation_agrees():
    """--backward on a tiny layer with fresh random weights: every implementation's output and input gradient
    equal ours (max_err covers both), the rows say backward, and the floor counts a training step's work."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    res = CliRunner().invoke(app, ["bench", "layer", "--tokens", "64", "--hidden", "32", "--experts", "4",
                                   "--repeats", "1", "--seed", str(seed), "--backward", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["impl"]: r for r in json.loads(res.stdout)}
    assert set(rows) == set(IMPLS) | {"floor"}
    for r in rows.values():
        assert r["backward"] is True and r["ms"] is not None and r["ms"] > 0, r
        if r["impl"] not in ("floor", "dense_ffn"):
            assert r["max_err"] < 1e-4, (seed, r)
    w = make_weights(4, 32, torch.float32, seed)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed + 1))
    forward, training = layer_work(w, x), layer_work(w, x, backward=True)
    assert training == (3 * forward[0], 2 * forward[1])
    machine = Machine(rows["floor"]["gemm_gflops"], rows["floor"]["bandwidth_gbs"])
    assert rows["floor"]["ms"] == pytest.approx(floor_ms(training, machine)[0])


def test_training_step_gradients_equal_autograd_of_the_formula():
    """Our training row's input gradient against autograd through the layer's formula in float64."""
    from moe_convert.inference.bench import build

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    w = make_weights(4, 32, torch.float32, seed=int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(64, 32, requires_grad=True)
    y = build("moe_convert", w, backward=True)(x)
    x64 = x.detach().double().requires_grad_()
    probs = (x64 @ w.router.double().T).softmax(-1)
    p, e = probs.max(-1)
    act = ACTIVATIONS["gelu_pytorch_tanh"]
    experts = torch.stack([naive_ffn(x64[t], {k: v[e[t]] for k, v in w.stacked.items()}, act) for t in range(64)])
    coef = (x64 @ w.coef_w.double().T + w.coef_b.double()).softmax(-1)
    ref = coef[:, :1] * p[:, None] * experts + coef[:, 1:] * naive_ffn(x64, w.dense, act)
    ref.square().mean().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_bench_backward_option_and_recipe_field():
    res = CliRunner().invoke(app, ["bench", "layer", "--help"])
    assert res.exit_code == 0 and "--backward" in res.output
    from moe_convert.pipeline.recipe import parse_recipe

    recipe = parse_recipe({"steps": [{"bench": {"tokens": 8, "hidden": 32, "experts": 4, "backward": True}}]})
    assert recipe.steps[0].spec.backward is True
    with pytest.raises(MoEConvertError, match="backward: expected bool"):
        parse_recipe({"steps": [{"bench": {"backward": "yes"}}]})


@pytest.mark.slow
def test_gpu_smoke_dry_run_on_the_cpu(tmp_path):
    """`benchmarks/gpu_smoke.py --device cpu --quick` runs end to end: every section, every layer case passes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"layer", "demo", "bench", "tests"} <= set(results) and (tmp_path / "summary.md").exists()
    assert len(results["layer"]) == 16 and all(c["passed"] for c in results["layer"]), results["layer"]
    assert all(r["device"]["passed"] and r["cpu"]["passed"] for r in results["demo"]), results["demo"]
    assert {r["backward"] for r in results["bench"]} == {False, True}
    assert all(r["max_err"] < 1e-4 for r in results["bench"] if r["max_err"] is not None)
    assert "skipped" in results["tests"]

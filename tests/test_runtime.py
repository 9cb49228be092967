"""The runtime (plain tensors + our kernels + KV cache) against the source PRMoEForCausalLM:
logits, greedy tokens, EP-split exports, sampling controls, and bad exports."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, save_tiny_prmoes, tiny_gpt2_config, tiny_llama_config
from moe_convert.cli import app
from moe_convert.convert.export import export
from moe_convert.formats import SINGLE_FILE
from moe_convert.errors import MoEConvertError
from moe_convert.inference import kernels, native, runtime
from moe_convert.inference.kernels import PackedExperts
from moe_convert.inference.plan import DecodePlan
from moe_convert.inference.runtime import load_runtime

runner = CliRunner()


def save_tokenizer(path):
    """A word-level tokenizer over VOCAB made-up words, built in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(host, dtype, ep) -> (source model, export dir); the source dirs carry a tokenizer."""
    out = {}
    for host, (model, src) in save_tiny_prmoes(tmp_path_factory, seed=20).items():
        save_tokenizer(src)
        for dtype, ep in [("fp32", 1), ("bf16", 1), ("fp16", 1), ("fp32", 2)]:
            dst = tmp_path_factory.mktemp(f"exp-{host}") / "out"
            export(src, dst, dtype=dtype, ep_size=ep)
            out[host, dtype, ep] = (model, dst)
    return out


@pytest.fixture(params=[True, False], ids=["packed", "plain"])
def packed(request, monkeypatch):
    """Run a test with the FFN/attention weights packed for oneDNN at load (as large models are, and small
    ones where the native kernel reads them) and plain (as small ones are without the native kernel)."""
    if request.param:
        monkeypatch.setattr(kernels, "PACK_MIN_BYTES", 0)
    else:
        monkeypatch.setattr(kernels, "register", lambda *args: False)  # as without the native kernel
    return request.param


@pytest.mark.parametrize("ep", [1, 2])
def test_fp32_logits_equal_the_source_model(exported, host, ep, packed):
    """With the FFN weights packed for oneDNN at load (large models) and plain (small ones, as here by default)."""
    model, path = exported[host, "fp32", ep]
    rt = load_runtime(path)
    assert isinstance(rt.ffns[1]["moe"].stacked, PackedExperts) == packed
    ffn_tensors = [n for n in rt.t if ".mlp." in n and not n.split(".mlp.", 1)[1].startswith(("router.", "coef"))]
    assert ffn_tensors == []  # the exported FFN weights live in `ffns` only (released once packed)
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(rt.logits(ids), ref, rtol=1e-5, atol=1e-5)


def test_bf16_logits_within_bf16_tolerance(exported, host, packed):
    """bf16 logits, the whole sequence at once and then token by token through the KV cache, which holds
    fp32 keys and values (attention runs in fp32: `runtime.attention_dtype`)."""
    model, path = exported[host, "bf16", 1]
    rt = load_runtime(path)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    got = rt.logits(ids)
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err  # bf16 keeps ~3 significant digits
    cache = rt.new_cache(2, 11)
    assert cache.k[0].dtype == cache.v[0].dtype == torch.float32
    steps = torch.cat([rt.forward(ids[:, :5], cache)] + [rt.forward(ids[:, t:t + 1], cache) for t in range(5, 11)], 1)
    torch.testing.assert_close(steps, got, rtol=2e-2, atol=2e-2)  # the same bf16 ops, in other row groupings


@pytest.mark.parametrize("native", [False, True], ids=["no-fp16-matmul", "fp16-matmul"])
def test_fp16_export_computes_in_fp32_where_the_cpu_has_no_fp16_matmul(exported, host, native, monkeypatch):
    """Without native fp16 matmul (this machine: ~140x slower than fp32) the weights are widened to fp32
    at load, exactly: the logits equal the source model's with every weight rounded to fp16, run in fp32.
    With it, the export runs in fp16."""
    import copy

    model, path = exported[host, "fp16", 1]
    monkeypatch.setattr(runtime, "native_fp16_matmul", lambda: native)
    rt = load_runtime(path)
    ids = torch.randint(0, VOCAB, (2, 11))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
        ref = rounded(ids).logits
    got = rt.logits(ids)
    assert rt.stored_dtype == torch.float16 and got.dtype == rt.dtype == (torch.float16 if native else torch.float32)
    if native:
        assert (got.float() - ref).norm() / ref.norm() < 5e-3  # fp16 keeps ~3.3 significant digits
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w6", "--max-new-tokens", "2"])
    assert res.exit_code == 0 and ("computed in fp32" in res.output) != native, res.output


def test_kv_cache_decoding_equals_one_full_pass(exported, host, packed):
    """Token by token after a prompt, and in chunks of several tokens after earlier ones (the explicit
    causal mask; a prefill from position 0 takes SDPA's own causal path, a single token no mask)."""
    _, path = exported[host, "fp32", 1]
    rt = load_runtime(path)
    ids = torch.randint(0, VOCAB, (2, 12))
    full = rt.logits(ids)
    cache = rt.new_cache(2, 12)
    steps = [rt.forward(ids[:, :5], cache)] + [rt.forward(ids[:, t:t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    cache = rt.new_cache(2, 12)
    chunks = [rt.forward(ids[:, a:b], cache) for a, b in ((0, 5), (5, 8), (8, 12))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_transformers_generate(exported, host, packed):
    model, path = exported[host, "fp32", 1]
    rt = load_runtime(path)
    prompt = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)
    out = rt.generate(prompt[0].tolist(), 12, eos_token_id=0)
    assert out.tokens == ref[0].tolist()
    assert out.new_tokens == len(ref[0]) - 6 and out.tokens_per_s > 0


def test_generation_stops_at_the_models_context(exported, host, monkeypatch):
    """Never past the positions the model was built for (GPT-2's table would overflow); the KV cache,
    allocated in steps, grows as it fills with the same tokens as one allocated whole."""
    from moe_convert.errors import MoEConvertError

    _, path = exported[host, "fp32", 1]
    rt = load_runtime(path)
    assert rt.context == 64
    prompt = torch.randint(2, VOCAB, (60,)).tolist()
    out = rt.generate(prompt, 10**9)  # no EOS given: only the context stops it
    assert out.new_tokens == 4 and out.stopped_at_context and len(out.tokens) == 64
    assert not rt.generate(prompt, 3).stopped_at_context
    whole = rt.generate(prompt[:5], 40).tokens
    monkeypatch.setattr(runtime, "CACHE_STEP", 3)
    assert rt.generate(prompt[:5], 40).tokens == whole  # the cache grew 5+3 -> 16 -> 32 -> 64
    with pytest.raises(MoEConvertError, match="context is 64"):
        rt.generate(prompt + prompt[:4], 1)
    with pytest.raises(MoEConvertError, match="exceed the model's context of 64"):
        rt.logits(torch.randint(0, VOCAB, (1, 65)))


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1", "--top-k", "0"], "--top-k"), (["--temperature", "1", "--top-p", "0"], "--top-p"),
    (["--threads", "0"], "--threads"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--threads", "99999"], "--threads must be in 1.."),  # once crashed in BLAS at the process limit
    (["--temperature", "1", "--seed", str(2**64)], "--seed: must be in 0..4294967295"),
])
def test_generate_bad_settings_are_one_line_errors(exported, args, message):
    _, path = exported["gpt2", "fp32", 1]
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w6", *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_sampling_controls(exported):
    _, path = exported["gpt2", "fp32", 1]
    rt = load_runtime(path)
    prompt = [5, 6, 7]
    greedy = rt.generate(prompt, 10).tokens
    assert rt.generate(prompt, 10, temperature=1.0, top_k=1, seed=1).tokens == greedy  # top-1 sampling is greedy
    assert rt.generate(prompt, 10, temperature=1.0, top_p=1e-6, seed=1).tokens == greedy  # nucleus of one token
    assert rt.generate(prompt, 10, temperature=1e-310, seed=1).tokens == greedy  # logits / T overflowed to inf
    a = rt.generate(prompt, 10, temperature=5.0, seed=3).tokens
    assert a == rt.generate(prompt, 10, temperature=5.0, seed=3).tokens  # same seed, same text
    assert any(rt.generate(prompt, 10, temperature=5.0, seed=s).tokens != a for s in range(4, 8))


def test_generate_cli_prints_text_and_speed(exported):
    _, path = exported["llama", "fp32", 1]
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--json"])
    assert res.exit_code == 0, res.output
    import json

    out = json.loads(res.stdout)
    assert 1 <= out["new_tokens"] <= 5 and out["tokens_per_s"] > 0 and len(out["tokens"]) == out["new_tokens"]
    assert out["stopped_at_context"] is False
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "1000"])
    assert res.exit_code == 0 and "stopped at the model's context of 64 tokens" in res.output, res.output
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5 w6", "--max-new-tokens", "3",
                              "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("w5 w6") and "tokens/s" in res.output


def test_generate_stops_at_any_eos_id_of_the_generation_config(exported, tmp_path):
    """Several EOS ids (Llama 3, Qwen2 instruct), named in generation_config.json: any of them ends it, as in transformers."""
    import json
    import shutil

    model, path = exported["llama", "fp32", 1]
    args = ["generate", str(tmp_path / "out"), "--prompt", "w5 w9 w17", "--max-new-tokens", "12", "--json"]
    shutil.copytree(path, tmp_path / "out")
    free = json.loads(runner.invoke(app, args).stdout)["tokens"]
    first = sorted({free.index(t) for t in free})  # where each distinct token first appears
    assert len(first) >= 3, free
    eos = [free[first[2]], 1000, free[first[1]]]  # listed last, met first
    (tmp_path / "out" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    got = json.loads(runner.invoke(app, args).stdout)
    with torch.no_grad():
        ref = model.generate(torch.tensor([[5, 9, 17]]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, 3:].tolist()
    assert got["tokens"] == ref == free[:first[1] + 1]


def test_truncated_export_is_a_one_line_error(exported, tmp_path):
    import shutil

    _, path = exported["gpt2", "fp32", 1]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    data = (bad / SINGLE_FILE).read_bytes()
    (bad / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["generate", str(bad), "--prompt", "w5"])
    assert res.exit_code == 2 and "truncated" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "w5"])  # not an export at all
    assert res.exit_code == 2 and "is not a moe-convert export" in res.output


def export_tiny(tmp_path, host, **host_overrides):
    """(source model, export dir) of a tiny PR-MoE whose host config gets `host_overrides`."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    host_cfg = tiny_llama_config({"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[host],
                                 **host_overrides)
    torch.manual_seed(7)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=host_cfg.to_dict(), moe_layers=[1, 3], num_experts=[4, 6])).eval()
    model.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out")
    return model, tmp_path / "out"


LONG_CONTEXT_HOSTS = {
    "mistral-sliding-window": ("mistral", dict(sliding_window=4)),
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "llama3-rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "yarn-rope": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                     original_max_position_embeddings=16))),
}


@pytest.mark.parametrize("case", list(LONG_CONTEXT_HOSTS))
def test_sliding_windows_and_scaled_rope_equal_the_source_model(case, tmp_path):
    """Sequences longer than the window (4) and than the RoPE's original context (16): logits and greedy tokens."""
    host, overrides = LONG_CONTEXT_HOSTS[case]
    model, path = export_tiny(tmp_path, host, **overrides)
    rt = load_runtime(path)
    ids = torch.randint(2, VOCAB, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(rt.logits(ids), ref, rtol=1e-5, atol=1e-5)
    cache = rt.new_cache(2, 24)  # chunks after earlier positions: keys leave the window within a chunk
    chunks = [rt.forward(ids[:, a:b], cache) for a, b in ((0, 3), (3, 9), (9, 10), (10, 24))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        greedy = model.generate(ids[:1, :6], max_new_tokens=14, do_sample=False, eos_token_id=0, pad_token_id=0)
    assert rt.generate(ids[0, :6].tolist(), 14, eos_token_id=0).tokens == greedy[0].tolist()


def test_unsupported_rope_is_a_one_line_error(tmp_path):
    _, path = export_tiny(tmp_path, "llama", rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    save_tokenizer(path)  # generate reads the tokenizer first
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w3 w4", "--max-new-tokens", "2"])
    assert res.exit_code == 2 and "rope_type 'dynamic' is not supported" in res.output


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
                    reason="needs transparent huge pages in madvise mode")
@pytest.mark.parametrize("user_value,huge", [(None, True), ("0", False)])
def test_generate_and_bench_ask_for_huge_pages_unless_the_user_says_no(user_value, huge):
    """`generate` / `bench layer` call `tune_memory_for_inference` before torch loads: large tensors get 2 MiB pages."""
    code = ("from moe_convert.cli import tune_memory_for_inference; tune_memory_for_inference(); import torch, re; "
            "t = torch.ones(16 * 2**20); print(re.search(r'AnonHugePages:\\s+(\\d+)', "
            "open('/proc/self/smaps_rollup').read()).group(1))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert (int(out) >= 2048) == huge, out  # kB of anonymous huge pages in the process


def test_batched_generation_equals_one_prompt_at_a_time_and_transformers(exported, host, packed):
    """Prompts of different lengths decoded as one left-padded batch: each sequence's greedy tokens equal its
    own run's and transformers' `generate`, a sequence ending at its EOS leaves the batch while the others go on,
    and the padded batch's logits equal each prompt's alone (prefill through the mask, decode through the
    native attention step)."""
    model, path = exported[host, "fp32", 1]
    rt = load_runtime(path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    free = [rt.generate(p, 10).tokens for p in prompts]
    news = [t[len(p):] for p, t in zip(prompts, free)]
    row, k = next((row, k) for k in range(1, 9) for row, new in enumerate(news) if new[k] not in new[:k])
    eos = news[row][k]  # sequence `row` ends at its (k+1)-th token
    alone = [rt.generate(p, 10, eos_token_id=eos) for p in prompts]
    batch = rt.generate_batch(prompts, 10, eos_token_id=eos)
    assert [b.tokens for b in batch] == [a.tokens for a in alone]
    assert batch[row].new_tokens == k + 1 < 10
    for p, b in zip(prompts, batch):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0)
        assert b.tokens == ref[0].tolist()
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    cache = rt.new_cache(len(prompts), longest + 3, [longest - len(p) for p in prompts])
    steps = [rt.forward(ids, cache)] + [rt.forward(torch.tensor([[n[t]] for n in news]), cache) for t in range(3)]
    for row, p in enumerate(prompts):
        full = rt.logits(torch.tensor([p + news[row][:3]]))[0]  # (len + 3, V)
        got = torch.cat([steps[0][row, longest - len(p):]] + [s[row] for s in steps[1:]])
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_generate_cli_decodes_several_prompts(exported, tmp_path):
    """Repeated --prompt and --prompts-file lines: one batch, each completion as its prompt alone gives it."""
    import json

    _, path = exported["llama", "fp32", 1]
    (tmp_path / "prompts.txt").write_text("w9 w10 w11 w12\n\nw7\n")
    args = ["generate", str(path), "--max-new-tokens", "4", "--json"]
    res = runner.invoke(app, [*args, "--prompt", "w5 w6", "--prompt", "w8", "--prompts-file", str(tmp_path / "prompts.txt")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [c["prompt"] for c in out["completions"]] == ["w5 w6", "w8", "w9 w10 w11 w12", "w7"]
    for c in out["completions"]:
        alone = json.loads(runner.invoke(app, [*args, "--prompt", c["prompt"]]).stdout)
        assert c["tokens"] == alone["tokens"] and c["text"] == alone["text"]
    res = runner.invoke(app, ["generate", str(path), "--prompt", "w5", "w6"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["generate", str(path), "--prompts-file", str(tmp_path / "missing.txt")])
    assert res.exit_code == 2 and "--prompts-file" in res.output and "Traceback" not in res.output, res.output
    res = runner.invoke(app, ["generate", str(path)])
    assert res.exit_code == 2 and "needs a --prompt or a --prompts-file" in res.output, res.output


def export_for_the_kernel(tmp_path, host: str, dtype: str = "fp32", **host_overrides):
    """Export dir of a tiny PR-MoE whose FFNs the native kernel reads (f = 128; GPT-2 with nonzero biases)."""
    from transformers import MistralConfig

    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    text = (tiny_gpt2_config(n_inner=128, **host_overrides) if host == "gpt2" else
            tiny_llama_config(MistralConfig if host == "mistral" else None, intermediate_size=128, **host_overrides))
    torch.manual_seed(13)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=text.to_dict(), moe_layers=[1, 3], num_experts=[4, 6])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # GPT-2 starts its biases at zero
    model.save_pretrained(tmp_path / "src")
    export(tmp_path / "src", tmp_path / dtype, dtype=dtype)
    return tmp_path / dtype


def planned_and_own(rt, B: int, starts: list[int], prompt: torch.Tensor, tokens: torch.Tensor) -> list[tuple]:
    """(decode logits (steps, B, V), keys, values) of a prefill of `prompt` and one step per row of `tokens`,
    first through the batch size's `DecodePlan`, then through `Runtime.forward`'s own way."""
    runs = []
    for plans in ({}, {B: None}):  # {B: None}: no plan for B
        rt.decode_plans = plans
        cache = rt.new_cache(B, prompt.shape[1] + 1, starts)  # one slot free: the cache grows while decoding
        rt.forward(prompt, cache)
        logits = torch.stack([rt.forward(t, cache)[:, 0] for t in tokens])
        runs.append((logits, *(torch.stack([t[:, :, :cache.length] for t in ts]) for ts in (cache.k, cache.v))))
    return runs


needs_kernel = pytest.mark.skipif(native.library() is None, reason=f"no native kernel here: {native.why_unavailable()}")


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_plan_equals_the_runtimes_own_forward_bit_for_bit(host, dtype, tmp_path):
    """Decode steps through the prepared native calls (`plan.DecodePlan`) leave the very logits and KV cache of
    `Runtime.forward`'s own calls: one sequence, and three left-padded ones."""
    rt = load_runtime(export_for_the_kernel(tmp_path, host, dtype))
    g = torch.Generator().manual_seed(11)
    for B, starts in ((1, [0]), (3, [0, 2, 5])):
        if DecodePlan.build(rt, B) is None:
            pytest.skip(f"the native kernel does not read this machine's packed {dtype} layout")
        prompt, tokens = torch.randint(2, VOCAB, (B, 6), generator=g), torch.randint(2, VOCAB, (5, B, 1), generator=g)
        planned, own = planned_and_own(rt, B, starts, prompt, tokens)
        assert all(torch.equal(a, b) for a, b in zip(planned, own))


@needs_kernel
def test_decode_plan_keeps_sliding_windows_and_the_context(tmp_path, monkeypatch):
    """Mistral's sliding window (keys leave it while decoding) through the plan equals the forward's own way; a
    step past the model's context is the same one-line error; without the kernel's layouts no plan is built."""
    path = export_for_the_kernel(tmp_path, "mistral", sliding_window=4, max_position_embeddings=9)
    rt = load_runtime(path)
    if DecodePlan.build(rt, 2) is None:
        pytest.skip("the native kernel does not read this machine's packed fp32 layout")
    g = torch.Generator().manual_seed(12)
    prompt, tokens = torch.randint(2, VOCAB, (2, 4), generator=g), torch.randint(2, VOCAB, (5, 2, 1), generator=g)
    planned, own = planned_and_own(rt, 2, [0, 1], prompt, tokens)
    assert all(torch.equal(a, b) for a, b in zip(planned, own))
    rt.decode_plans = {}
    cache = rt.new_cache(1, 9)
    rt.forward(torch.randint(2, VOCAB, (1, 8), generator=g), cache)
    rt.forward(tokens[0, :1], cache)
    with pytest.raises(MoEConvertError, match="10 positions exceed the model's context of 9"):
        rt.forward(tokens[1, :1], cache)
    monkeypatch.setattr(kernels, "register", lambda *args: False)  # as without the native kernel's layouts
    assert DecodePlan.build(load_runtime(path), 1) is None

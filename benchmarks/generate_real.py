"""`generate` on the real upcycled model (SmolLM2-135M, PR-MoE `--pyramid 8,16`: 30 layers, d=576) against
transformers' `generate` on the same upcycled model, and against the bytes floor of the active weights.

    python benchmarks/generate_real.py [--dtype fp32|bf16] [--new 64] [--rounds 5] [--threads 2] [--batch 8]

In one process, in alternating rounds (the medians are printed; the machine may be shared):
- decode tokens/s of one prompt (greedy, `--new` tokens, no EOS), ours and transformers' (its time for
  `--new` tokens less its time for 1);
- prefill of 256 tokens (the first token's time), ours and transformers';
- batched decode of `--batch` prompts of different lengths: new tokens/s over the batch, ours and
  transformers' (left padding, attention mask);
- the bytes floor: the bytes one decode step must read (attention, norms, the router and coefficient,
  the residual FFN and top-k experts of each MoE layer, dense FFNs, the LM head) over the memory
  bandwidth measured as `moe-convert doctor` measures it (`bench.measure_machine`: the best `sum` over 256 MiB).
Greedy tokens are checked equal to transformers' (fp32) before any timing.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from moe_convert.cli import tune_memory_for_inference

tune_memory_for_inference()  # as `generate` runs (huge pages, glibc reuse); before torch is imported
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moe_convert.inference.bench import EVICT_BYTES, measure_machine  # noqa: E402
from moe_convert.inference.kernels import PackedExperts  # noqa: E402
from moe_convert.inference.native import cpu_model  # noqa: E402
from moe_convert.inference.runtime import eos_token_ids, load_runtime  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from real_model import smollm2_prmoe  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Three reasons to learn Python are", "Once upon a time, in a small village by the river,",
           "The difference between a list and a tuple", "Q: What is 12 times 7?\nA:", "Photosynthesis is the process"]


def active_bytes(rt) -> int:
    """Bytes of the weights one decode token reads (module docstring)."""
    total = sum(w.nbytes + (0 if b is None else b.nbytes) for w, b in rt.proj.values()) + rt.lm_head.nbytes
    total += sum(v.nbytes for k, v in rt.t.items() if "norm" in k or "ln_" in k)
    for w in rt.ffns:
        if "dense" in w:
            total += sum(v.nbytes for v in w["dense"].values())
            continue
        moe = w["moe"]
        if isinstance(moe.stacked, PackedExperts):
            per_expert = sum(v.nbytes for v in moe.stacked.weights[0].values())
        else:  # stacked [E, in, out]
            per_expert = sum(v.nbytes for v in moe.stacked.values()) // moe.router.shape[0]
        total += moe.router.nbytes + moe.top_k * per_expert
        if moe.dense is not None:
            total += sum(v.nbytes for v in moe.dense.values()) + sum(c.nbytes for c in moe.coef)
    return total


def hf_generate(model, ids, mask, new):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the export's and transformers' dtype")
    ap.add_argument("--new", type=int, default=64, help="new tokens per generation (no EOS stop in the timed runs)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the medians are printed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (ours and transformers')")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together in the batched rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, export_dir = smollm2_prmoe(dtype=args.dtype)
    rt = load_runtime(export_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    prompt = tok(PROMPTS[0])["input_ids"]
    long_prompt = torch.randint(100, 40000, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = [tok(p)["input_ids"] for p in (PROMPTS * args.batch)[:args.batch]]
    tok.padding_side = "left"
    padded = tok((PROMPTS * args.batch)[:args.batch], return_tensors="pt", padding=True)

    ours = rt.generate(prompt, args.new, eos_token_id=eos_token_ids(export_dir, rt.cfg)).tokens
    with torch.inference_mode():  # the same stop as ours (the timed runs below force `--new` tokens)
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new, do_sample=False, pad_token_id=0)[0].tolist()
    same = "equal" if ours == ref else f"differ from token {next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)}"
    rows = {k: [] for k in ("ours decode", "hf decode", "ours prefill", "hf prefill", "ours batch", "hf batch")}
    for _ in range(args.rounds):
        rows["ours decode"].append(rt.generate(prompt, args.new).decode_tokens_per_s)
        t_new, _ = timed(lambda: hf_generate(hf, torch.tensor([prompt]), None, args.new))
        t_one, _ = timed(lambda: hf_generate(hf, torch.tensor([prompt]), None, 1))
        rows["hf decode"].append((args.new - 1) / (t_new - t_one))
        rows["ours prefill"].append(rt.generate(long_prompt, 1).prefill_s * 1e3)
        rows["hf prefill"].append(timed(lambda: hf_generate(hf, torch.tensor([long_prompt]), None, 1))[0] * 1e3)
        gens = rt.generate_batch(batch, args.new)
        rows["ours batch"].append(sum(g.new_tokens - 1 for g in gens) / max(g.decode_s for g in gens))
        t_new, _ = timed(lambda: hf_generate(hf, padded["input_ids"], padded["attention_mask"], args.new))
        t_one, _ = timed(lambda: hf_generate(hf, padded["input_ids"], padded["attention_mask"], 1))
        rows["hf batch"].append(args.batch * (args.new - 1) / (t_new - t_one))
    med = {k: statistics.median(v) for k, v in rows.items()}
    machine = measure_machine(rt.lm_head.shape[1], dtype, torch.ones(EVICT_BYTES // 4))
    nbytes = active_bytes(rt)
    floor = machine.bandwidth_gbs * 1e9 / nbytes
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {args.threads} threads; {args.dtype}; "
          f"{args.new} new tokens; medians of {args.rounds} alternating rounds; greedy tokens vs transformers: {same}")
    print("| measure | ours | transformers | ours / transformers |\n|---|---|---|---|")
    for name, unit, key in (("decode, 1 prompt", "tokens/s", "decode"), ("prefill, 256 tokens", "ms", "prefill"),
                            (f"decode, batch of {args.batch}", "tokens/s", "batch")):
        a, b = med[f"ours {key}"], med[f"hf {key}"]
        ratio = a / b if unit == "tokens/s" else b / a
        print(f"| {name} ({unit}) | {a:.1f} | {b:.1f} | {ratio:.2f}x |")
    print(f"bytes floor: {nbytes / 1e6:.0f} MB per token at {machine.bandwidth_gbs:.1f} GB/s = {floor:.1f} tokens/s; "
          f"ours decode at {floor / med['ours decode']:.2f}x of it")
    print({k: [round(x, 1) for x in v] for k, v in rows.items()})


if __name__ == "__main__":
    main()

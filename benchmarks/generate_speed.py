"""`generate` speed on a GPT-2-medium-width PR-MoE export (random weights, built in code).

    python benchmarks/generate_speed.py [--layers 8] [--hidden 1024] [--experts 8] [--prompt 256] [--new 32]

Builds the model (every other layer a PR-MoE layer with the residual FFN), saves it, exports it with
`moe-convert export --format safetensors`, loads it with the runtime and runs greedy generation
three times; prints the median prefill time and decode tokens/s. Run it from two checkouts (with
PYTHONPATH pointing at each) to compare versions back to back.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from moe_convert.configuration_prmoe import PRMoEConfig
from moe_convert.export import export
from moe_convert.modeling import PRMoEForCausalLM
from moe_convert.runtime import load_runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import GPT2Config

    host = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.hidden // 64, n_positions=1024)
    moe_layers = list(range(1, args.layers, 2))
    torch.manual_seed(0)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=host.to_dict(), moe_layers=moe_layers,
                                         num_experts=[args.experts] * len(moe_layers)))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "src")
        del model
        export(Path(tmp) / "src", Path(tmp) / "out")
        rt = load_runtime(Path(tmp) / "out")
    prompt = torch.randint(0, host.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    runs = [rt.generate(prompt, args.new) for _ in range(args.repeats + 1)][1:]  # the first warms up
    prefill = statistics.median(r.prefill_s for r in runs) * 1e3
    decode = statistics.median((r.new_tokens - 1) / r.decode_s for r in runs)
    print(f"{args.layers} layers, d={args.hidden}, {args.experts} experts in layers {moe_layers}: "
          f"prefill {args.prompt} tokens {prefill:.0f} ms, decode {decode:.1f} tokens/s (median of {args.repeats})")


if __name__ == "__main__":
    main()

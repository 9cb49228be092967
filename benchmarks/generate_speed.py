"""`generate` speed on a GPT-2-medium-width PR-MoE export (random weights, built in code).

    python benchmarks/generate_speed.py [--layers 8] [--hidden 1024] [--experts 8] [--prompt 256] [--new 32] [--dtype fp32]
                                        [--native-ab [all|rowmajor]]

Builds the model (every other layer a PR-MoE layer with the residual FFN), saves it, exports it with
`moe-convert export --format safetensors`, loads it with the runtime and runs greedy generation
three times; prints the load time, the median prefill time and decode tokens/s, the peak RSS of the
process after the model was built and saved (built in a child process, so it does not count), and
what is resident at the end. Run it from two checkouts (with PYTHONPATH pointing at each) to compare
versions back to back. `--native-ab` instead alternates generations with the native kernels
(`moe_convert/inference/native.py`: few-row matmuls, the decode layer, the LM head) on and off in this one
process, and prints the medians of both; `--native-ab rowmajor` switches only the row-major kernel
(the LM head).
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_convert.cli import tune_memory_for_inference

tune_memory_for_inference()  # as `generate` runs (huge pages, glibc reuse); before torch is imported
import torch  # noqa: E402

from moe_convert.model.configuration_prmoe import PRMoEConfig  # noqa: E402
from moe_convert.convert.export import export  # noqa: E402
from moe_convert.model.modeling import PRMoEForCausalLM  # noqa: E402
from moe_convert.inference.runtime import load_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", help="export dtype: fp32, bf16, fp16")
    ap.add_argument("--native-ab", nargs="?", const="all", choices=["all", "rowmajor"],
                    help="alternate runs with the native kernels (all, or the row-major one) on and off")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child process that builds the export
    args = ap.parse_args()
    if args.build:
        return build(args.build, args.layers, args.hidden, args.experts, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        # build + export in a child process: this one's peak RSS then measures only loading and generating
        subprocess.run([sys.executable, __file__, "--build", tmp, "--layers", str(args.layers), "--hidden",
                        str(args.hidden), "--experts", str(args.experts), "--dtype", args.dtype], check=True)
        start = time.perf_counter()
        rt = load_runtime(Path(tmp) / "out")
        load_s = time.perf_counter() - start
    prompt = torch.randint(0, 50257, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.native_ab:
        return native_ab(rt, prompt, args)
    runs = [rt.generate(prompt, args.new) for _ in range(args.repeats + 1)][1:]  # the first warms up
    prefill = statistics.median(r.prefill_s for r in runs) * 1e3
    decode = statistics.median(r.decode_tokens_per_s for r in runs)
    mib = {k: int(re.search(k + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
           for k in ("VmHWM", "RssAnon", "RssFile")}
    print(f"{args.layers} layers, d={args.hidden}, {args.experts} experts in every other layer, {args.dtype} export: "
          f"load {load_s:.1f} s, "
          f"prefill {args.prompt} tokens {prefill:.0f} ms, decode {decode:.1f} tokens/s (median of {args.repeats}); "
          f"peak RSS {mib['VmHWM']} MiB, resident at the end {mib['RssAnon']} MiB anonymous + {mib['RssFile']} MiB file")


def native_ab(rt, prompt: list[int], args) -> None:
    """Generations alternating with the native kernels on (their row limits as they are) and off (0: oneDNN);
    `args.native_ab`: all of them, or only the row-major one."""
    from moe_convert.inference import kernels, native

    if native.library() is None:
        sys.exit(f"the native kernel is off here: {native.why_unavailable()}")
    switched = [(native, "ROWMAJOR_MAX_ROWS", 0)]  # (module, name, its value for "off"): the row limits
    if args.native_ab == "all":  # the packed-weight kernel's, which the decoder also obeys, and prefill's FFNs
        switched += [(kernels, "NATIVE_BATCH_ROWS", 0), (kernels, "NATIVE_MAX_ROWS", 0),
                     (kernels, "native_prefill", lambda dtype: False)]
    on = {(module, name): getattr(module, name) for module, name, _ in switched}
    runs = {"native": [], "oneDNN": []}
    for i in range(2 * (args.repeats + 1)):
        name = "native" if i % 2 == 0 else "oneDNN"
        for module, attr, off in switched:
            setattr(module, attr, on[module, attr] if name == "native" else off)
        rt.decode_plans.clear()  # a decode step's prepared calls are built for the kernels switched on
        runs[name].append(rt.generate(prompt, args.new))
    for (module, attr), value in on.items():
        setattr(module, attr, value)
    decode = {k: statistics.median(r.decode_tokens_per_s for r in v[1:]) for k, v in runs.items()}  # first: warm-up
    tokens = {k: [round(r.decode_tokens_per_s, 1) for r in v[1:]] for k, v in runs.items()}
    print(f"decode tokens/s, median of {args.repeats} alternating runs: native ({args.native_ab}) "
          f"{decode['native']:.1f} {tokens['native']}, oneDNN {decode['oneDNN']:.1f} {tokens['oneDNN']}: "
          f"{decode['native'] / decode['oneDNN']:.2f}x")


def build(out: Path, layers: int, hidden: int, experts: int, dtype: str) -> None:
    from transformers import GPT2Config

    host = GPT2Config(n_layer=layers, n_embd=hidden, n_head=hidden // 64, n_positions=1024)
    moe_layers = list(range(1, layers, 2))
    torch.manual_seed(0)
    model = PRMoEForCausalLM(PRMoEConfig(text_config=host.to_dict(), moe_layers=moe_layers,
                                         num_experts=[experts] * len(moe_layers)))
    model.save_pretrained(out / "src")
    export(out / "src", out / "out", dtype=dtype)


if __name__ == "__main__":
    main()

"""Step time of `train` under --engine ddp, fsdp and deepspeed (--ep-size 2) on the same tiny PR-MoE, 2
torchrun processes (gloo on CPU), in ABCCBA order; prints each engine's mean of the runs' median step
times and the ratios to ddp. Then, computed from shapes: the bytes each GPU sends per optimizer step
for the paper's 1.3B+PR-MoE-64/128 on 64 GPUs (the recipe's train step) under expert parallelism
(all-to-all) and under FSDP (all-gather): the reason to train a large MoE with EP.

    python benchmarks/engine_step_time.py [MODEL] [--steps 30] [--batch-size 8] [--seq-len 128]

MODEL defaults to the shipped checkpoints/tiny-gpt2 upcycled with pyramid 4,8. The first 5 steps of
each run are not timed.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": [], "fsdp": ["--engine", "fsdp"], "deepspeed": ["--engine", "deepspeed", "--ep-size", "2"]}


def step_seconds(model: str, engine: str, out: Path, args) -> float:
    from moe_convert.inference.bench import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "moe_convert", "train", model, "--data", "builtin:pydoc", "-o", str(out), *ENGINES[engine],
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--eval-every", "0", "--eval-windows", "2", "--json", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = args.batch_size * args.seq_len
    return statistics.median(tokens / r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > 5)


def paper_step_bytes(gpus: int = 64) -> dict:
    """Bytes one GPU sends per optimizer step for recipes/paper-1.3b-prmoe-64-128-mos.yaml's train step
    (global batch 256 x 1024 tokens in 8 micro-batches, bf16) on `gpus` GPUs.

    EP (ep_size = gpus): per MoE layer and micro-batch four all-to-alls (dispatch and combine, forward and
    backward) of the capacity-padded (E, C, d) tensor, of which (N-1)/N leaves the GPU; plus ZeRO-2's one
    all-gather of the replicated (non-expert) weights after the step. FSDP: every parameter gathered twice
    per micro-batch (forward, and again for backward), (N-1)/N of it from other GPUs. Gradient reductions
    (FSDP's reduce-scatter of all 31B gradients, ZeRO-2's of the non-expert ones) come on top of each."""
    from transformers import GPT2Config

    from moe_convert.convert.summary import summarize_config
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.layout import build_layout

    dense = GPT2Config.from_json_file(ROOT / "recipes" / "configs" / "cerebras-gpt-1.3b.json")
    layout = build_layout(dense.num_hidden_layers, pyramid="64,128", capacity_factor=1.0)
    config = PRMoEConfig.from_layout(dense, layout)
    summary = summarize_config(config)
    experts = sum(r.expert_params for r in summary.layers)
    batch, seq, micro_batches, bf16 = 256, 1024, 8, 2
    tokens = batch * seq // (micro_batches * gpus)  # per GPU per micro-batch
    away = (gpus - 1) / gpus
    padded = sum(E * max(math.ceil(tokens / E * config.capacity_factor), config.min_capacity)
                 for E in config.num_experts)  # (E, C) slots per layer, summed over MoE layers
    all_to_all = 4 * micro_batches * padded * dense.n_embd * bf16 * away
    zero2_gather = (summary.total_params - experts) * bf16 * away
    fsdp_gather = 2 * micro_batches * summary.total_params * bf16 * away
    return {"gpus": gpus, "total_params": summary.total_params, "expert_params": experts,
            "ep_all_to_all_bytes": all_to_all, "ep_zero2_gather_bytes": zero2_gather,
            "fsdp_all_gather_bytes": fsdp_gather, "fsdp_over_ep": fsdp_gather / (all_to_all + zero2_gather)}


def main():
    from moe_convert.convert.upcycle import upcycle

    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    times = {engine: [] for engine in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "prmoe")
            upcycle(str(ROOT / "checkpoints" / "tiny-gpt2"), model, pyramid="4,8")
        for engine in [*ENGINES, *reversed(ENGINES)]:
            times[engine].append(step_seconds(model, engine, Path(tmp) / engine, args))
    mean = {e: statistics.mean(t) for e, t in times.items()}
    print(json.dumps({**{f"{e}_step_s": s for e, s in mean.items()},
                      **{f"{e}_over_ddp": mean[e] / mean["ddp"] for e in ENGINES if e != "ddp"},
                      "runs": times, "paper_1.3b_prmoe_64_128_per_gpu_step": paper_step_bytes()}))


if __name__ == "__main__":
    main()

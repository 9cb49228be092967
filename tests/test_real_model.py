"""The real-weight model: a GGUF source dequantizes into a directory that upcycles function-preservingly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_convert.convert.gguf import gguf_to_dir

pytestmark = pytest.mark.real_model


def test_a_gguf_file_is_a_source_dequantized_once_into_the_cache(smollm2):
    from real_model import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf_to_dir(gguf) == smollm2  # the same cached directory, not a second dequantization
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6


@pytest.mark.slow
def test_upcycled_real_model_is_function_preserving_and_spreads_tokens(smollm2, tmp_path):
    """`--pyramid 8,16` on SmolLM2-135M: the logits stay the dense model's (the contract: max |dlogits| <= 1e-3) and
    on held-out text no expert of any MoE layer takes more than twice its fair share of the tokens."""
    from moe_convert.convert.upcycle import upcycle

    s = upcycle(str(smollm2), tmp_path / "moe", pyramid="8,16")
    assert s.experts_per_layer == [8] * 13 + [16] * 2 and "held-out builtin:pydoc" in s.fidelity
    assert s.max_abs_logit_diff <= 1e-3 and abs(s.kl) < 1e-6
    worst = max(share * e for share, e in zip(s.max_expert_share, s.experts_per_layer))
    assert worst <= 2.0, s.max_expert_share

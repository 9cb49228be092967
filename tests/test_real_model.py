"""The real-weight model: a GGUF source dequantizes into a directory that upcycles function-preservingly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_convert.convert.gguf import gguf_to_dir
from moe_convert.convert.upcycle import resolve_source

pytestmark = pytest.mark.real_model


def test_a_gguf_file_is_a_source_dequantized_once_into_the_cache(smollm2):
    from real_model import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf_to_dir(gguf) == smollm2  # the same cached directory, not a second dequantization
    assert resolve_source(str(gguf)) == smollm2  # a GGUF file is an upcycle SOURCE
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6

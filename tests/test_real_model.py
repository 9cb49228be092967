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


def test_measured_layers_to_drop_keep_the_real_student_near_its_teacher(smollm2):
    """SmolLM2 without 3 of its 30 layers: the measured choice starts far closer to the teacher than the
    front rule's (layers 1-3), on the training windows it was measured on."""
    from moe_convert.io import load_tokenizer
    from moe_convert.training.data import load_packed
    from moe_convert.training.layer_drop import calibration_windows, choose_dropped

    train = load_packed("builtin:pydoc", load_tokenizer(smollm2), 64).train
    choice = choose_dropped(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                            calibration_windows(train, 0, tokens=256), 3)
    ppl = {tuple(c.dropped): c.calibration_ppl for c in choice.candidates}
    assert ppl[tuple(choice.dropped)] * 50 < ppl[(1, 2, 3)] and ppl[tuple(choice.dropped)] < 10 * choice.teacher_ppl

"""The real-weight model: a GGUF source dequantizes into a directory that upcycles function-preservingly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_convert.convert import gguf as gguf_module
from moe_convert.convert.gguf import gguf_to_dir
from moe_convert.convert.upcycle import resolve_source

pytestmark = pytest.mark.real_model


def test_a_gguf_file_is_a_source_dequantized_once_into_the_cache(smollm2, monkeypatch):
    from real_model import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf_to_dir(gguf) == smollm2  # the same cached directory, not a second dequantization
    monkeypatch.setattr(gguf_module, "file_sha256", lambda path: pytest.fail("hashed the unchanged GGUF again"))
    assert gguf_to_dir(gguf) == smollm2  # its hash remembered by path, size and modification time
    assert resolve_source(str(gguf)) == smollm2  # a GGUF file is an upcycle SOURCE
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6


@pytest.mark.slow
def test_upcycled_real_model_is_function_preserving_and_spreads_tokens(smollm2_upcycled):
    """`--pyramid 8,16` on SmolLM2-135M: the logits stay the dense model's (the contract: max |dlogits| <= 1e-3) and
    on held-out text no expert of any MoE layer takes more than twice its fair share of the tokens."""
    _, s = smollm2_upcycled
    assert s.experts_per_layer == [8] * 13 + [16] * 2 and "held-out builtin:pydoc" in s.fidelity
    assert s.max_abs_logit_diff <= 1e-3 and abs(s.kl) < 1e-6
    worst = max(share * e for share, e in zip(s.max_expert_share, s.experts_per_layer))
    assert worst <= 2.0, s.max_expert_share


@pytest.mark.slow
def test_generate_on_the_upcycled_real_model_equals_transformers(smollm2_upcycled, tmp_path):
    """30 layers, d=576, 9 query / 3 key-value heads, a 49K tied LM head: greedy tokens equal transformers'
    `generate` on the same upcycled model for 3 prompts, one at a time and as one batch."""
    from transformers import AutoTokenizer

    from moe_convert.convert.export import export
    from moe_convert.inference.runtime import eos_token_ids, load_runtime

    model_dir, _ = smollm2_upcycled
    export_dir = tmp_path / "export"
    export(model_dir, export_dir, dtype="fp32")
    rt = load_runtime(export_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    prompts = [tok(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):",
                                             "Once upon a time, in a small village by the river, there lived")]
    eos = eos_token_ids(export_dir, rt.cfg)  # as transformers takes it from the generation config
    batch = rt.generate_batch(prompts, 10, eos_token_id=eos)
    for p, b in zip(prompts, batch):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0].tolist()
        assert rt.generate(p, 10, eos_token_id=eos).tokens == b.tokens == ref


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

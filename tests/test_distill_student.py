"""Mixture-of-Students construction and the KD loss formula."""

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from conftest import VOCAB, tiny_gpt2_config, tiny_prmoe
from moe_convert.model.configuration_prmoe import PRMoEConfig
from moe_convert.errors import MoEConvertError
from moe_convert.training.config import DistillJob
from moe_convert.training.distill import (build_student, kd_loss, kd_loss_top_k, measure_plan, plan_student,
                                          student_config, top_k_of)
from moe_convert.training.layer_drop import (Candidate, DropChoice, calibration_windows, choose_dropped,
                                             decoder_layers)


def paper_teacher_config():
    from transformers import GPT2Config

    host = GPT2Config(n_layer=24, n_embd=64, n_head=2, vocab_size=VOCAB)
    return PRMoEConfig(text_config=host.to_dict(), moe_layers=list(range(1, 24, 2)), num_experts=[32] * 10 + [64] * 2)


def test_default_plan_is_the_papers_L21_student():
    plan = plan_student(paper_teacher_config(), -3)
    assert plan.depth == 21 and plan.dropped == [1, 2, 3]  # two early small MoE layers and one dense layer
    assert plan.num_experts == [32] * 8 + [64] * 2  # PAPER.md: 10 MoE layers, 8x32 + 2x64
    assert plan_student(paper_teacher_config(), 21).kept == plan.kept


def test_named_layers_and_bad_depths():
    cfg = paper_teacher_config()
    plan = plan_student(cfg, None, keep_layers="0,2,3,5,7,9,11,13,15,17,19,21,22,23")
    assert plan.depth == 14 and plan.moe_layers == [i for i, t in enumerate(plan.kept) if t % 2 == 1]
    for bad in (-24, 0, 24, 30):
        with pytest.raises(MoEConvertError, match="student_layers"):
            plan_student(cfg, bad)
    with pytest.raises(MoEConvertError, match="keep_layers"):
        plan_student(cfg, None, keep_layers="3,1")


def test_teacher_init_copies_kept_layers_exactly(host):
    teacher = tiny_prmoe(host, moe_layers=(1, 3), num_experts=(3, 5), seed=2).eval()
    plan = plan_student(teacher.config, -1)  # drops layer 1 (a MoE layer), keeps 0, 2, 3
    student = build_student(teacher, plan, "teacher").eval()
    assert plan.kept == [0, 2, 3] and student.config.moe_layers == [2] and student.config.num_experts == [5]
    t_layers = teacher.host.get_submodule("transformer.h" if host == "gpt2" else "model.layers")
    s_layers = student.host.get_submodule("transformer.h" if host == "gpt2" else "model.layers")
    for i, t in enumerate(plan.kept):
        for (name, a), (_, b) in zip(t_layers[t].state_dict().items(), s_layers[i].state_dict().items()):
            assert torch.equal(a, b), (i, t, name)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert student(ids).logits.shape == (2, 10, VOCAB)


def test_dense_teacher_student():
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(tiny_gpt2_config())
    plan = plan_student(teacher.config, -2)
    student = build_student(teacher, plan, "teacher")
    assert student.config.num_hidden_layers == 2 and plan.kept == [0, 3]
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)
    scratch = build_student(teacher, plan, "scratch")
    assert not torch.equal(scratch.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)
    assert student_config(teacher.config, plan).n_layer == 2


def test_a_layer_index_that_shapes_attention_refuses_teacher_init():
    """GPT-2 with scale_attn_by_inverse_layer_idx: a kept layer at a new index would compute otherwise."""
    teacher = GPT2LMHeadModel(tiny_gpt2_config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(MoEConvertError, match="scale_attn_by_inverse_layer_idx"):
        build_student(teacher, plan_student(teacher.config, -2), "teacher")
    first = build_student(teacher, plan_student(teacher.config, 2, "0,1"), "teacher")  # same indices: allowed
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        want = teacher.transformer.ln_f(teacher(ids, output_hidden_states=True).hidden_states[2])  # after block 1
        got = first(ids, output_hidden_states=True).hidden_states[2]  # the student's last: ln_f applied
    torch.testing.assert_close(got, want)
    build_student(teacher, plan_student(teacher.config, -2), "scratch")


def test_top_k_kd_is_full_kd_at_k_v_and_keeps_the_rest_as_one_outcome():
    torch.manual_seed(3)
    s, t = torch.randn(2, 6, 11) * 2, torch.randn(2, 6, 11) * 2
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 2] = -100
    full = kd_loss(s, t, labels, 0.3, 1.7)
    top = kd_loss_top_k(s, *top_k_of(t, 11, 1.7), labels, 0.3, 1.7)
    assert all(torch.allclose(full[k], top[k], rtol=1e-5) for k in full)
    # K = 3: KL over the teacher's 3 best tokens plus "any other", both sides' probabilities from full softmaxes
    values, ids, lse = top_k_of(t, 3, 1.7)
    keep = labels[:, 1:] != -100
    pt = (t / 1.7).softmax(-1).gather(-1, ids)[:, :-1][keep]  # (N, 3)
    ps = (s / 1.7).softmax(-1).gather(-1, ids)[:, :-1][keep]
    pt = torch.cat([pt, 1 - pt.sum(-1, keepdim=True)], -1)
    ps = torch.cat([ps, 1 - ps.sum(-1, keepdim=True)], -1)
    want = 1.7**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    got = kd_loss_top_k(s, values, ids, lse, labels, 0.3, 1.7)["kd"]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_top_k_kd_scores_a_tiny_outside_mass_in_log_space():
    """A confident student puts ~1e-12 outside the teacher's top 2: 1 - sum(p) rounds that to 0 in fp32,
    which overstated KL and left no gradient back towards the other tokens. fp64 is the oracle."""
    t = torch.tensor([[[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5], [0.0] * 8]])
    s = torch.tensor([[[40.0, 30.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8]], requires_grad=True)
    labels = torch.tensor([[0, 1]])

    def oracle(s):  # K + 1 outcomes from full softmaxes, in fp64
        pt, ps = t[0, 0].double().softmax(-1), s[0, 0].double().softmax(-1)
        p = torch.stack([pt[0], pt[1], pt[2:].sum()])
        q = torch.stack([ps[0], ps[1], ps[2:].sum()])
        return (p * (p.log() - q.log())).sum()
    got = kd_loss_top_k(s, *top_k_of(t, 2, 1.0), labels, 0.0, 1.0)["kd"]
    want = oracle(s)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g,) = torch.autograd.grad(got, s)
    (w,) = torch.autograd.grad(oracle(s), s)
    torch.testing.assert_close(g[0, 0].double(), w[0, 0].double(), rtol=1e-4, atol=1e-9)


def test_kd_loss_is_the_formula_on_hand_made_logits():
    # One sequence of 3 tokens, vocabulary 2; position 1's label is padding.
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, -100]])  # only position 0 predicts a real label (token 1)
    alpha, T = 0.25, 2.0
    out = kd_loss(s, t, labels, alpha, T)
    # position 0 only: student logits (1, 0), teacher logits (0, 1), at temperature 2
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(1 / (1 + math.e))
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["kd"].item() == pytest.approx(T * T * kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * T * T * kl, rel=1e-6)


def test_kd_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 7, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 7))
    assert kd_loss(logits, logits.clone(), labels, 0.5, 1.0)["kd"].abs().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_in_blocks_equals_the_formula_in_float64_with_its_gradient(dtype, monkeypatch):
    """Blocks of 3 positions (`KD_BLOCK_BYTES`), padding among them: value and gradient of the loss equal the
    plain formula computed in float64 on the same logits."""
    from moe_convert.training import distill

    torch.manual_seed(5)
    V = 13
    monkeypatch.setattr(distill, "KD_BLOCK_BYTES", 3 * 4 * V)
    s = (torch.randn(3, 8, V) * 2).to(dtype).requires_grad_()
    t = (torch.randn(3, 8, V) * 2).to(dtype)
    labels = torch.randint(0, V, (3, 8))
    labels[1, 3:6] = -100
    alpha, T = 0.3, 1.7
    got = kd_loss(s, t, labels, alpha, T)
    keep = labels[:, 1:] != -100
    s64, t64 = s[:, :-1][keep].double(), t[:, :-1][keep].double()
    ce = F.cross_entropy(s64, labels[:, 1:][keep])
    log_pt, log_ps = (t64 / T).log_softmax(-1), (s64 / T).log_softmax(-1)
    kd = T * T * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    want = {"ce": ce, "kd": kd, "loss": (1 - alpha) * ce + alpha * kd}
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5)
    (g,) = torch.autograd.grad(got["loss"], s)
    (w,) = torch.autograd.grad(want["loss"], s)
    assert g.dtype == dtype
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(g.double(), w.double(), **tolerance)


# --- which layers a student drops (`--drop-by`) ---------------------------------------------------

# the projections whose outputs a decoder layer adds to the residual stream: zeroed, the layer is the identity
RESIDUAL_WRITERS = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "llama": ("self_attn.o_proj", "mlp.down_proj")}


def teacher_with_an_identity_layer(host, layer=2, seed=0):
    """A tiny PR-MoE (MoE at 1 and 3, weights scaled up so every layer matters) whose layer `layer`
    writes nothing to the residual stream, and 16 windows of 24 tokens it wrote itself (sampled)."""
    teacher = tiny_prmoe(host, moe_layers=(1, 3), num_experts=(3, 5), seed=seed).eval()
    layers, _ = decoder_layers(teacher)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(4)
        for name, p in getattr(layers, _).named_parameters():
            if name.startswith(f"{layer}.") and name.rsplit(".", 1)[0].endswith(RESIDUAL_WRITERS[host]):
                p.zero_()
        torch.manual_seed(seed)
        ids = torch.randint(0, VOCAB, (16, 1))
        for _ in range(23):  # on its own text the teacher is best, and any student that differs from it is worse
            probs = teacher(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    return teacher, ids


def test_measured_drop_finds_the_identity_layer_and_scores_on_the_sample(host):
    teacher, windows = teacher_with_an_identity_layer(host)
    choice = choose_dropped(teacher, windows, 1)
    assert choice.dropped == [2] and choice.kept == [0, 1, 3]
    assert choice.block_influence[2] < 1e-6 and choice.angular_distance[2] < 1e-3
    chosen = next(c for c in choice.candidates if c.dropped == [2])
    assert chosen.calibration_ppl == pytest.approx(choice.teacher_ppl, rel=1e-5)  # the student is the teacher
    # oracle: the scores from the hidden states transformers returns (the last one is after the final norm)
    with torch.no_grad():
        hs = teacher(input_ids=windows, output_hidden_states=True).hidden_states
    for i in range(len(hs) - 2):
        cos = F.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert choice.block_influence[i] == pytest.approx((1 - cos).mean().item(), rel=1e-4, abs=1e-6)
        assert choice.angular_distance[i] == pytest.approx((cos.clamp(-1, 1).arccos() / math.pi).mean().item(),
                                                           rel=1e-3, abs=1e-4)


def test_each_candidate_is_scored_as_the_student_build_student_makes():
    """The teacher run without the dropped layers is the teacher-initialised student: the candidates'
    perplexities are the built students', and the choice is the lowest."""
    from moe_convert.training.train import evaluate

    teacher, windows = teacher_with_an_identity_layer("llama", seed=3)
    choice = choose_dropped(teacher, windows, 2)
    assert sorted(c.dropped for c in choice.candidates) == [[0, 1], [1, 2], [2, 3]]  # every block of 2 (front: 1, 2)
    for c in choice.candidates:
        student = build_student(teacher, plan_student(teacher.config, None, [i for i in range(4) if i not in c.dropped]))
        assert evaluate(student, windows)["ppl"] == pytest.approx(c.calibration_ppl, rel=1e-5), c.dropped
    assert choice.dropped == min(choice.candidates, key=lambda c: c.calibration_ppl).dropped


def test_the_calibration_sample_and_the_choice_are_deterministic_for_a_seed():
    train = torch.arange(40 * 8).view(40, 8)
    a, b = calibration_windows(train, 0, tokens=80), calibration_windows(train, 0, tokens=80)
    assert a.shape == (10, 8) and torch.equal(a, b) and not torch.equal(a, calibration_windows(train, 1, tokens=80))
    assert len(calibration_windows(train, 0, tokens=10**6)) == 40  # never more windows than there are
    teacher, windows = teacher_with_an_identity_layer("gpt2", seed=1)
    assert choose_dropped(teacher, windows, 2) == choose_dropped(teacher, windows, 2)


def test_drop_by_options_and_the_recorded_choice(tmp_path):
    common = dict(model="t", data="d", output="o")
    assert DistillJob(**common).drop_rule == "measured"
    assert DistillJob(**common, student_init="scratch").drop_rule == "front"
    assert DistillJob(**common, keep_layers="0,2").drop_rule is None
    for bad, message in [(dict(drop_by="best"), "drop_by: must be one of measured, front"),
                         (dict(drop_by="front", keep_layers="0,2"), "give one of them"),
                         (dict(drop_by="measured", student_init="scratch"), "scratch student uses front")]:
        with pytest.raises(MoEConvertError, match=message):
            DistillJob(**common, **bad)
    cfg = paper_teacher_config()  # front and --keep-layers plans need no teacher
    assert measure_plan(DistillJob(**common, drop_by="front", student_layers=-3), cfg, None, None)[0].dropped == [1, 2, 3]
    assert measure_plan(DistillJob(**common, keep_layers="0,1,2"), cfg, None, None)[1] is None
    # a resumed run keeps the student its output records
    recorded = DropChoice([5, 6, 7], [i for i in range(24) if i not in (5, 6, 7)], 64, 9.0, [0.1] * 24, [0.2] * 22,
                          [Candidate([5, 6, 7], "angular distance", 0.2, 10.0)])
    (tmp_path / "layer_drop.json").write_text(json.dumps(asdict(recorded)))
    plan, choice = measure_plan(DistillJob(**common, student_layers=-3), cfg, None, None, tmp_path / "layer_drop.json")
    assert plan.dropped == [5, 6, 7] and choice == recorded

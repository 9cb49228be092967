"""Mixture-of-Students construction and the KD loss formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from conftest import VOCAB, tiny_gpt2_config, tiny_prmoe
from moe_convert.model.configuration_prmoe import PRMoEConfig
from moe_convert.training.distill import build_student, kd_loss, kd_loss_top_k, plan_student, student_config, top_k_of
from moe_convert.errors import MoEConvertError


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

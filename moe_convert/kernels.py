"""Token routing, sort-based dispatch, expert matmuls over contiguous slices, and combine.

This is the fast path both the PR-MoE layer (`moe.py`) and the inference runtime call. It never
builds a `tokens x experts x capacity` one-hot tensor: the gate produces a dense token->expert
mapping, a stable sort groups the assignments by expert, each expert multiplies one contiguous
slice, and an index-add scatters the weighted results back (DeepSpeed-MoE paper, section 5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import expert_capacity


@dataclass
class Routing:
    """Where each (token, choice) assignment goes, grouped by expert.

    N is the number of assignments that survive capacity (T*k when dropless).
    """

    token: torch.Tensor  # (N,) int64: source token of each assignment, grouped by expert
    weight: torch.Tensor  # (N,) fp32: combine weight of each assignment
    counts: torch.Tensor  # (E,) int64: assignments per expert (after capacity)
    aux_loss: torch.Tensor  # () fp32: E * sum_e mean(p_e) * fraction routed to e (first choice)
    first_choice_counts: torch.Tensor  # (E,) int64: first-choice tokens per expert, before capacity


def route(
    logits: torch.Tensor,
    top_k: int = 1,
    capacity_factor: float | None = None,
    min_capacity: int = 4,
) -> Routing:
    """Gate: softmax over experts, top-k choice, capacity, and the dispatch order.

    Semantics pinned to DeepSpeed's `top1gating` / `top2gating`:
    - top-1 combines with the raw probability; top-k>1 renormalises the kept choices to sum to 1;
    - with a capacity factor, an expert keeps its first `capacity` assignments in priority order
      (all first choices in token order, then all second choices, ...); dropped assignments give
      zero expert output; `None` is dropless.
    """
    T, E = logits.shape
    probs = logits.float().softmax(dim=-1)  # (T, E)
    if top_k == 1:
        top_e = probs.argmax(dim=-1, keepdim=True)  # (T, 1), argmax exactly as DeepSpeed top-1
        top_p = probs.gather(-1, top_e)
    else:
        top_p, top_e = probs.topk(top_k, dim=-1)  # (T, k)

    # Choice-major flattening gives the priority order: every token's first choice, then seconds.
    flat_e = top_e.t().reshape(-1)  # (k*T,)
    order = flat_e.argsort(stable=True)  # (k*T,) assignment ids grouped by expert
    counts = torch.bincount(flat_e, minlength=E)  # (E,)

    kept = torch.ones_like(top_p, dtype=torch.bool)  # (T, k)
    if capacity_factor is not None:
        cap = expert_capacity(T, E, top_k, capacity_factor, min_capacity)
        starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
        rank = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
        order = order[rank < cap]
        counts = counts.clamp(max=cap)
        kept_flat = torch.zeros_like(flat_e, dtype=torch.bool)
        kept_flat[order] = True
        kept = kept_flat.view(top_k, T).t()

    weight = top_p * kept
    if top_k > 1:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).eps)

    first = top_e[:, 0]
    first_counts = torch.bincount(first, minlength=E)
    aux = E * torch.sum(probs.mean(0) * first_counts.to(probs.dtype) / T)
    return Routing(
        token=order % T,
        weight=weight.t().reshape(-1)[order],
        counts=counts,
        aux_loss=aux,
        first_choice_counts=first_counts,
    )


def ffn(x: torch.Tensor, w: dict[str, torch.Tensor], act) -> torch.Tensor:
    """One feed-forward network on x (n, d) with weights stored [in, out].

    GPT-2 kind (`w_in`, `b_in`, `w_out`, `b_out`): act(x W1 + b1) W2 + b2, as `Conv1D` computes it.
    Gated kind (`w_gate`, `w_up`, `w_out`): (act(x Wg) * x Wu) Wd, as Llama/Mistral/Qwen2 do.
    """
    if "w_gate" in w:
        h = act(x @ w["w_gate"]) * (x @ w["w_up"])  # (n, f)
    else:
        h = act(torch.addmm(w["b_in"], x, w["w_in"]))  # (n, f)
    if "b_out" in w:
        return torch.addmm(w["b_out"], h, w["w_out"])  # (n, d)
    return h @ w["w_out"]


def expert_ffn(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor], act) -> torch.Tensor:
    """Run each expert on its contiguous slice of the expert-sorted tokens.

    x_sorted (N, d), counts (E,), stacked weights [E, ...] -> (N, d). Experts that received no
    tokens are skipped: their weights are never read.
    """
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        outs.append(ffn(x_sorted[start : start + n], {k: v[e] for k, v in stacked.items()}, act))
        start += n
    if not outs:
        return x_sorted.new_zeros(0, x_sorted.shape[-1])
    return torch.cat(outs)


def combine(y_sorted: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Un-sort: weighted expert outputs (N, d) scattered back to their tokens -> (T, d)."""
    out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    return out.index_add_(0, routing.token, y_sorted * routing.weight.unsqueeze(-1).to(y_sorted.dtype))


def moe_forward(x: torch.Tensor, router_weight: torch.Tensor, stacked: dict, act, top_k=1, capacity_factor=None,
                min_capacity=4, dropout: float = 0.0, training: bool = False) -> tuple[torch.Tensor, Routing]:
    """Routed-expert branch for x (T, d): gate in fp32, dispatch by sort, experts, combine -> (T, d)."""
    logits = F.linear(x.float(), router_weight.float())  # (T, E) fp32, as DeepSpeed's gate
    routing = route(logits, top_k, capacity_factor, min_capacity)
    y = expert_ffn(x[routing.token], routing.counts, stacked, act)  # (N, d)
    if dropout and training:
        y = F.dropout(y, dropout, training=True)
    return combine(y, routing, x.shape[0]), routing

"""The PR-MoE layer: router, stacked experts, residual dense branch with its coefficient, aux loss.

Semantics are DeepSpeed's `deepspeed.moe.layer.MoE(..., use_residual=True)` (PR-MoE, arXiv 2201.05596):

    p = softmax(x W_g^T)                    router, no bias, fp32
    moe(x) = sum_{e in top-k} w_e E_e(x)    w_e = p_e for top-1 (raw), renormalised for k > 1
    c = softmax(x W_c^T + b_c)              2-way coefficient (index 0 = experts, 1 = dense)
    y = c_0 moe(x) + c_1 mlp(x)             residual on; y = moe(x) when off
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import RouterLoad, expert_ffn, moe_forward

# Stacked expert tensors of each FFN kind, [E, in, out]; letters name the dimensions.
EXPERT_PARAMS = {
    "mlp": {"w_in": "Edf", "b_in": "Ef", "w_out": "Efd", "b_out": "Ed"},  # GPT-2: act(x W1 + b1) W2 + b2
    "gated": {"w_gate": "Edf", "w_up": "Edf", "w_out": "Efd"},  # Llama family: (act(x Wg) * x Wu) Wd
}


class Experts(nn.Module):
    """E feed-forward experts of one kind, stored stacked `[E, in, out]` (grouped-GEMM ready)."""

    def __init__(self, kind: str, num_experts: int, hidden: int, inner: int, act, dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        self.kind, self.num_experts, self.act, self.dropout = kind, num_experts, act, dropout
        self.backend: str | None = None  # "loop" or "grouped_mm" forces that backend; None: `routing.pick_backend`
        sizes = {"E": num_experts, "d": hidden, "f": inner}
        for name, dims in EXPERT_PARAMS[kind].items():
            param = nn.Parameter(torch.empty(*(sizes[c] for c in dims)))
            if name.startswith("b_"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=init_std)
            self.register_parameter(name, param)

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in EXPERT_PARAMS[self.kind]}

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert (N, d), `counts[e]` of them for expert e -> each through its expert (N, d)."""
        return expert_ffn(x_sorted, counts, self.stacked(), self.act, self.backend)

    def extra_repr(self) -> str:
        E, d, f = self.w_out.shape[0], self.w_out.shape[2], self.w_out.shape[1]
        return f"kind={self.kind}, num_experts={E}, hidden={d}, inner={f}"


class PRMoELayer(nn.Module):
    """Drop-in replacement for a host FFN: (..., d) -> (..., d).

    After each forward, `aux_loss` holds this layer's load-balancing loss, `load` its terms as sums
    (`RouterLoad`, for an aux loss over more tokens than one forward's) and `expert_counts` the
    first-choice tokens per expert (for balance reports).
    """

    def __init__(self, hidden: int, experts: Experts, dense: nn.Module | None = None, top_k: int = 1,
                 capacity_factor: float | None = None, min_capacity: int = 4):
        super().__init__()
        self.top_k, self.capacity_factor, self.min_capacity = top_k, capacity_factor, min_capacity
        self.router = nn.Linear(hidden, experts.num_experts, bias=False)
        self.experts = experts
        if dense is not None:
            self.mlp = dense
            self.coefficient = nn.Linear(hidden, 2)
        self.aux_loss: torch.Tensor | None = None
        self.load: RouterLoad | None = None
        self.expert_counts: torch.Tensor | None = None

    @property
    def residual(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        # residual: coef (T, 2) and the dense FFN's output (T, d), mixed inside routing's combine
        residual = (self.coefficient(x).softmax(dim=-1), self.mlp(x)) if self.residual else None
        y, routing = moe_forward(x, self.router.weight, self.experts, self.top_k, self.capacity_factor,
                                 self.min_capacity, self.experts.dropout, self.training, residual)  # (T, d)
        self.aux_loss = routing.aux_loss
        self.load = routing.load
        self.expert_counts = routing.first_choice_counts.detach()
        return y.reshape(shape)

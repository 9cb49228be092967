"""Token routing, sort-based dispatch, expert matmuls over contiguous slices, and a fused combine.

The PR-MoE layer (`moe.py`) and the inference runtime both run this. It never builds a
`tokens x experts x capacity` one-hot tensor: the gate produces a dense token->expert mapping, a
stable sort groups the assignments by expert, each expert multiplies one contiguous slice, and an
index-add scatters the weighted results back (DeepSpeed-MoE, arXiv 2201.05596, section 5.3) straight
into the residual branch's output. Experts that got no tokens are never read.

Everything here is plain torch: a saved checkpoint's copy of this file runs it as is. The matmuls go
through a small registry of backends (`BACKENDS`), each call's chosen in one place (`implementation`):
- "linear": the gate's matmul;
- "loop": per expert that received tokens, its FFN over its contiguous slice;
- "grouped_mm": `torch.nn.functional.grouped_mm` with per-expert offsets (one call per matrix).
In the installed package, `moe_convert.inference.kernels` registers its faster CPU versions of "linear"
and "loop" (oneDNN, the native kernel; the same results to fp32 rounding) for calls without autograd
or autocast as soon as this module loads (the package's `__init__` hooks the import).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import expert_capacity

# Activations by config name, as fused torch functions (one pass over memory instead of several).
ACTIVATIONS = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's tanh GELU
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}
# transformers' activation modules with a fused equivalent above (same function to fp32 rounding).
_FUSED_BY_CLASS = {
    "NewGELUActivation": "gelu_new", "GELUTanh": "gelu_pytorch_tanh", "PytorchGELUTanh": "gelu_pytorch_tanh",
    "FastGELUActivation": "gelu_fast", "GELUActivation": "gelu", "GELU": "gelu", "SiLUActivation": "silu",
    "SiLU": "silu", "ReLU": "relu",
}


def fused_activation(act):
    """The fused torch function computing `act` (a transformers/torch activation module), else `act` itself."""
    if isinstance(act, torch.nn.GELU) and act.approximate == "tanh":
        return ACTIVATIONS["gelu_pytorch_tanh"]
    return ACTIVATIONS.get(_FUSED_BY_CLASS.get(type(act).__name__), act)


@dataclass
class Routing:
    """Where each (token, choice) assignment goes, grouped by expert.

    N is the number of assignments that survive capacity (T*k when dropless).
    """

    token: torch.Tensor  # (N,) int64: source token of each assignment, grouped by expert
    weight: torch.Tensor  # (N,) fp32: combine weight of each assignment
    counts: torch.Tensor  # (E,) int64: assignments per expert (after capacity)
    first_choice_counts: torch.Tensor  # (E,) int64: first-choice tokens per expert, before capacity
    probs: torch.Tensor  # (T, E) fp32: the gate's probabilities
    routed: torch.Tensor  # (E,) share of the counted choices routed to each expert (first choices; k > 2: all)
    aux_counts: torch.Tensor  # (E,) int64: the counted choices per expert, before capacity (`routed`'s numerators)

    @property
    def load(self) -> "RouterLoad":
        """This forward's terms of the aux loss as sums, which add up over forwards (a larger batch's aux loss)."""
        return RouterLoad(self.probs.sum(0), self.aux_counts, self.probs.shape[0])

    @property
    def aux_loss(self) -> torch.Tensor:
        """() fp32: E * sum_e mean(p_e) * routed_e, computed when asked for (training; inference never does)."""
        return self.probs.shape[1] * torch.sum(self.probs.mean(0) * self.routed.to(self.probs.dtype))


@dataclass
class RouterLoad:
    """A gate's load over some tokens as sums. Summed over several forwards (micro-batches, processes) they
    give the aux loss of all their tokens together: E * sum_e (prob_sum_e / tokens) * (counts_e / sum(counts))."""

    prob_sum: torch.Tensor  # (E,) fp32: sum over tokens of the gate's probabilities (keeps its gradient)
    counts: torch.Tensor  # (E,) int64: the choices the aux loss counts (first choices; k > 2: all k)
    tokens: int


def route(
    logits: torch.Tensor,
    top_k: int = 1,
    capacity_factor: float | None = None,
    min_capacity: int = 4,
) -> Routing:
    """Gate: softmax over experts, top-k choice, capacity, and the dispatch order.

    Semantics pinned to DeepSpeed's `top1gating` / `top2gating` / `topkgating`:
    - top-1 combines with the raw probability; top-k>1 renormalises the kept choices to sum to 1;
      top-2's second choice is the second most probable expert (DeepSpeed with
      `top2_2nd_expert_sampling=False`; by default it samples it with Gumbel noise);
    - with a capacity factor, an expert keeps its first `capacity` assignments in priority order
      (all first choices in token order, then all second choices), as DeepSpeed's top-2 gate does
      (its top-1 gate keeps a random set); for k > 2 its most probable ones, as DeepSpeed's
      top-k gate does. Dropped assignments give zero expert output; `None` is dropless;
    - the aux loss counts first choices for k <= 2 and every choice (over k) for k > 2, as those gates do.
    """
    T, E = logits.shape
    probs = logits.float().softmax(dim=-1)  # (T, E)
    if top_k == 1:  # (T, 1) each; the first maximum, as DeepSpeed top-1's argmax
        top_p, top_e = probs.max(dim=-1, keepdim=True)
    else:
        top_p, top_e = probs.topk(top_k, dim=-1)  # (T, k)

    # Choice-major flattening gives the priority order: every token's first choice, then seconds.
    flat_e = top_e.t().reshape(-1)  # (k*T,)
    order = flat_e.argsort(stable=True)  # (k*T,) assignment ids grouped by expert
    counts = assigned = _bincount(flat_e, E)  # (E,) before capacity
    first_counts = counts if top_k == 1 else _bincount(top_e[:, 0], E)  # before capacity

    weight = top_p  # (T, k)
    if capacity_factor is not None:
        cap = expert_capacity(T, E, top_k, capacity_factor, min_capacity)
        if top_k > 2:  # each expert's assignments by falling probability: the most probable are kept
            by_p = top_p.t().reshape(-1).argsort(descending=True, stable=True)  # (k*T,)
            order = by_p[flat_e[by_p].argsort(stable=True)]
        starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
        rank = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
        order = order[rank < cap]  # the one host sync of the forward on a GPU: how many assignments survive
        counts = counts.clamp(max=cap)
        kept_flat = torch.zeros_like(flat_e, dtype=torch.bool)
        kept_flat[order] = True
        weight = top_p * kept_flat.view(top_k, T).t()
    if top_k > 1:
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).eps)

    return Routing(
        token=order if top_k == 1 else order % T,
        weight=weight.t().reshape(-1)[order],
        counts=counts,
        first_choice_counts=first_counts,
        probs=probs,
        routed=first_counts / T if top_k <= 2 else assigned / (T * top_k),
        aux_counts=first_counts if top_k <= 2 else assigned,
    )


def _bincount(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64 occurrences of each value of `index` in [0, n): `torch.bincount` without the host sync
    (it reads the largest value to size its output) that it costs on a GPU."""
    return torch.zeros(n, dtype=torch.int64, device=index.device).scatter_add_(0, index, torch.ones_like(index))


def expert_slices(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, stop) of each expert's rows in the expert-sorted order, experts without rows left out."""
    n = counts.tolist()
    return [(e, t - n[e], t) for e, t in enumerate(itertools.accumulate(n)) if n[e]]


def _ffn_by_matrix(x: torch.Tensor, stacked: dict[str, torch.Tensor], act, linear) -> torch.Tensor:
    """All experts' FFNs on x (N, d), one matrix at a time: `linear(h, matrix name, bias name)` runs every
    expert's slice of it, so one activation covers the whole (N, f) intermediate.

    GPT-2 kind (`w_in`, `b_in`, `w_out`, `b_out`): act(x W1 + b1) W2 + b2, as `Conv1D` computes it.
    Gated kind (`w_gate`, `w_up`, `w_out`): (act(x Wg) * x Wu) Wd, as Llama/Mistral/Qwen2 do.
    """
    if "w_gate" in stacked:
        h = act(linear(x, "w_gate", None)) * linear(x, "w_up", None)  # (N, f)
    else:
        h = act(linear(x, "w_in", "b_in"))  # (N, f)
    return linear(h, "w_out", "b_out")  # (N, d)


def loop_experts(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor], act) -> torch.Tensor:
    """The "loop" backend: one matmul per expert slice and matrix, concatenated (`out=` would have no backward).

    Rows are cut with `split` and experts taken with `unbind`, whose backwards write one gradient
    tensor each; indexing (`h[s:t]`, `w[e]`) would give every expert its own full-size zero gradient
    to add, which made a 128-expert layer's backward 6x slower.
    """
    sizes = counts.tolist()  # a host sync on a GPU: the slices' sizes (`grouped_mm` needs none)
    live = [e for e, n in enumerate(sizes) if n]

    def linear(h, name, bias):
        rows, w = h.split(sizes), stacked[name].unbind(0)
        b = stacked[bias].unbind(0) if bias in stacked else None
        parts = [rows[e] @ w[e] if b is None else torch.addmm(b[e], rows[e], w[e]) for e in live]
        return torch.cat(parts) if parts else h.new_zeros(0, stacked[name].shape[-1])
    return _ffn_by_matrix(x_sorted, stacked, act, linear)


def grouped_mm_experts(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor],
                       act) -> torch.Tensor:
    """The "grouped_mm" backend: one `grouped_mm` call per matrix (empty groups skipped); no per-expert
    slices, so no `counts.tolist()` to sync a GPU.

    Autocast does not cover `grouped_mm`: under it, inputs and weights are cast to the autocast dtype
    here, as autocast casts the loop's matmuls, so both backends give one dtype to the combine.
    """
    dtype = compute_dtype(x_sorted)
    offsets = counts.cumsum(0).to(torch.int32)

    def linear(h, name, bias):
        w, b = stacked[name], stacked.get(bias)
        h, w, b = h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        y = F.grouped_mm(h, w, offs=offsets)
        if b is not None:
            y = y + b.repeat_interleave(counts, dim=0, output_size=h.shape[0])  # (N, out) each row's bias
        return y
    return _ffn_by_matrix(x_sorted, stacked, act, linear)


@dataclass
class Backend:
    """One registered op: plain torch, and a faster version for calls without autograd or autocast."""

    plain: Callable
    no_grad: Callable | None = None


# The ops the MoE forward runs, by name. "linear": (x (n, in), w [out, in]) -> (n, out), the gate;
# "loop" and "grouped_mm": (x_sorted (N, d), counts (E,), stacked [E, in, out], act) -> (N, d).
BACKENDS: dict[str, Backend] = {
    "linear": Backend(F.linear),
    "loop": Backend(loop_experts),
    "grouped_mm": Backend(grouped_mm_experts),
}


def register_no_grad(name: str, fn: Callable) -> None:
    """Run `fn` for `name` where no gradient is needed (`inference.kernels` registers its CPU kernels)."""
    BACKENDS[name].no_grad = fn


def implementation(name: str, *tensors: torch.Tensor) -> Callable:
    """The one place that chooses how op `name` runs on `tensors`: its registered no-grad version when
    autograd will not track the call and autocast is off (the no-grad kernels write through `out=`,
    which autocast would not cast), else plain torch."""
    op = BACKENDS[name]
    if (op.no_grad is None or torch.is_autocast_enabled(tensors[0].device.type)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return op.plain
    return op.no_grad


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls compute in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_ok(x: torch.Tensor, stacked: dict[str, torch.Tensor]) -> bool:
    """`grouped_mm` exists, has not failed before on this device and dtype, and every matrix row stride is
    a multiple of 16 bytes, as it demands."""
    if not hasattr(F, "grouped_mm") or (x.device.type, compute_dtype(x)) in _GROUPED_MM_FAILED:
        return False
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0
               for w in stacked.values() if w.dim() == 3) and x.shape[-1] * x.element_size() % 16 == 0


# (device type, dtype) where `grouped_mm` raised: those calls take the loop from then on.
_GROUPED_MM_FAILED: set[tuple[str, torch.dtype]] = set()


def pick_backend(x: torch.Tensor, stacked: dict[str, torch.Tensor]) -> str:
    """The faster expert backend for this call.

    `grouped_mm` where its fused kernel exists: on a CUDA device of compute capability 9.0 or more
    (Hopper), in bf16, for calls big enough to fill the device (transformers' default there); torch
    runs other devices and dtypes as a loop of matmuls after copying the offsets to the host, and on
    CPU it never beat our own per-expert loop (which also skips the bias gather). Everything else takes
    the loop.
    """
    fused = (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) >= (9, 0)
             and compute_dtype(x) == torch.bfloat16)
    return "grouped_mm" if fused and x.shape[0] >= 64 and grouped_mm_ok(x, stacked) else "loop"


def expert_ffn(x_sorted: torch.Tensor, counts: torch.Tensor, stacked: dict[str, torch.Tensor], act,
               backend: str | None = None) -> torch.Tensor:
    """Run each expert on its contiguous slice of the expert-sorted tokens.

    x_sorted (N, d), counts (E,), stacked weights [E, in, out] -> (N, d). Experts that received no
    tokens are skipped: their weights are never read. `backend` forces "loop" or "grouped_mm"; where
    `grouped_mm` raises (a build or device without it), the loop runs instead, and from then on for
    that device and dtype.
    """
    name = backend or pick_backend(x_sorted, stacked)
    act = fused_activation(act)
    if name == "grouped_mm":
        try:
            return implementation(name, x_sorted, *stacked.values())(x_sorted, counts, stacked, act)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            _GROUPED_MM_FAILED.add((x_sorted.device.type, compute_dtype(x_sorted)))
            name = "loop"
    return implementation(name, x_sorted, *stacked.values())(x_sorted, counts, stacked, act)


def combine(y_sorted: torch.Tensor, routing: Routing, num_tokens: int,
            residual: tuple[torch.Tensor, torch.Tensor] | None = None, overwrite: bool = False) -> torch.Tensor:
    """Un-sort: weighted expert outputs (N, d) scattered back to their tokens -> (T, d).

    With `residual = (coef (T, 2), dense (T, d))` the PR-MoE mix `coef0 * moe + coef1 * dense` is
    fused in: the scatter adds `coef0 * weight * y` straight into `coef1 * dense`. `overwrite`: y_sorted
    and dense are the caller's temporaries and autograd is off, so both are scaled in place (two
    fewer (T, d) tensors written).
    """
    weight = routing.weight  # (N,)
    if residual is None:
        out = y_sorted.new_zeros(num_tokens, y_sorted.shape[-1])
    else:
        coef, dense = residual
        out = (dense.mul_ if overwrite else dense.mul)(coef[:, 1:].to(dense.dtype))  # (T, d)
        weight = weight * coef[routing.token, 0].to(weight.dtype)
    scale = weight.unsqueeze(-1).to(y_sorted.dtype)  # (N, 1)
    source = y_sorted.mul_(scale) if overwrite else y_sorted * scale
    return out.index_add_(0, routing.token, source.to(out.dtype))  # whatever dtype the experts computed in


def moe_forward(x: torch.Tensor, router_weight: torch.Tensor, experts: Callable, top_k: int = 1,
                capacity_factor: float | None = None, min_capacity: int = 4, dropout: float = 0.0,
                training: bool = False, residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                overwrite: bool = False) -> tuple[torch.Tensor, Routing]:
    """PR-MoE branch for x (T, d): gate in fp32, dispatch by sort, experts, combine (+ residual mix) -> (T, d).

    `experts(x_sorted (N, d), counts (E,)) -> (N, d)` runs each expert on its slice (`moe.Experts`, or
    the runtime's packed experts). `residual = (coef (T, 2), dense (T, d))` mixes in the residual
    branch (`combine`, `overwrite` as there).
    """
    with torch.autocast(x.device.type, enabled=False):  # mixed precision (autocast) must not lower the gate
        x32, w32 = x.float(), router_weight.float()
        logits = implementation("linear", x32, w32)(x32, w32)  # (T, E) fp32, as DeepSpeed's gate
    routing = route(logits, top_k, capacity_factor, min_capacity)
    x_sorted = x.index_select(0, routing.token)  # (N, d); index_select: a faster gather than x[token]
    y = experts(x_sorted, routing.counts)  # (N, d)
    if dropout and training:
        y = F.dropout(y, dropout, training=True)
    return combine(y, routing, x.shape[0], residual, overwrite), routing

"""A PR-MoE layer's decode step in two native calls (`csrc/moe_decode.c`), for the runtime's few-token forwards.

With the other layers' weights streamed through the caches in between, every torch op of a decode
step starts cold: the router, softmax, top-k, coefficient, sort, gather and combine cost ~0.4 ms of
a ~2 ms T=8, E=128 layer whose weights stream in ~1.3 ms. `Decoder` runs them in C around the same
packed-weight jobs `kernels._native_ffns` runs (expert and residual outputs bit for bit the same),
the activation applied by the kernel where it has it, else torch's between the two calls. The
router, gate softmax and coefficient are summed in another order than torch's (~1e-7 relative); of
equal logits the first expert is chosen first, as `routing.route`'s top-1 does (its `topk` for
k > 1 leaves that order open).

It applies to layers of top-k up to `MAX_TOP_K` whose experts and residual FFN are packed weights the
native kernel reads (`kernels.PackedExperts` with every pointer), fp32 or bf16 (router and coefficient
in the same dtype), with a width d that is a multiple of 16 (the router's dot products take 16 values
at a time; here oneDNN packs other widths in a layout the kernel does not read anyway), for at most
`MAX_TOKENS` tokens, and only where the capacity cannot drop one. `Decoder.build` returns None
otherwise, and a call it cannot take returns None: the caller runs `kernels.moe_forward`. In bf16
the router, coefficient and combine compute in fp32 and each output is rounded once, where torch
rounds after each bf16 op of the coefficient and the combine: the two agree to bf16 rounding.
"""

from __future__ import annotations

import ctypes

import torch

from ..model.layout import expert_capacity
from . import kernels, native
from .kernels import PackedExperts, fused_activation, native_pointers
from .native import library

MAX_TOKENS = 8  # = MAX_TOKENS in csrc/moe_decode.c: tokens per call (decode: the batch)
MAX_TOP_K = 4  # = MAX_K there: experts per token
MAX_ASSIGNMENTS = MAX_TOKENS * MAX_TOP_K  # (token, choice) pairs: assignment c * T + t is token t's c-th choice
_FIRST = {"w_in": "w1", "b_in": "b1", "w_gate": "w1", "w_up": "w_up"}  # native_pointers key -> FFN field
_SECOND = {"w_out": "w2", "b_out": "b2"}


class FFN(ctypes.Structure):
    """One FFN's packed matrices and biases (0 where absent): GPT-2 kind w1, b1, w2, b2; gated w1 (gate), w_up, w2."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w1", "b1", "w_up", "w2", "b2")]


class State(ctypes.Structure):
    """`decode_t` of csrc/moe_decode.c: the layer, the call, and phase 1's routing for phase 2."""

    _fields_ = [*[(name, ctypes.c_int64) for name in ("d", "f", "experts", "top_k", "bf16", "act")],
                *[(name, ctypes.c_void_p) for name in ("router", "coef_w", "coef_b", "ffns", "xs", "h", "up", "y")],
                ("tokens", ctypes.c_int64), *[(name, ctypes.c_void_p) for name in ("x", "act_h", "out")],
                ("expert", ctypes.c_int64 * MAX_ASSIGNMENTS), ("slot", ctypes.c_int64 * MAX_ASSIGNMENTS),
                ("scale", ctypes.c_float * MAX_ASSIGNMENTS), ("keep", ctypes.c_float * MAX_TOKENS)]


def _ffn(pointers: dict[str, int]) -> FFN:
    return FFN(**{_FIRST.get(k) or _SECOND[k]: v for k, v in pointers.items()})


def _plain(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return not t.is_mkldnn and t.dtype == dtype and t.is_contiguous() and tuple(t.shape) == shape


class Decoder:
    """One PR-MoE layer's forward for a few tokens: `decoder(x)` -> (T, d), or None where it does not apply.

    Keeps its scratch buffers between calls: one layer's decoder is not for concurrent calls.
    """

    def __init__(self, router: torch.Tensor, experts: PackedExperts, residual, act, top_k: int,
                 tokens: frozenset[int]):
        E, d = router.shape
        f, self.dtype = experts.weights[0]["w_out"].shape[1], router.dtype
        ffns = [_ffn(p) for p in experts.pointers] + ([] if residual is None else [_ffn(residual[2])])
        self.gated = "w_gate" in experts.weights[0]
        self.act, self.tokens, self.rows_per_token = act, tokens, top_k + (residual is not None)
        rows = MAX_TOKENS * self.rows_per_token  # h, up, y: every assignment's row, then the residual's rows
        self._alive = (router, experts, residual)  # kept as long as the state points at them
        self._ffns = (FFN * len(ffns))(*ffns)
        self._xs, self._y = torch.empty(MAX_TOKENS * top_k, d, dtype=self.dtype), torch.empty(rows, d, dtype=self.dtype)
        self._h = torch.empty(rows, f, dtype=self.dtype)
        self._up = torch.empty(rows, f, dtype=self.dtype) if self.gated else None
        self.state = State(d=d, f=f, experts=E, top_k=top_k, bf16=self.dtype == torch.bfloat16,
                           act=kernels.NATIVE_ACTIVATIONS.get(act, native.ACT_NONE),
                           router=router.data_ptr(), ffns=ctypes.addressof(self._ffns), xs=self._xs.data_ptr(),
                           h=self._h.data_ptr(), y=self._y.data_ptr(), up=self._up.data_ptr() if self.gated else None)
        if residual is not None:
            self.state.coef_w, self.state.coef_b = residual[0].data_ptr(), residual[1].data_ptr()
        self._at, self._lib = ctypes.addressof(self.state), library()

    @classmethod
    def build(cls, router: torch.Tensor, experts, residual: tuple[torch.Tensor, torch.Tensor, dict] | None, act,
              top_k: int, capacity_factor: float | None, min_capacity: int) -> Decoder | None:
        """The decoder of a layer: router (E, d), experts (`kernels.pack_experts`), residual = (coefficient
        weight (2, d), its bias (2,), the residual FFN's `pack_ffn` weights) or None; None where it does not
        apply (module docstring)."""
        if library() is None or not isinstance(experts, PackedExperts) or None in experts.pointers:
            return None
        E, d = router.shape
        if not 1 <= top_k <= min(MAX_TOP_K, E):
            return None
        (d_out, f), dtype = experts.weights[0]["w_out"].shape, experts.weights[0]["w_out"].dtype
        if len(experts.pointers) != E or d_out != d or d % 16 or not _plain(router, (E, d), dtype):
            return None
        if residual is not None:
            coef_w, coef_b, dense = residual
            pointers = native_pointers(dense)
            if (pointers is None or pointers.keys() != experts.pointers[0].keys()
                    or tuple(dense["w_out"].shape) != (d, f) or dense["w_out"].dtype != dtype
                    or not _plain(coef_w, (2, d), dtype) or not _plain(coef_b, (2,), dtype)):
                return None
            residual = (coef_w, coef_b, pointers, dense)
        tokens = frozenset(T for T in range(1, MAX_TOKENS + 1)  # where no expert can be over its capacity (T)
                           if capacity_factor is None
                           or expert_capacity(T, E, top_k, capacity_factor, min_capacity) >= T)
        return cls(router, experts, residual, fused_activation(act), top_k, tokens) if tokens else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer on x (T, d) in the layer's dtype without autograd -> (T, d); None for inputs it does not
        take (other T, dtype, device, or x needing gradients). T is also held to `kernels.NATIVE_BATCH_ROWS`,
        the rows up to which the native kernel runs experts together (0 there turns this off too)."""
        T = x.shape[0]
        if (T not in self.tokens or T > kernels.NATIVE_BATCH_ROWS or x.dtype != self.dtype or x.dim() != 2
                or x.device.type != "cpu" or x.shape[1] != self.state.d
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        x, out = x.contiguous(), x.new_empty(T, x.shape[1])
        self.run(T, x.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out

    def run(self, T: int, x: int, out: int, threads: int) -> None:
        """The layer on T tokens at address x (T, d) into address out (T, d), on `threads` threads: the two
        native calls, the activation and gated product between them (`__call__` checks what it takes;
        `plan.DecodePlan` calls this with its own buffers)."""
        s = self.state
        s.tokens, s.x, s.out = T, x, out
        native.check(self._lib.mc_moe_decode_first(self._at, threads), "mc_moe_decode_first")
        rows = T * self.rows_per_token
        h = self._h[:rows] if s.act != native.ACT_NONE else self.act(self._h[:rows])
        if self.gated:
            h.mul_(self._up[:rows])
        s.act_h = h.data_ptr()
        native.check(self._lib.mc_moe_decode_second(self._at, threads), "mc_moe_decode_second")

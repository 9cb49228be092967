"""A decode step (one new token per sequence) as native calls prepared once per batch size.

On a deep, narrow model the Python around a decode step's native calls, made one by one as
`Runtime.forward` makes them, costs as much as a third of the step: ~6.5 ms of a ~25 ms bf16 step of
SmolLM2-135M (30 layers, d=576), where every layer's norms, projections, attention and FFN check their
arguments, make views and new tensors and build the kernels' job lists anew. A `DecodePlan` does that
once for a batch size:
every activation has a fixed buffer, every matmul's job list holds those buffers' addresses, and a
step is the same native calls in a row (`native.residual_norm`'s, `native.attend_one`'s and
`native.packed_matmul`'s entry points, `decode.Decoder.run`) with only the cache slot, the positions
and the cache's addresses filled in. The calls and their inputs are those `Runtime.forward` makes for
one token, so the logits are bit for bit the same (tests/test_runtime.py).

A plan applies where every piece of a layer has its native path: the library loaded, fp32 or bf16
weights (fp32 attention), packed projections the kernel reads, FFNs whose activation the kernel applies,
every MoE layer a `decode.Decoder` taking the batch size, no expert parallelism. `DecodePlan.build`
returns None otherwise, and the runtime's own forward runs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import kernels, native
from .decode import Decoder
from .kernels import NATIVE_ACTIVATIONS, ffn_jobs, fused_activation, native_pointers
from .native import Job


def _jobs(*jobs: Job) -> ctypes.Array:
    return (Job * len(jobs))(*jobs)


@dataclass(frozen=True)
class DenseFFN:
    """A dense FFN's two calls: jobs h -> hidden (and up), then hidden -> delta."""

    first: ctypes.Array
    second: ctypes.Array
    f: int
    hidden: torch.Tensor  # (B, f)
    up: torch.Tensor | None  # (B, f): the gated kind's x w_up, multiplied into hidden between the calls


@dataclass(frozen=True)
class Layer:
    """One decoder layer's prepared calls and the buffers they name."""

    attn_norm: tuple[int, int]  # (weight, bias or 0) addresses
    ffn_norm: tuple[int, int]
    qkv_buffer: torch.Tensor  # (B, (H + 2 H_kv) hd)
    qkv: tuple  # (jobs, out, in): h -> qkv_buffer
    out: tuple  # (jobs, out, in): attention's heads -> delta
    window: int  # 0: the whole prefix
    scale: float
    moe: Decoder | None  # an MoE layer's decoder, h -> delta
    dense: DenseFFN | None


class DecodePlan:
    """One decode step of `runtime` for `batch` sequences, ready to run (`step`)."""

    def __init__(self, runtime, batch: int):
        rt, B = runtime, batch
        d, dtype = rt.lm_head.shape[1], rt.dtype
        self.rt, self.B, self.d, self.bf16 = rt, B, d, dtype == torch.bfloat16
        self.lib = native.library()
        self.x, self.h, self.delta = (torch.empty(B, d, dtype=dtype) for _ in range(3))  # residual stream, normed, branch out
        self.o = torch.empty(B, rt.heads * rt.head_dim, dtype=dtype)  # attention's heads
        self.pos = torch.empty(B, dtype=torch.int64)
        self.layers = [self._layer(i) for i in range(rt.num_layers)]
        self.final_norm = self._norm(rt.NORMS[2])

    @classmethod
    def build(cls, runtime, batch: int) -> DecodePlan | None:
        """The plan, or None where a piece has no native path (module docstring)."""
        rt = runtime
        if (native.library() is None or rt.ep is not None or rt.dtype not in native.LAYOUTS
                or rt.attn_dtype != torch.float32 or not 1 <= batch <= kernels.NATIVE_BATCH_ROWS):
            return None
        for i in range(rt.num_layers):
            for ours in ("qkv", "out"):
                w, b = rt.proj[rt._projection(i, ours)]
                if not w.is_mkldnn or native.address(w) is None or (
                        b is not None and not kernels._native_bias(b, w.shape[0], w.dtype)):
                    return None
            ffn = rt.ffns[i]
            if "moe" in ffn:
                decoder = ffn["moe"].decoder
                if decoder is None or batch not in decoder.tokens or decoder.dtype != rt.dtype:
                    return None
            elif (not kernels.is_packed(ffn["dense"]) or native_pointers(ffn["dense"]) is None
                  or fused_activation(rt.act) not in NATIVE_ACTIVATIONS):
                return None
        norms = [name.format(i) for i in range(rt.num_layers) for name in rt.NORMS[:2]] + [rt.NORMS[2]]
        if not all(native._rows(rt.t[n + ".weight"], rt.t.get(n + ".bias")) and rt.t[n + ".weight"].dtype == rt.dtype
                   for n in norms):
            return None
        return cls(rt, batch)

    def _norm(self, name: str) -> tuple[int, int]:
        """(weight, bias or 0) addresses of the norm `name`."""
        b = self.rt.t.get(name + ".bias")
        return self.rt.t[name + ".weight"].data_ptr(), 0 if b is None else b.data_ptr()

    def _projection(self, i: int, ours: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """(jobs, out, in) of layer i's projection `ours` from buffer x into buffer y."""
        w, b = self.rt.proj[self.rt._projection(i, ours)]
        return _jobs(Job(self.B, x.data_ptr(), native.address(w), 0 if b is None else b.data_ptr(), y.data_ptr())), *w.shape

    def _ffn(self, w: dict[str, torch.Tensor]) -> DenseFFN:
        """A dense FFN's jobs (`kernels.ffn_jobs`, as `kernels._native_ffns` runs them) on the plan's buffers, h -> delta."""
        p, f = native_pointers(w), w["w_out"].shape[1]
        hidden = torch.empty(self.B, f, dtype=self.rt.dtype)
        up = torch.empty_like(hidden) if "w_gate" in p else None
        first, second = ffn_jobs([(self.B, self.h.data_ptr(), self.delta.data_ptr(), p)], hidden, up,
                                 NATIVE_ACTIVATIONS[fused_activation(self.rt.act)])
        return DenseFFN(_jobs(*first), _jobs(*second), f, hidden, up)

    def _layer(self, i: int) -> Layer:
        rt = self.rt
        attn_norm, ffn_norm, _ = rt.NORMS
        qkv = torch.empty(self.B, (rt.heads + 2 * rt.num_kv_heads) * rt.head_dim, dtype=rt.dtype)
        ffn = rt.ffns[i]
        return Layer(self._norm(attn_norm.format(i)), self._norm(ffn_norm.format(i)), qkv,
                     self._projection(i, "qkv", self.h, qkv), self._projection(i, "out", self.o, self.delta),
                     rt.sliding_window(i) or 0, rt.attn_scale(i), ffn["moe"].decoder if "moe" in ffn else None,
                     None if "moe" in ffn else self._ffn(ffn["dense"]))

    def _residual_norm(self, norm: tuple[int, int], delta: bool) -> None:
        """x += delta (when `delta`), h = norm(x): `native.residual_norm`'s call on the plan's buffers."""
        native.check(self.lib.mc_residual_norm(self.B, self.d, self.x.data_ptr(), self.delta.data_ptr() if delta else 0,
                                               *norm, self.h.data_ptr(), self.rt.RMS_NORM, self.rt.eps, self.bf16),
                     "mc_residual_norm")

    def _matmul(self, jobs: ctypes.Array, out: int, inp: int, threads: int) -> None:
        native.check(self.lib.mc_packed_matmul(len(jobs), jobs, out, inp, self.bf16, threads), "mc_packed_matmul")

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """ids (B, 1) after the cache's `length` slots -> logits (B, 1, V); the cache advances (as
        `Runtime.forward` of one token)."""
        rt, B, lib = self.rt, self.B, self.lib
        slot, threads = cache.length, torch.get_num_threads()
        torch.sub(cache.start, slot, out=self.pos).neg_().clamp_(min=0)  # each sequence's position, from its start
        rt.check_positions(int(self.pos.max()))
        rope = rt.rope(slot + 1)
        cos, sin, positions = (0, 0, 0) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr(), rope[0].shape[0])
        self.x.copy_(rt.embed(ids, self.pos.view(B, 1)).view(B, self.d))
        for i, layer in enumerate(self.layers):
            self._residual_norm(layer.attn_norm, delta=i > 0)
            self._matmul(*layer.qkv, threads)
            cache.reserve(i, slot + 1)
            k, v = cache.k[i], cache.v[i]
            native.check(lib.mc_attend_one(B, rt.heads, rt.num_kv_heads, rt.head_dim, layer.qkv_buffer.data_ptr(),
                                           self.bf16, cos, sin, positions, self.pos.data_ptr(), k.data_ptr(),
                                           v.data_ptr(), k.shape[2], slot, cache.start.data_ptr(), layer.window,
                                           layer.scale, self.o.data_ptr(), threads), "mc_attend_one")
            self._matmul(*layer.out, threads)
            self._residual_norm(layer.ffn_norm, delta=True)
            if layer.moe is not None:
                layer.moe.run(B, self.h.data_ptr(), self.delta.data_ptr(), threads)
                continue
            dense = layer.dense
            self._matmul(dense.first, dense.f, self.d, threads)
            if dense.up is not None:  # gated: act(x w_gate) * x w_up
                dense.hidden.mul_(dense.up)
            self._matmul(dense.second, self.d, dense.f, threads)
        cache.length += 1
        self._residual_norm(self.final_norm, delta=True)
        return kernels.linear(self.h, rt.lm_head).view(B, 1, -1)  # (B, 1, V)

"""Inference straight from a `--format safetensors` export: plain tensors, our kernels, a KV cache.

No transformers model class runs here: the GPT-2 and Llama-family forwards are written out below
over the exported tensors (host-native names), and every MoE layer goes through
`kernels.moe_forward` with the residual mix fused into its combine, or, for a few tokens (decode),
through `decode.Decoder`: the whole layer in two native calls. In decode the norms (with the residual
add) and attention (rotary, KV-cache write, grouped-query heads) are one native call each
(`native.residual_norm`, `native.attend_one`). `generate` decodes greedily or by sampling (temperature,
top-k, top-p) and reports tokens/s; `generate_batch` decodes several prompts as one left-padded batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoEConvertError
from ..formats import SHARED_FILE, experts_file, export_weight_files, read_manifest
from ..io import load_tokenizer, read_safetensors, return_freed_memory
from . import native
from .config import GenerateJob, check_sampling
from .decode import Decoder
from .expert_parallel import ExpertParallel, from_environment
from .kernels import (ACTIVATIONS, PackedExperts, back_with_huge_pages, ffn, linear, moe_forward, native_fp16_matmul,
                      pack_experts, pack_ffn, pack_matrix, packed_matrices)
from .plan import DecodePlan


def load_export(path: str | Path, manifest: dict, rank: int | None = None) -> dict[str, torch.Tensor]:
    """An export's tensors by host-native name (`manifest` from `read_manifest`): each layer's experts
    re-joined across EP rank files, or (`rank`) the shared weights and that rank's experts only."""
    path = Path(path)
    ep = manifest["ep_size"]
    files = export_weight_files(manifest) if rank is None else [SHARED_FILE, experts_file(rank, ep)]
    parts: dict[str, list[torch.Tensor]] = {}
    for name in files:
        for key, tensor in read_safetensors(path / name).items():
            parts.setdefault(key, []).append(tensor)
    tensors = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}  # [E, in, out] from rank slices
    for entry in manifest["layers"]:
        held = entry["experts"] if rank is None else entry["experts"] // ep  # experts the files read hold
        router = tensors.get(f"{entry['prefix']}.router.weight")
        experts = [t for k, t in tensors.items() if k.startswith(f"{entry['prefix']}.experts.")]
        if router is None or router.shape[0] != entry["experts"] or not experts or experts[0].shape[0] != held:
            raise MoEConvertError(f"{path}: MoE layer {entry['layer']} is incomplete (router for "
                                  f"{entry['experts']} experts, or {held} of its experts, missing)")
    return tensors


def compute_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype the runtime computes in: the export's, except fp16 on a CPU without native fp16
    matmul (`kernels.native_fp16_matmul`), where the weights are widened to fp32 at load: ~140x
    faster, and more precise."""
    return torch.float32 if stored == torch.float16 and not native_fp16_matmul() else stored


def attention_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype attention and the KV cache use: fp32 for bf16 and fp16 models (one query over 288 cached
    positions: torch's CPU attention took 177 us in bf16 against 32 us in fp32, 698 against 97 over 1024;
    a bf16 decode step spent ~15% of its time there; fp16 compute needs a CPU with fp16 matmul, not
    measured: fp32 is the more precise there too), the compute dtype otherwise."""
    return torch.float32 if compute in (torch.bfloat16, torch.float16) else compute


def _attention_mask(past: int, L: int, window: int | None, start: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for attention of L queries at cache slots past.. over past + L keys: causal,
    and within `window` positions as transformers masks sliding windows. Where no key falls out of the
    window, SDPA's own causal path for a prefill from position 0 (the same values, 1.55x faster over
    1024 positions here) and no mask for a single query; otherwise the boolean (L, past + L) mask.
    `start` (B,): each sequence's first slot (left padding; None: all 0) -> a (B, 1, L, past + L) mask where
    a padding slot's query sees only itself (a row with no key would give NaN)."""
    if start is None and (window is None or window >= past + L):
        if past == 0:
            return None, L > 1
        if L == 1:
            return None, False
    pos, keys = torch.arange(past, past + L)[:, None], torch.arange(past + L)[None, :]
    mask = keys <= pos
    if window is not None:
        mask = mask & (keys > pos - window)
    if start is not None:
        mask = ((mask & (keys >= start[:, None, None])) | (keys == pos))[:, None]  # (B, 1, L, past + L)
    return mask, False


# Config keys holding the positions a model was built for (GPT-2's learned table; RoPE models' range).
CONTEXT_KEYS = ("n_positions", "max_position_embeddings")
# Positions a generation's KV cache is first allocated for beyond the prompt; it doubles when full.
CACHE_STEP = 256


@dataclass
class KVCache:
    """Keys and values of every layer, (B, H_kv, capacity, head_dim), preallocated and doubled when full.

    Sequences of a batch share the slots: sequence b's start at slot `start[b]` (left padding), its
    positions count from there."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    start: torch.Tensor  # (B,) int64
    length: int = 0

    @property
    def padded(self) -> torch.Tensor | None:
        """`start` where some sequence starts after slot 0, else None."""
        return self.start if bool(self.start.any()) else None

    def reserve(self, layer: int, end: int) -> None:
        """Room for `end` slots in the layer's tensors (doubled when it runs out)."""
        if end > self.k[layer].shape[2]:
            self.k[layer], self.v[layer] = (_grown(t, max(end, 2 * t.shape[2]), self.length)
                                            for t in (self.k[layer], self.v[layer]))

    def keep(self, rows: list[int]) -> None:
        """Keep only these sequences (finished ones leave the batch)."""
        index = torch.tensor(rows)
        self.k, self.v = ([t.index_select(0, index) for t in ts] for ts in (self.k, self.v))
        self.start = self.start.index_select(0, index)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, L, hd) keys/values; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.reserve(layer, end)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _grown(t: torch.Tensor, capacity: int, length: int) -> torch.Tensor:
    """A (B, H, capacity, hd) copy of cache tensor t holding its first `length` positions."""
    out = t.new_empty(*t.shape[:2], capacity, t.shape[3])
    out[:, :, :length] = t[:, :, :length]
    return out


@dataclass
class Generation:
    tokens: list[int]  # prompt + new tokens
    new_tokens: int
    prefill_s: float  # the prompt's forward, which also gives the first new token
    decode_s: float  # the other new tokens, one forward each
    stopped_at_context: bool = False  # the model's context ended the generation before max_new_tokens

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill included."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens per second after the first (None when only one was generated)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None


@dataclass
class MoELayer:
    """One PR-MoE layer's weights for inference and how it runs: few tokens through `decode.Decoder` where
    it applies (decode), else `kernels.moe_forward` with the residual FFN's weights, run with the experts,
    and its coefficient mixed into the combine. The runtime holds one per MoE layer; `bench layer` runs
    its `moe_convert` rows through it."""

    router: torch.Tensor  # (E, d)
    stacked: PackedExperts | dict[str, torch.Tensor]  # `pack_experts`, or stacked [E, in, out] weights
    dense: dict[str, torch.Tensor] | None  # the residual FFN (`pack_ffn`), None without one
    coef: tuple[torch.Tensor, torch.Tensor] | None  # the residual coefficient's weight (2, d) and bias (2,)
    act: Callable
    top_k: int = 1
    capacity_factor: float | None = None
    min_capacity: int = 4
    exchange: Callable | None = None  # expert parallelism (`ExpertParallel.exchange`): no decoder then
    backend: str | None = None  # `routing.pick_backend`'s choice, forced

    def __post_init__(self):
        residual = None if self.dense is None else (*self.coef, self.dense)
        self.decoder = None if self.exchange else Decoder.build(self.router, self.stacked, residual, self.act,
                                                                self.top_k, self.capacity_factor, self.min_capacity)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) -> (T, d)."""
        y = self.decoder(x) if self.decoder else None  # few tokens: the whole layer in two native calls
        if y is None:
            residual = None if self.dense is None else (F.linear(x, *self.coef).softmax(-1), self.dense)  # (T, 2)
            y = moe_forward(x, self.router, self.stacked, self.act, self.top_k, self.capacity_factor,
                            self.min_capacity, residual=residual, backend=self.backend, exchange=self.exchange)[0]
        return y


class Runtime:
    """A decoder-only LM over exported tensors; subclasses give the host's embedding, norms and attention.

    Loading checks the host config first (`configure`), then reads the export and packs it layer by
    layer: each FFN and attention projection is taken out of the exported tensors, packed for our
    kernels, and the freed memory handed back before the next layer.
    """

    ATTENTION: str  # a decoder layer's attention attribute in the host's weight names
    # Its projections run through `kernels.linear`: ours -> the host's, joined along the outputs at load
    # (q, k and v: one matmul per decode step); "qkv" gives q, k and v heads side by side, "out" takes them back.
    PROJECTIONS: dict[str, tuple[str, ...]]
    PROJECTIONS_IN_OUT = False  # stored [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in]
    # The norms' weight names: before attention and before the FFN ({} the layer), and the final one.
    NORMS: tuple[str, str, str]
    RMS_NORM = False  # RMSNorm (Llama's: x * rsqrt(mean(x^2) + eps) * w) rather than LayerNorm

    def __init__(self, path: Path, manifest: dict, ep: ExpertParallel | None = None):
        from ..model.modeling import host_spec  # the host adapter (weight names), not a model class

        self.manifest, self.cfg, self.ep = manifest, manifest["host_config"], ep
        self.spec = host_spec(manifest["host"])
        if manifest["activation"] not in ACTIVATIONS:
            raise MoEConvertError(f"activation {manifest['activation']!r} is not supported by the runtime "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[manifest["activation"]]
        self.moe = {e["layer"]: e for e in manifest["layers"]}
        self.num_layers = self.cfg["num_hidden_layers"] if "num_hidden_layers" in self.cfg else self.cfg["n_layer"]
        self.context = next(self.cfg[k] for k in CONTEXT_KEYS if self.cfg.get(k))  # positions the model was built for
        self.configure(self.cfg)
        self.t = load_export(path, manifest, None if ep is None else ep.rank)
        self.stored_dtype = next(v.dtype for v in self.t.values() if v.is_floating_point())
        self.dtype = compute_dtype(self.stored_dtype)
        self.attn_dtype = attention_dtype(self.dtype)
        if self.dtype != self.stored_dtype:  # exact: every fp16 value is an fp32 value
            for name, v in self.t.items():
                self.t[name] = v.to(self.dtype) if v.is_floating_point() else v
        self.ffns: list[dict] = []
        self.proj: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # name -> ([out, in] or packed, bias)
        for i in range(self.num_layers):
            self.ffns.append(self._ffn_weights(i))
            for ours, parts in self.PROJECTIONS.items():
                self._add_projection(self._projection(i, ""), ours, parts)
            return_freed_memory()  # this layer's exported copies are packed: peak stays near one model, not two
        ffns = [part for w in self.ffns for part in ((w["moe"].stacked, w["moe"].dense) if "moe" in w else (w["dense"],))
                if part is not None]
        back_with_huge_pages([m for part in ffns for m in packed_matrices(part)]
                             + [w for w, _ in self.proj.values() if w.is_mkldnn])
        self.decode_plans: dict[int, DecodePlan | None] = {}  # batch size -> its plan (None: `forward`'s own way)

    def configure(self, c: dict) -> None:
        """Read the host config (heads, norms, positions); raises before any tensor is read."""

    def _add_projection(self, prefix: str, ours: str, parts: tuple[str, ...]) -> None:
        """Take the host's projections `prefix + part` (weights, biases) out of `self.t` into `self.proj[prefix +
        ours]` as `kernels.linear` reads it: one [out, in] matrix (the parts' outputs in order), packed for oneDNN
        when large."""
        w = torch.cat([self.t.pop(prefix + part + ".weight") for part in parts], dim=1 if self.PROJECTIONS_IN_OUT else 0)
        biases = [self.t.pop(prefix + part + ".bias", None) for part in parts]
        if len({b is None for b in biases}) > 1:
            raise MoEConvertError(f"{prefix}: {', '.join(parts)} must all have a bias or none")
        w_in_out = w if self.PROJECTIONS_IN_OUT else w.t()
        packed = pack_matrix(w_in_out)
        self.proj[prefix + ours] = (w_in_out.t() if packed is None else packed), (
            None if biases[0] is None else torch.cat(biases))

    def _projection(self, i: int, ours: str) -> str:
        """`self.proj`'s name of layer i's projection `ours` ("qkv", "out"; "": the prefix)."""
        return f"{self.spec.layers}.{i}.{self.ATTENTION}.{ours}"

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Projection `name` on x (..., in) -> (..., out)."""
        w, b = self.proj[name]
        return linear(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], -1)

    def _kernel_ffn(self, prefix: str) -> dict[str, torch.Tensor]:
        """A host FFN's tensors under `prefix`, taken out of `self.t` and packed for our kernels (`pack_ffn`)."""
        return pack_ffn({ours: self.t.pop(prefix + key).t() if transposed else self.t.pop(prefix + key)
                         for ours, (key, transposed) in self.spec.expert_keys.items()})

    def _ffn_weights(self, i: int) -> dict:
        """Layer i's FFN, packed once here at load (the exported tensors are released as they are packed):
        {"dense": its `pack_ffn` weights} or {"moe": its `MoELayer`}."""
        prefix = f"{self.spec.layers}.{i}.{self.spec.ffn_attr}."
        if i not in self.moe:
            return {"dense": self._kernel_ffn(prefix)}
        m = self.manifest
        residual = m["residual"]
        return {"moe": MoELayer(
            self.t[prefix + "router.weight"],
            pack_experts({name: self.t.pop(prefix + "experts." + name) for name in self.spec.expert_keys}),
            self._kernel_ffn(prefix + "mlp.") if residual else None,
            (self.t[prefix + "coefficient.weight"], self.t[prefix + "coefficient.bias"]) if residual else None,
            self.act, m["top_k"], m["capacity_factor"], m["min_capacity"],
            exchange=None if self.ep is None else self.ep.exchange)}

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder layer i's FFN on x (B, L, d): dense, or PR-MoE through our kernels."""
        w, shape = self.ffns[i], x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        return (w["moe"](x) if "moe" in w else ffn(x, w["dense"], self.act)).reshape(shape)

    # --- host-specific pieces ------------------------------------------------------------------
    heads: int
    num_kv_heads: int
    head_dim: int
    eps: float

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids and their positions (B, L) -> (B, L, d)."""

    def rope(self, positions: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary (cos, sin) tables, each (P, hd) fp32 with P >= `positions`, or None (no rotary)."""
        return None

    def attn_scale(self, i: int) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def sliding_window(self, i: int) -> int | None:
        """Layer i attends to its last `sliding_window` positions only (None: the whole prefix)."""
        return None

    @property
    def lm_head(self) -> torch.Tensor: ...

    # --- the shared pre-norm decoder --------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, start: list[int] | None = None) -> KVCache:
        """An empty cache for `batch` sequences; `start`: where each begins (left padding), default 0."""
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        return KVCache([torch.empty(shape, dtype=self.attn_dtype) for _ in range(self.num_layers)],
                       [torch.empty(shape, dtype=self.attn_dtype) for _ in range(self.num_layers)],
                       torch.tensor(start or [0] * batch, dtype=torch.int64))

    def norm(self, name: str, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm `name` of it), x and delta (B, L, d): one native call where it applies, which
        adds in place (x is the forward's own residual stream)."""
        w, b = self.t[name + ".weight"], self.t.get(name + ".bias")
        d = x.shape[-1]
        h = native.residual_norm(x.view(-1, d), None if delta is None else delta.reshape(-1, d), w, b, self.RMS_NORM,
                                 self.eps)
        if h is not None:
            return x, h.view(x.shape)
        if delta is not None:
            x = x + delta
        if not self.RMS_NORM:
            return x, F.layer_norm(x, (d,), w, b, self.eps)
        h = x.float()
        return x, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def attention(self, i: int, h: torch.Tensor, cache: KVCache, pos: torch.Tensor, rope, masks: dict) -> torch.Tensor:
        """Layer i's attention of h (B, L, d) at positions pos (B, L) -> (B, L, H hd), its keys and values
        into the cache: one new token per sequence in one native call (`native.attend_one`), else torch's
        ops and SDPA (`masks`: the forward's `_attention_mask`s by window)."""
        B, L, _ = h.shape
        H, H_kv, hd = self.heads, self.num_kv_heads, self.head_dim
        qkv = self.linear(self._projection(i, "qkv"), h)  # (B, L, (H + 2 H_kv) hd)
        window = self.sliding_window(i)
        if L == 1:
            cache.reserve(i, cache.length + 1)
            o = native.attend_one(qkv.view(B, -1), H, rope, pos.view(B), cache.k[i], cache.v[i], cache.length,
                                  cache.start, window, self.attn_scale(i))
            if o is not None:
                return o.view(B, 1, -1)
        q, k, v = (t.view(B, L, -1, hd).transpose(1, 2) for t in qkv.split([H * hd, H_kv * hd, H_kv * hd], -1))
        if rope is not None:  # (B, 1, L, hd) at each sequence's positions
            cos, sin = (t[pos][:, None].to(qkv.dtype) for t in rope)
            q, k = (t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1) * sin for t in (q, k))
        k, v = cache.update(i, k, v)  # (B, H_kv, past + L, hd) in the cache's dtype (`attention_dtype`)
        if window not in masks:
            masks[window] = _attention_mask(cache.length, L, window, cache.padded)
        mask, causal = masks[window]
        o = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.attn_scale(i), enable_gqa=H != H_kv).to(h.dtype)  # (B, H, L, hd)
        return o.transpose(1, 2).reshape(B, L, -1)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """ids (B, L) following the cache's `length` slots -> logits (B, L, V), or (B, 1, V) of the last
        position with `last_only` (generation: the LM head over a long prompt is skipped); the cache advances."""
        B, L = ids.shape
        if L == 1:  # decode: the batch size's prepared native calls where they apply
            if B not in self.decode_plans:
                self.decode_plans[B] = DecodePlan.build(self, B)
            if self.decode_plans[B] is not None:
                return self.decode_plans[B].step(ids, cache)
        past = cache.length
        pos = torch.arange(past, past + L).repeat(B, 1)  # (B, L): each sequence's positions, from its start
        padded = cache.padded
        if padded is not None:
            pos = (pos - padded[:, None]).clamp_(min=0)
        self.check_positions(int(pos[:, -1].max()))
        rope = self.rope(past + L)
        masks = {}  # per sliding window: `_attention_mask`, built once per forward
        x, delta = self.embed(ids, pos), None  # (B, L, d); the FFN output still to add
        attn_norm, ffn_norm, final_norm = self.NORMS
        for i in range(self.num_layers):
            x, h = self.norm(attn_norm.format(i), x, delta)
            o = self.attention(i, h, cache, pos, rope, masks)
            x, h = self.norm(ffn_norm.format(i), x, self.linear(self._projection(i, "out"), o))
            delta = self.ffn(i, h)
        cache.length += L
        if last_only:
            x, delta = x[:, -1:].contiguous(), delta[:, -1:]
        _, h = self.norm(final_norm, x, delta)
        return linear(h.reshape(-1, h.shape[-1]), self.lm_head).reshape(B, h.shape[1], -1)  # (B, L or 1, V)

    def check_positions(self, last: int) -> None:
        """Raise where position `last` (from 0) is past the model's context."""
        if last >= self.context:
            raise MoEConvertError(f"{last + 1} positions exceed the model's context of {self.context}")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of a whole sequence (one prefill)."""
        return self.forward(ids, self.new_cache(ids.shape[0], ids.shape[1]))

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = None
                 ) -> Generation:
        """Greedy (temperature 0) or sampled continuation of `prompt` with a KV cache; stops at an EOS id
        (`eos_token_id`: one or a list, as transformers takes it) or at the model's context."""
        return self.generate_batch([prompt], max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                       eos_token_id: int | list[int] | None = None) -> list[Generation]:
        """`generate` for several prompts decoded together, one forward per step for the batch: prompts are
        left-padded to one length (each sequence's positions start at its first token; padding is masked),
        and a sequence leaves the batch at its EOS or its context. Greedy tokens are each prompt's alone;
        sampling draws from one generator for the batch."""
        check_sampling(temperature, top_k, top_p, seed)
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])  # any EOS id ends it
        if not prompts or not all(prompts):
            raise MoEConvertError("generate: a prompt is empty")
        if (longest := max(map(len, prompts))) >= self.context:
            raise MoEConvertError(f"a prompt has {longest} tokens; the model's context is {self.context}")
        news = [min(max_new_tokens, self.context - len(p)) for p in prompts]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self.new_cache(len(prompts), longest + min(max(news), CACHE_STEP),  # grows as it fills
                               [longest - len(p) for p in prompts])
        tokens, ended = [list(p) for p in prompts], {}  # ended: when each sequence left the batch
        step = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])  # (B, longest): left-padded
        live = list(range(len(prompts)))  # the sequences still in the batch, in its row order
        start = time.perf_counter()
        prefill_s = 0.0
        for n in range(max(news)):
            logits = self.forward(step, cache, last_only=True)[:, -1].float()  # (B, V)
            nxt = (logits.argmax(-1).tolist() if temperature <= 0
                   else [sample(row, temperature, top_k, top_p, gen) for row in logits])
            for b, t in zip(live, nxt if self.ep is None else self.ep.agree(nxt)):
                tokens[b].append(t)
            if n == 0:
                prefill_s = time.perf_counter() - start
            going = [row for row, b in enumerate(live) if tokens[b][-1] not in stop and n + 1 < news[b]]
            ended.update((live[row], time.perf_counter()) for row in set(range(len(live))) - set(going))
            if not going:
                break
            if len(going) < len(live):
                cache.keep(going)
                live = [live[row] for row in going]
            step = torch.tensor([[tokens[b][-1]] for b in live])  # (B, 1)
        out = []
        for b, (p, t, new) in enumerate(zip(prompts, tokens, news)):
            made = len(t) - len(p)
            out.append(Generation(t, made, prefill_s, ended.get(b, time.perf_counter()) - start - prefill_s,
                                  stopped_at_context=made == new < max_new_tokens and t[-1] not in stop))
        return out


def eos_token_ids(path: str | Path, host_config: dict) -> int | list[int] | None:
    """The ids that end a generation, as transformers decides them: the export's generation_config.json
    (copied from the model) when it names any, else the host config's."""
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            return eos
    return host_config.get("eos_token_id")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           gen: torch.Generator | None) -> int:
    """Next token from logits (V,) by top-k / top-p (nucleus) sampling at `temperature` > 0 (greedy decoding
    takes the argmax, in `Runtime.generate_batch`)."""
    logits = logits.double()
    logits = (logits - logits.max()) / temperature  # <= 0: a tiny temperature gives -inf, never +inf or nan
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus (the first always stays)
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


class GPT2Runtime(Runtime):
    """GPT-2: learned positions, LayerNorm, fused `c_attn` Conv1D ([in, out]), tied LM head."""

    ATTENTION, PROJECTIONS, PROJECTIONS_IN_OUT = "attn", {"qkv": ("c_attn",), "out": ("c_proj",)}, True
    NORMS = ("transformer.h.{}.ln_1", "transformer.h.{}.ln_2", "transformer.ln_f")

    def configure(self, c):
        self.heads = c["n_head"]
        self.num_kv_heads, self.head_dim, self.eps = self.heads, c["n_embd"] // c["n_head"], c["layer_norm_epsilon"]

    def embed(self, ids, pos):
        return self.t["transformer.wte.weight"][ids] + self.t["transformer.wpe.weight"][pos]

    def attn_scale(self, i):
        scale = 1.0 / math.sqrt(self.head_dim) if self.cfg.get("scale_attn_weights", True) else 1.0
        return scale / (i + 1) if self.cfg.get("scale_attn_by_inverse_layer_idx") else scale

    @property
    def lm_head(self):
        return self.t.get("lm_head.weight", self.t["transformer.wte.weight"])


class LlamaRuntime(Runtime):
    """Llama / Mistral / Qwen2: RMSNorm, rotary positions, grouped-query attention, Linear ([out, in]).

    RoPE: the default frequencies, or a static scaled variant (`linear`, `llama3`, `yarn`) computed by
    transformers' own `ROPE_INIT_FUNCTIONS` from the host config. Sliding-window layers (Mistral's
    `sliding_window`, Qwen2's `layer_types`) mask keys older than the window, as transformers does.
    """

    STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
    ATTENTION, PROJECTIONS = "self_attn", {"qkv": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",)}
    NORMS = ("model.layers.{}.input_layernorm", "model.layers.{}.post_attention_layernorm", "model.norm")
    RMS_NORM = True

    def configure(self, c):
        self.heads, self.num_kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c["rms_norm_eps"]
        self.inv_freq, self.rope_scale = self._rope(c)
        self.rope_tables = self._rope_tables(0)
        window, types = c.get("sliding_window"), c.get("layer_types")
        self.windows = [window if window and (types is None or types[i] == "sliding_attention") else None
                        for i in range(self.num_layers)]

    def _rope(self, c: dict) -> tuple[torch.Tensor, float]:
        """(inverse frequencies (hd/2,), cos/sin scale) of the host's RoPE."""
        rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
        kind = rope.get("rope_type", "default")
        if kind not in self.STATIC_ROPE_TYPES:
            raise MoEConvertError(f"rope_type {kind!r} is not supported by the runtime "
                                  f"(supported: {', '.join(self.STATIC_ROPE_TYPES)})")
        if kind == "default":
            return 1.0 / rope["rope_theta"] ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim), 1.0
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](AutoConfig.for_model(**c), torch.device("cpu"))
        return inv_freq.float(), float(scale)

    def sliding_window(self, i):
        return self.windows[i]

    def _rope_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) of positions 0..positions-1, each (positions, hd) fp32, as transformers computes them."""
        freqs = torch.arange(positions, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # (P, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, hd)
        return emb.cos() * self.rope_scale, emb.sin() * self.rope_scale

    def rope(self, positions):
        if positions > self.rope_tables[0].shape[0]:  # doubled as generations grow, up to the context
            self.rope_tables = self._rope_tables(min(max(positions, 2 * self.rope_tables[0].shape[0], CACHE_STEP),
                                                     max(positions, self.context)))
        return self.rope_tables

    def embed(self, ids, pos):
        return self.t["model.embed_tokens.weight"][ids]

    @property
    def lm_head(self):
        return self.t.get("lm_head.weight", self.t["model.embed_tokens.weight"])


RUNTIMES: dict[str, type[Runtime]] = {"gpt2": GPT2Runtime, "llama": LlamaRuntime, "mistral": LlamaRuntime,
                                      "qwen2": LlamaRuntime}


def load_runtime(path: str | Path, expert_parallel: bool = False, manifest: dict | None = None) -> Runtime:
    """Load and verify an export, ready to run (`manifest`: its `read_manifest`, when the caller has it).
    With `expert_parallel`, a process started by torchrun as one of `ep_size` ranks loads the shared weights
    and its own experts (`expert_parallel.from_environment`)."""
    manifest = manifest or read_manifest(path)
    if manifest["host"] not in RUNTIMES:
        raise MoEConvertError(f"the runtime has no forward for host {manifest['host']!r} "
                              f"(supported: {', '.join(RUNTIMES)})")
    ep = from_environment(manifest["ep_size"]) if expert_parallel else None
    if ep is None:
        return RUNTIMES[manifest["host"]](Path(path), manifest)
    runtime, error = None, None
    try:
        runtime = RUNTIMES[manifest["host"]](Path(path), manifest, ep)
    except (MoEConvertError, OSError) as e:  # a missing or truncated rank file, say
        error = e
    ep.check_all_loaded(error)
    return runtime


@dataclass
class TextGeneration:
    """What `generate_text` made of one prompt: the new text and tokens, and how the run went."""

    prompt: str
    text: str
    prompt_tokens: int
    generation: Generation  # prompt + new tokens, timings
    context: int  # the model's
    rank: int  # this process's in an expert-parallel group (0 alone): rank 0 reports for the group
    widened_fp16: bool  # an fp16 export computed in fp32 (no native fp16 matmul on this CPU)

    @property
    def new_tokens(self) -> list[int]:
        return self.generation.tokens[self.prompt_tokens:]


def generate_text(job: GenerateJob) -> list[TextGeneration]:
    """The `generate` command: tokenize each prompt with the export's tokenizer, decode them as one batch
    (`Runtime.generate_batch`), detokenize; one `TextGeneration` per prompt, in order.

    Under torchrun on an `--ep-size N` export, each process holds one rank's experts."""
    manifest = read_manifest(job.export_dir)  # an export at all; then its tokenizer, before the weights load
    prompts = job.all_prompts()
    tokenizer = load_tokenizer(job.export_dir)
    runtime = load_runtime(job.export_dir, expert_parallel=True, manifest=manifest)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    outs = runtime.generate_batch(ids, job.max_new_tokens, job.temperature, job.top_k, job.top_p, job.seed,
                                  eos_token_ids(job.export_dir, runtime.cfg))
    if runtime.ep is not None:
        runtime.ep.close()
    return [TextGeneration(text, tokenizer.decode(out.tokens[len(p):], skip_special_tokens=True), len(p), out,
                           runtime.context, runtime.ep.rank if runtime.ep is not None else 0,
                           runtime.dtype != runtime.stored_dtype) for text, p, out in zip(prompts, ids, outs)]

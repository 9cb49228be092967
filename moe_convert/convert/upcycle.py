"""Dense checkpoint in, PR-MoE checkpoint out, streaming.

1. resolve SOURCE (local dir or hub id) and read its config; pick the host adapter;
2. build the MoE layout from the options and instantiate the PR-MoE model on the meta device:
   its state dict (less tied weights, as `save_pretrained` drops them) is the output plan;
3. for the function-preserving init, fit the routers to the dense model's hidden states on a
   calibration sample, computed one decoder block at a time (`convert/calibrate.py`);
4. stream: every tensor is read from the dense checkpoint, transformed, and appended to a
   size-capped shard whose header was written first; stacked experts are produced one expert at a
   time, so memory does not grow with the expert count;
5. write config.json + the modeling code (trust_remote_code), tokenizer and generation config,
   rename the temporary directory into place;
6. measure fidelity on a fixed held-out sample: the dense model and the written one, each run one
   decoder block at a time, so no phase holds more than one layer of either model.

Init modes (`--init`):
- `preserve` (default): function-preserving. Coefficient weight and bias 0 (c = 0.5 / 0.5), every
  expert a copy of the dense FFN with its output projection scaled by E, and a router so small
  that p_e = 1/E (1 + O(1e-6)) for every token: y = 0.5 * p_e * E * M(x) + 0.5 * M(x) = M(x). The
  router's directions are random in the whitened space of the dense hidden states entering that FFN,
  with one scale per expert fitted so that its argmax gives every expert a near-equal share of the
  calibration tokens (`calibrate.balanced_router`).
  Top-k > 1 renormalises the k weights to 1, so there the experts are plain copies.
- `copy`: DeepSpeed / sparse upcycling: experts and residual FFN = dense FFN, router normal(0,
  initializer_range), coefficient `nn.Linear` default init.
- `noise:S`: `copy` plus N(0, S^2) noise on every expert tensor.
- `drop:R`: Drop-Upcycling: `copy`, then a fraction R of each expert's hidden units (a different
  seeded subset per expert) re-initialised from N(mean, std) of the dropped slice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers

from .. import __version__
from ..errors import MoEConvertError, one_line
from ..io import (DTYPES, CheckpointReader, ShardWriter, atomic_output_dir, cast_float, check_output_apart,
                  return_freed_memory, write_model_files)
from ..model.configuration_prmoe import PRMoEConfig
from ..model.layout import MoELayout, build_layout
from ..model.modeling import HostSpec, PRMoEForCausalLM, host_spec
from ..model.moe import EXPERT_PARAMS
from ..options import parse_size
from .calibrate import StreamedLM, balanced_router, host_names, on_meta, one_thread
from .config import InitSpec, UpcycleJob
from .gguf import gguf_to_dir, is_gguf

CALIBRATION_TOKENS, CALIBRATION_LEN = 4096, 128  # preserve: router calibration sample (tokens, row length)
FIDELITY_ROWS, FIDELITY_LEN = 16, 64  # the fidelity sample: rows x tokens
FIDELITY_SEED = 1234  # the fixed fidelity sample (when the source has no tokenizer)
EVAL_FRACTION = 0.1  # builtin:pydoc's held-out share, as `train --eval-fraction` splits it
_STREAM_ROUTER, _STREAM_COEF, _STREAM_DROP, _STREAM_PARAM = 0, 1, 2, 3  # seed streams per (layer, expert)


@dataclass
class UpcycleSummary:
    """What `upcycle` wrote and the fidelity it measured (None where the check was skipped)."""

    output: str
    source: str
    host: str
    init: str
    seed: int
    dtype: str
    num_layers: int
    moe_layers: list[int]
    experts_per_layer: list[int]
    top_k: int
    residual: bool
    total_params: int
    active_params: int
    size_on_disk: int  # bytes of the weight shards
    shards: int
    seconds: float
    max_abs_logit_diff: float | None = None
    kl: float | None = None
    max_expert_share: list[float] | None = None  # per MoE layer: largest fraction of sample tokens on one expert
    fidelity: str = ""  # what the fidelity sample was, or why the check was skipped

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_source(source: str) -> Path:
    """A local model directory, a GGUF file (dequantized once into the cache, `convert/gguf.py`), or a hub id
    resolved through the cache (downloading when online)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if is_gguf(source):
        return gguf_to_dir(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = constants.is_offline_mode()
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        local = Path(snapshot_download(source, allow_patterns=patterns, local_files_only=offline))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(source, allow_patterns=patterns + ["pytorch_model*.bin"],
                                           local_files_only=offline))
    except HFValidationError:
        raise MoEConvertError(f"{source!r} is not a local directory and not a valid hub model id") from None
    except Exception as e:
        if offline:
            raise MoEConvertError(f"{source!r} is not a local directory and is not in the hub cache (offline)") from None
        raise MoEConvertError(f"{source!r} is not a local directory and could not be downloaded: "
                              f"{one_line(e)}") from None
    return local


def _generator(seed: int, *stream: int) -> torch.Generator:
    """An independent, reproducible random stream per (seed, layer, expert, purpose)."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class _LayerPlan:
    """One MoE layer: where its dense FFN lives in the source and what it expands to."""

    index: int  # decoder layer
    num_experts: int
    prefix: str  # host key prefix of the FFN, e.g. "transformer.h.1.mlp."
    router: torch.Tensor | None = field(default=None, repr=False)  # (E, d) calibrated (preserve)


class _Upcycler:
    """Maps each output tensor name to the tensor it should hold, reading the dense checkpoint lazily."""

    def __init__(self, reader: CheckpointReader, spec: HostSpec, host_config, layout: MoELayout,
                 init: InitSpec, seed: int, dtype: torch.dtype, expected: dict[str, torch.Size]):
        self.reader, self.spec, self.host_config, self.layout = reader, spec, host_config, layout
        self.init, self.seed, self.dtype = init, seed, dtype
        self.layers = {f"host.{spec.layers}.{i}.{spec.ffn_attr}.": _LayerPlan(i, e, f"{spec.layers}.{i}.{spec.ffn_attr}.")
                       for i, e in zip(layout.moe_layers, layout.num_experts)}
        # Dense tensors the output needs, under the host's own names, each found under either
        # spelling (GPT-2 hub files have no `transformer.` prefix; transformers v5 writes it).
        needed = {name.removeprefix("host.") for name in expected}
        for plan in self.layers.values():
            needed |= {plan.prefix + key for key, _ in spec.expert_keys.values()}
        self.source_name = host_names(reader.keys(), getattr(transformers, spec.causal_lm).base_model_prefix, needed)

    def dense(self, key: str) -> torch.Tensor:
        if key not in self.source_name:
            raise MoEConvertError(f"{self.reader.path}: the dense checkpoint has no tensor {key!r}")
        return self.reader.get(self.source_name[key])

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return cast_float(t, self.dtype)

    def tensor(self, name: str, shape: torch.Size) -> torch.Tensor | Iterator[torch.Tensor]:
        """The output tensor `name`, or for stacked experts an iterator of (1, ...) blocks."""
        layer_prefix = next((p for p in self.layers if name.startswith(p)), None)
        if layer_prefix is None:
            return self._checked(name, self._cast(self.dense(name.removeprefix("host."))), shape)
        layer, rest = self.layers[layer_prefix], name[len(layer_prefix):]
        if rest.startswith("mlp."):  # the residual dense FFN, unchanged
            return self._checked(name, self._cast(self.dense(layer.prefix + rest[len("mlp."):])), shape)
        if rest.startswith("experts."):
            return self._experts(layer, rest[len("experts."):], shape)
        if rest == "router.weight":
            return self._router(layer, shape)
        if rest.startswith("coefficient."):
            return self._coefficient(layer, rest, shape)
        raise MoEConvertError(f"no rule to produce {name}")  # a new PRMoELayer parameter upcycle does not know

    @staticmethod
    def _checked(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if t.shape != shape:
            raise MoEConvertError(f"{name}: the dense checkpoint has shape {tuple(t.shape)}, "
                                  f"its config implies {tuple(shape)}")
        return t.contiguous()

    def _experts(self, layer: _LayerPlan, param: str, shape: torch.Size) -> Iterator[torch.Tensor]:
        key, transposed = self.spec.expert_keys[param]
        base = self.dense(layer.prefix + key).float()
        base = self._checked(f"{layer.prefix}{key}", base.t() if transposed else base, shape[1:])  # [in, out]
        dims = EXPERT_PARAMS[self.spec.ffn_kind][param]
        param_id = list(EXPERT_PARAMS[self.spec.ffn_kind]).index(param)
        E, mode = layer.num_experts, self.init.mode
        scale = E if mode == "preserve" and self.layout.top_k == 1 and param in ("w_out", "b_out") else 1
        if mode in ("copy", "preserve"):  # every expert the same block: built once, written E times
            block = self._cast(base * scale).unsqueeze(0)
            yield from (block for _ in range(E))
            return
        for e in range(E):
            w = base.clone()
            if mode == "noise":
                w += self.init.value * torch.randn(w.shape, generator=_generator(self.seed, layer.index, e,
                                                                                  _STREAM_PARAM + param_id))
            elif mode == "drop" and "f" in dims:  # hidden units live on the inner (f) dimension
                self._drop(w, dims.index("f") - 1, layer, e, param_id)
            yield self._cast(w).unsqueeze(0)  # (1, in, out) / (1, out)

    def _drop(self, w: torch.Tensor, axis: int, layer: _LayerPlan, e: int, param_id: int) -> None:
        """Drop-Upcycling: re-initialise this expert's dropped hidden units along `axis` (in place)."""
        f = w.shape[axis]
        n = round(self.init.value * f)
        if n == 0:
            return
        units = torch.randperm(f, generator=_generator(self.seed, layer.index, e, _STREAM_DROP))[:n]  # same per expert
        dropped = w.index_select(axis, units)
        std = dropped.std().nan_to_num(0.0) if dropped.numel() > 1 else torch.tensor(0.0)
        fresh = torch.randn(dropped.shape, generator=_generator(self.seed, layer.index, e, _STREAM_PARAM + param_id))
        w.index_copy_(axis, units, dropped.mean() + std * fresh)

    def _router(self, layer: _LayerPlan, shape: torch.Size) -> torch.Tensor:
        if layer.router is not None:
            return self._cast(layer.router)
        std = getattr(self.host_config, "initializer_range", 0.02)
        return self._cast(std * torch.randn(shape, generator=_generator(self.seed, layer.index, _STREAM_ROUTER)))

    def _coefficient(self, layer: _LayerPlan, rest: str, shape: torch.Size) -> torch.Tensor:
        if self.init.mode == "preserve":  # c = softmax(0) = (0.5, 0.5) for every token
            return torch.zeros(shape, dtype=self.dtype)
        bound = 1 / math.sqrt(self.host_config.hidden_size)  # nn.Linear's default init, as DeepSpeed leaves it
        stream = _STREAM_COEF if rest == "coefficient.weight" else _STREAM_COEF + 100
        g = _generator(self.seed, layer.index, stream)
        return self._cast(torch.empty(shape).uniform_(-bound, bound, generator=g))


def _sample_len(host_config, want: int) -> int:
    """Tokens per sample row: `want`, or fewer for a model with fewer positions."""
    return min(want, getattr(host_config, "max_position_embeddings", want) or want)


def _corpus_rows(src: Path, held_out: bool, rows: int, seq_len: int, vocab: int) -> torch.Tensor | None:
    """(rows, seq_len) token ids of builtin:pydoc's held-out (or training) documents, the rows starting at
    evenly spaced documents (the corpus goes topic by topic), each filled from the documents that follow;
    None when the source has no tokenizer."""
    if not any(src.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    from ..training.data import BUILTIN_CORPORA, is_eval_document

    tokenizer = AutoTokenizer.from_pretrained(src)
    documents = [t for t in BUILTIN_CORPORA["pydoc"]() if is_eval_document(t, EVAL_FRACTION) == held_out]
    out = []
    for r in range(rows):
        ids: list[int] = []
        for text in documents[r * len(documents) // rows:]:
            ids += tokenizer(text)["input_ids"]
            if len(ids) >= seq_len:
                break
        if len(ids) < seq_len:
            return None
        out.append(ids[:seq_len])
    return torch.tensor(out).clamp_max(vocab - 1)  # (rows, seq_len)


def _calibration_sample(src: Path, host_config, seed: int) -> torch.Tensor:
    """preserve: the router calibration sample (rows, L): builtin:pydoc training text, else seeded random ids."""
    seq_len = _sample_len(host_config, CALIBRATION_LEN)
    rows = max(1, CALIBRATION_TOKENS // seq_len)
    ids = _corpus_rows(src, False, rows, seq_len, host_config.vocab_size)
    if ids is None:
        ids = torch.randint(0, host_config.vocab_size, (rows, seq_len), generator=_generator(seed, 2**31))
    return ids


def _fidelity_sample(src: Path, host_config) -> tuple[torch.Tensor, str]:
    """The fixed sample: with a tokenizer, held-out builtin:pydoc text (varied prose, the same on every
    machine with this Python); else fixed random ids."""
    seq_len = _sample_len(host_config, FIDELITY_LEN)
    ids = _corpus_rows(src, True, FIDELITY_ROWS, seq_len, host_config.vocab_size)
    if ids is not None:
        return ids, f"{FIDELITY_ROWS}x{seq_len} tokens of held-out builtin:pydoc text"
    generator = torch.Generator().manual_seed(FIDELITY_SEED)
    ids = torch.randint(0, host_config.vocab_size, (FIDELITY_ROWS, seq_len), generator=generator)
    return ids, f"{FIDELITY_ROWS}x{seq_len} fixed random token ids"


def _dense_model(reader: CheckpointReader, spec: HostSpec, host_config) -> StreamedLM:
    """The dense model, run one decoder block at a time from its checkpoint."""
    host_class = getattr(transformers, spec.causal_lm)
    lm = on_meta(lambda: host_class(host_config))
    stored = host_names(reader.keys(), host_class.base_model_prefix, set(lm.state_dict()))
    return StreamedLM(lm, spec, lambda name: reader.get(stored[name]) if name in stored else None)


def _upcycled_model(output: Path, spec: HostSpec, config: PRMoEConfig) -> StreamedLM:
    """The written PR-MoE model's host, run one decoder block at a time from its shards."""
    reader = CheckpointReader(output)
    stored = set(reader.keys())
    model = on_meta(lambda: PRMoEForCausalLM(config))
    return StreamedLM(model.host, spec, lambda name: reader.get(f"host.{name}") if f"host.{name}" in stored else None)


def _calibrate(dense: StreamedLM, src: Path, host_config, layers: dict[str, _LayerPlan], seed: int) -> None:
    """preserve: fit each MoE layer's router to the dense hidden states entering that FFN.

    Each fit runs on one thread, as the hidden states are computed (`calibrate.py`): the routers must not
    depend on the machine's core count (same inputs + seed -> the same bytes)."""
    def fit(plan: _LayerPlan, x: torch.Tensor) -> None:  # x (T, d)
        with one_thread():
            plan.router = balanced_router(x, plan.num_experts, _generator(seed, plan.index, _STREAM_ROUTER))

    taps = {p.index: lambda x, block, p=p: fit(p, x) for p in layers.values()}
    dense.run(_calibration_sample(src, host_config, seed), taps, blocks=max(taps) + 1)


@dataclass
class _Plan:
    """What upcycling writes: the PR-MoE config, its model on the meta device, every output tensor."""

    config: PRMoEConfig
    layout: MoELayout
    meta: PRMoEForCausalLM  # shapes only: counts parameters, carries the modeling code to copy
    upcycler: _Upcycler
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]]  # (name, shape, dtype), in writing order
    dtype: torch.dtype  # of the floating-point output tensors

    @property
    def params(self) -> tuple[int, int]:
        """(total, active per token) parameters: each MoE layer's unchosen experts are inactive."""
        total = sum(p.numel() for p in self.meta.parameters())
        moe = self.meta.moe_layers()
        per_expert = sum(math.prod(p.shape[1:]) for p in moe[0].experts.parameters()) if moe else 0
        return total, total - sum(e - self.layout.top_k for e in self.layout.num_experts) * per_expert


def _open_dense(source: str, output: Path) -> tuple[Path, CheckpointReader, HostSpec, object]:
    """Phase 1: the dense checkpoint, its config and its host adapter."""
    src = resolve_source(source)
    check_output_apart(output, [src])
    reader = CheckpointReader(src)
    if reader.config.get("model_type") == "prmoe":
        raise MoEConvertError(f"{source} is already a PR-MoE model; upcycle takes a dense checkpoint")
    spec = host_spec(reader.config.get("model_type"))
    from transformers import AutoConfig

    host_config = AutoConfig.from_pretrained(src)
    if getattr(host_config, "mlp_bias", False):  # Llama-family option; our gated experts have no biases
        raise MoEConvertError(f"{source}: FFN biases on a gated host (mlp_bias=True) are not supported")
    return src, reader, spec, host_config


def _plan(source: str, reader: CheckpointReader, spec: HostSpec, host_config, layout: MoELayout,
          init_spec: InitSpec, seed: int, dtype: str) -> _Plan:
    """Phase 2: the PR-MoE config and, from its model on the meta device, the output plan: exactly the
    tensors `PRMoEForCausalLM.save_pretrained` would write (less tied weights, as it drops them)."""
    floating = next((k for k in reader.keys() if reader.dtype(k).is_floating_point), None)
    out_dtype = DTYPES[dtype] if dtype != "auto" else (reader.dtype(floating) if floating else torch.float32)
    host_config.dtype = str(out_dtype).removeprefix("torch.")
    config = PRMoEConfig.from_layout(host_config, layout, {"source": source, "init": str(init_spec), "seed": seed,
                                                           "tool": f"moe-convert {__version__}"})
    config.dtype = host_config.dtype
    config.architectures = [PRMoEForCausalLM.__name__]
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        meta = PRMoEForCausalLM(config)
    saved = remove_tied_weights_from_state_dict(meta.state_dict(), meta)
    upcycler = _Upcycler(reader, spec, host_config, layout, init_spec, seed, out_dtype,
                         {name: t.shape for name, t in saved.items()})
    for name in saved:
        if not any(name.startswith(p) for p in upcycler.layers) and name.removeprefix("host.") not in upcycler.source_name:
            upcycler.dense(name.removeprefix("host."))  # raises: the dense checkpoint lacks it
    tensors = [(name, tuple(t.shape), out_dtype if t.is_floating_point() else t.dtype) for name, t in saved.items()]
    return _Plan(config, layout, meta, upcycler, tensors, out_dtype)


@dataclass
class _Reference:
    """The fidelity check's dense side: the fixed sample, what it is, the dense model's last hidden states."""

    sample: torch.Tensor  # (B, L) token ids
    note: str
    dense: StreamedLM
    hidden: torch.Tensor  # (B, L, d) after the last decoder block


def _use_dense(src: Path, reader: CheckpointReader, spec: HostSpec, host_config, plan: _Plan, init_spec: InitSpec,
               seed: int, check: bool) -> _Reference | None:
    """Phase 3: the dense model, run one decoder block at a time and only when needed: `preserve` fits the
    routers to its hidden states; with `check`, returns the fidelity reference."""
    if init_spec.mode != "preserve" and not check:
        return None
    dense = _dense_model(reader, spec, host_config)
    if init_spec.mode == "preserve":
        _calibrate(dense, src, host_config, plan.upcycler.layers, seed)
    if not check:
        return None
    sample, note = _fidelity_sample(src, host_config)
    return _Reference(sample, note, dense, dense.run(sample))


def _stream(tmp: Path, plan: _Plan, max_shard_bytes: int, progress) -> list[str]:
    """Phase 4: every output tensor, made from the dense checkpoint's and appended to a size-capped shard
    whose header was written first; the shard names."""
    writer = ShardWriter(tmp, max_shard_bytes, metadata={"producer": f"moe-convert {__version__} upcycle"})
    writer.begin(plan.tensors)
    done, total = 0, writer.total_bytes
    try:
        for name, shape, tensor_dtype in plan.tensors:
            writer.write(name, plan.upcycler.tensor(name, torch.Size(shape)))
            done += math.prod(shape) * tensor_dtype.itemsize
            if progress:
                progress(done, total)
        return writer.finish()
    finally:
        writer.close()


def _write(output: Path, overwrite: bool, src: Path, plan: _Plan, max_shard_bytes: int, progress) -> list[str]:
    """Phases 4 and 5: the weights streamed, then config.json, the modeling code, tokenizer and generation
    config, all in a temporary directory renamed into place when complete; the shard names."""
    with atomic_output_dir(output, overwrite, inputs=[src]) as tmp:
        shards = _stream(tmp, plan, max_shard_bytes, progress)
        write_model_files(plan.meta, plan.config, tmp, src)
    return shards


def run_upcycle(job: UpcycleJob, *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> UpcycleSummary:
    """Upcycle the dense checkpoint `job.source` into a PR-MoE checkpoint directory `job.output`, phase by
    phase (module docstring); `overwrite` replaces an existing output once the new one is complete.

    `progress(bytes_written, total_bytes)` is called after every tensor.
    """
    start = time.perf_counter()
    init_spec = InitSpec.parse(job.init)
    output = Path(job.output)
    if output.exists() and not overwrite:  # fail before any work; atomic_output_dir checks again
        raise MoEConvertError(f"output {output} already exists (pass --overwrite to replace it)")

    src, reader, spec, host_config = _open_dense(job.source, output)
    layout = build_layout(host_config.num_hidden_layers, moe_every=job.moe_every, pyramid=job.pyramid,
                          pyramid_split=job.pyramid_split, experts=job.experts, top_k=job.top_k, residual=job.residual,
                          capacity_factor=job.capacity_factor, aux_loss_coef=job.aux_loss_coef)
    plan = _plan(job.source, reader, spec, host_config, layout, init_spec, job.seed, job.dtype)
    total_params, active_params = plan.params
    reference = _use_dense(src, reader, spec, host_config, plan, init_spec, job.seed, job.fidelity)
    shards = _write(output, overwrite, src, plan, parse_size(job.max_shard_size), progress)

    summary = UpcycleSummary(
        output=str(output), source=job.source, host=spec.causal_lm, init=str(init_spec), seed=job.seed,
        dtype=str(plan.dtype).removeprefix("torch."), num_layers=layout.num_layers, moe_layers=layout.moe_layers,
        experts_per_layer=layout.num_experts, top_k=layout.top_k, residual=layout.residual,
        total_params=total_params, active_params=active_params,
        size_on_disk=sum((output / f).stat().st_size for f in shards), shards=len(shards),
        seconds=0.0,
    )
    if reference is not None:
        _measure_fidelity(summary, output, spec, plan, reference)  # phase 6
        summary.fidelity = f"on {reference.note}, fp32"
    else:
        summary.fidelity = "skipped (--no-fidelity)"
    summary.seconds = time.perf_counter() - start
    return summary


def upcycle(source: str, output: str | Path, *, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None, **options) -> UpcycleSummary:
    """`run_upcycle` with `UpcycleJob`'s fields as keywords: `upcycle("gpt2", "out", pyramid="4,8")`."""
    return run_upcycle(UpcycleJob(source, str(output), **options), overwrite=overwrite, progress=progress)


def _measure_fidelity(summary: UpcycleSummary, output: Path, spec: HostSpec, plan: _Plan, ref: _Reference) -> None:
    """max |dlogits|, mean KL(dense || upcycled) per position, largest expert share per MoE layer: the written
    model run one decoder block at a time from its shards, beside the dense reference."""
    upcycled = _upcycled_model(output, spec, plan.config)
    shares = {}

    def share(i: int, x: torch.Tensor, block) -> None:  # x (T, d): the MoE layer's input
        router = getattr(block, spec.ffn_attr).router.weight  # (E, d)
        counts = torch.bincount((x.float() @ router.float().t()).argmax(-1), minlength=router.shape[0])  # first choices
        shares[i] = (counts.max() / counts.sum()).item()

    hidden = upcycled.run(ref.sample, {i: lambda x, block, i=i: share(i, x, block) for i in plan.layout.moe_layers})
    return_freed_memory()
    max_diff, kl = 0.0, 0.0
    with torch.inference_mode():  # a row at a time: its (L, V) logits and float64 log-probabilities are transient
        for dense_h, moe_h in zip(ref.hidden.split(1), hidden.split(1)):  # (1, L, d) each
            dense_logits, logits = ref.dense.logits(dense_h), upcycled.logits(moe_h)  # (b, L, V)
            max_diff = max(max_diff, (logits - dense_logits).abs().max().item())
            log_p, log_q = dense_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
            kl += (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
    summary.max_abs_logit_diff, summary.kl = max_diff, kl / ref.sample.numel()
    summary.max_expert_share = [shares[i] for i in plan.layout.moe_layers]

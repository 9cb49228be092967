"""`moe-convert export`: a PR-MoE model directory -> an inference layout, as a small registry of formats.

- `safetensors`: the host's own weight names without the `host.` prefix; in
  each MoE layer `router.weight [E, d]`, stacked experts `experts.<w> [E, in, out]` (grouped-GEMM
  ready), the residual FFN `mlp.*` and `coefficient.*`, with the manifest in every file's metadata
  (file names and manifest keys: `formats.py`). With `ep_size=N` each rank's experts (a contiguous
  range per layer) get a file of their own.
- `hf`: our model directory again (`save_pretrained`: sharded, index), in the chosen dtype.
- `deepspeed`: per MoE layer a state dict that `deepspeed.moe.layer.MoE(d, expert, num_experts=E,
  k=top_k, use_residual=True)` (False for a --no-residual model) accepts with `load_state_dict`, plus
  the non-MoE weights and the manifest.

Every format streams one source tensor at a time (except `hf`, which loads the model), writes into
a temporary directory and renames it when complete, and copies the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MoEConvertError
from ..formats import (WEIGHT_SUFFIXES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_KEY, SINGLE_FILE, SHARED_FILE,
                       DEEPSPEED_FORMAT, DEEPSPEED_NON_MOE, DEEPSPEED_ROUTER, deepspeed_expert_key, experts_file)
from ..io import DTYPES, CheckpointReader, ShardWriter, atomic_output_dir, cast_float, copy_tokenizer_files
from ..options import parse_size
from .config import ExportJob

HF_MAX_SHARD_SIZE = "5GB"  # `--format hf` shards, unless --max-shard-size says otherwise
# DeepSpeed's expert module for each of our FFN kinds (what a user passes as `expert` to `MoE`)
DEEPSPEED_EXPERT_MODULE = {"mlp": "transformers GPT2MLP(inner, config)", "gated": "transformers LlamaMLP(config)"}


@dataclass
class Source:
    """A PR-MoE model directory opened for streaming: tensors on demand, config, host adapter."""

    path: Path
    reader: CheckpointReader
    config: object  # PRMoEConfig
    spec: object  # modeling.HostSpec

    def ffn_prefix(self, layer: int) -> str:
        """Host-native name prefix of decoder layer `layer`'s FFN (a PR-MoE layer when it is MoE)."""
        return f"{self.spec.layers}.{layer}.{self.spec.ffn_attr}"

    def names(self) -> list[str]:
        """Host-native tensor names (checkpoint names without `host.`), in checkpoint order."""
        return [k.removeprefix("host.") for k in self.reader.keys()]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or only its rows `rows` along dim 0 (one expert / one EP rank of a stacked tensor)."""
        return self.reader.get("host." + name, rows)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.shape("host." + name))


def check_prmoe(path: str | Path, model_type: str | None) -> None:
    """Export takes our PR-MoE models only (`model_type` from the model's config.json)."""
    from ..model.configuration_prmoe import PRMoEConfig

    if model_type != PRMoEConfig.model_type:
        raise MoEConvertError(f"{path} is not a moe-convert PR-MoE model (config.json model_type is {model_type!r}, "
                              f"expected 'prmoe'); make one with `moe-convert upcycle`")


def check_ep_size(config, ep_size: int) -> None:
    """Every MoE layer's experts split evenly over `ep_size` ranks (`config`: a PRMoEConfig)."""
    for layer, E in zip(config.moe_layers, config.num_experts):
        if E % ep_size:
            raise MoEConvertError(f"--ep-size {ep_size} does not divide the {E} experts of MoE layer {layer}; "
                                  f"pick an ep size that divides every layer's expert count {config.num_experts}")


def open_source(path: str | Path) -> Source:
    """Open our model directory; anything else is a one-line error."""
    from ..model.configuration_prmoe import PRMoEConfig
    from ..model.modeling import host_spec

    path = Path(path)
    if not path.is_dir():
        raise MoEConvertError(f"{path} is not a directory")
    reader = CheckpointReader(path)
    check_prmoe(path, reader.config.get("model_type"))
    config = PRMoEConfig.from_pretrained(path)
    src = Source(path, reader, config, host_spec(config.text_config.model_type))
    names = set(src.names())
    for layer, E in zip(config.moe_layers, config.num_experts):
        for key in ["router.weight", *(f"experts.{w}" for w in src.spec.expert_keys)]:
            name = f"{src.ffn_prefix(layer)}.{key}"
            if name not in names:
                raise MoEConvertError(f"{path}: MoE layer {layer} has no tensor {name}")
            if src.shape(name)[0] != E:  # stacked experts / router rows against config.json
                raise MoEConvertError(f"{path}: MoE layer {layer} has {src.shape(name)[0]} experts in {name}, "
                                      f"but config.json says {E}")
    return src


def manifest(src: Source, fmt: str, dtype: str, ep_size: int = 1) -> dict:
    """What a reader of the export needs besides the tensors (stored as JSON in the file metadata)."""
    cfg, spec = src.config, src.spec
    host = json.loads(cfg.text_config.to_json_string(use_diff=False))
    layers = []
    for layer, E in zip(cfg.moe_layers, cfg.num_experts):
        per_rank = E // ep_size
        layers.append({"layer": layer, "prefix": src.ffn_prefix(layer), "experts": E,
                       "ranks": [[r * per_rank, (r + 1) * per_rank] for r in range(ep_size)]})
    return {
        "format": fmt, "version": FORMAT_VERSION, "host": cfg.text_config.model_type, "ffn_kind": spec.ffn_kind,
        "activation": getattr(cfg.text_config, spec.activation_attr), "dtype": dtype,
        "top_k": cfg.num_experts_per_tok, "residual": cfg.residual, "capacity_factor": cfg.capacity_factor,
        "min_capacity": cfg.min_capacity, "aux_loss_coef": cfg.aux_loss_coef, "ep_size": ep_size, "layers": layers,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings), "host_config": host,
        "source": str(src.path.resolve()), "provenance": cfg.provenance,
    }


def _write_file(tmp: Path, filename: str, plan: list[tuple[str, tuple, torch.dtype, Callable]], meta: dict,
                on_tensor: Callable[[str], None]) -> str:
    """Stream `plan` entries `(name, shape, dtype, produce)` into `tmp/filename` with the manifest as metadata."""
    scratch = tmp / ".scratch"
    scratch.mkdir()
    writer = ShardWriter(scratch, 2**62, metadata={MANIFEST_KEY: json.dumps(meta, sort_keys=True)})
    writer.begin([(name, shape, dtype) for name, shape, dtype, _ in plan])
    try:
        for name, _, _, produce in plan:
            writer.write(name, produce())
            on_tensor(name)
        (scratch / writer.finish()[0]).rename(tmp / filename)
    finally:
        writer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return filename


def _entry(src: Source, name: str, dtype: torch.dtype, rows: tuple[int, int] | None = None,
           out_name: str | None = None, transform: Callable | None = None):
    """A plan entry reading `name` (optionally rows `rows` of dim 0, then `transform`) cast to `dtype`."""
    shape = src.shape(name)
    if rows is not None:
        shape = (rows[1] - rows[0], *shape[1:])
    src_dtype = src.reader.dtype("host." + name)
    out_dtype = dtype if src_dtype.is_floating_point else src_dtype

    def produce():
        t = src.get(name, rows)
        t = transform(t) if transform is not None else t
        return cast_float(t, dtype).contiguous()

    if transform is not None:  # e.g. a transpose: shape after the transform, read once to know it
        shape = tuple(transform(torch.empty(shape, device="meta")).shape)
    return (out_name or name, shape, out_dtype, produce)


def _expert_names(src: Source) -> dict[str, tuple[int, int]]:
    """Host-native name of every stacked expert tensor -> (MoE layer, expert count)."""
    return {f"{src.ffn_prefix(layer)}.experts.{w}": (layer, E)
            for layer, E in zip(src.config.moe_layers, src.config.num_experts) for w in src.spec.expert_keys}


def export_safetensors(src: Source, tmp: Path, dtype: str, ep_size: int, on_tensor, **_) -> list[str]:
    """The inference layout: one file, or a shared file plus one file per expert-parallel rank."""
    check_ep_size(src.config, ep_size)
    meta, torch_dtype = manifest(src, FORMAT_NAME, dtype, ep_size), DTYPES[dtype]
    expert_names = _expert_names(src)
    if ep_size == 1:
        return [_write_file(tmp, SINGLE_FILE, [_entry(src, n, torch_dtype) for n in src.names()], meta, on_tensor)]
    files = [_write_file(tmp, SHARED_FILE, [_entry(src, n, torch_dtype) for n in src.names() if n not in expert_names],
                         meta, on_tensor)]
    ranks = {entry["layer"]: entry["ranks"] for entry in meta["layers"]}  # the manifest's own expert ranges
    for r in range(ep_size):
        plan = [_entry(src, n, torch_dtype, rows=tuple(ranks[layer][r])) for n, (layer, _) in expert_names.items()]
        files.append(_write_file(tmp, experts_file(r, ep_size), plan, meta, on_tensor))
    return files


def export_hf(src: Source, tmp: Path, dtype: str, max_shard_size: str, on_tensor, **_) -> list[str]:
    """Our model directory (`save_pretrained`, sharded with an index past `max_shard_size`) in `dtype`."""
    from ..model.modeling import PRMoEForCausalLM

    model = PRMoEForCausalLM.from_pretrained(src.path, dtype=DTYPES[dtype])
    model.save_pretrained(tmp, max_shard_size=parse_size(max_shard_size or HF_MAX_SHARD_SIZE))
    on_tensor("*")
    return sorted(p.name for p in tmp.iterdir())


def export_deepspeed(src: Source, tmp: Path, dtype: str, on_tensor, **_) -> list[str]:
    """Per MoE layer the state dict of `deepspeed.moe.layer.MoE(..., use_residual=<the model's residual>)`; the rest as is."""
    meta, torch_dtype = manifest(src, DEEPSPEED_FORMAT, dtype), DTYPES[dtype]
    meta["expert_module"] = DEEPSPEED_EXPERT_MODULE[src.spec.ffn_kind]
    for entry in meta["layers"]:  # the layer table names every file, in every file's manifest
        entry["file"] = f"moe_layer_{entry['layer']:03d}.safetensors"
    files = []
    moe_prefixes = [src.ffn_prefix(layer) + "." for layer in src.config.moe_layers]
    rest = [n for n in src.names() if not n.startswith(tuple(moe_prefixes))]
    files.append(_write_file(tmp, DEEPSPEED_NON_MOE, [_entry(src, n, torch_dtype) for n in rest], meta, on_tensor))
    for entry, layer, E in zip(meta["layers"], src.config.moe_layers, src.config.num_experts):
        prefix = src.ffn_prefix(layer) + "."
        plan = [_entry(src, prefix + "router.weight", torch_dtype, out_name=DEEPSPEED_ROUTER)]
        for j in range(E):
            for ours, (key, transposed) in src.spec.expert_keys.items():
                plan.append(_entry(src, f"{prefix}experts.{ours}", torch_dtype, rows=(j, j + 1),
                                   out_name=deepspeed_expert_key(j, key),
                                   transform=(lambda t: t[0].t()) if transposed else (lambda t: t[0])))
        plan += [_entry(src, n, torch_dtype, out_name=n.removeprefix(prefix)) for n in src.names()
                 if n.startswith(prefix + "mlp.") or n.startswith(prefix + "coefficient.")]
        files.append(_write_file(tmp, entry["file"], plan, meta, on_tensor))
    (tmp / "manifest.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return files + ["manifest.json"]


FORMATS: dict[str, Callable[..., list[str]]] = {
    "safetensors": export_safetensors,
    "hf": export_hf,
    "deepspeed": export_deepspeed,
}


@dataclass
class ExportResult:
    format: str
    out: str
    dtype: str
    ep_size: int
    files: list[str]
    bytes: int  # of the weight files (as `inspect` counts size on disk)
    tokenizer_files: list[str] = field(default_factory=list)


def count_tensors(src: Source, fmt: str, ep_size: int = 1) -> int:
    """How many `on_tensor` calls an export makes (for a progress bar)."""
    if fmt == "hf":
        return 1
    n_experts = len(_expert_names(src))
    if fmt == "deepspeed":
        per_expert = len(src.spec.expert_keys)
        return len(src.names()) - n_experts + sum(E * per_expert for E in src.config.num_experts)
    return len(src.names()) + (n_experts * (ep_size - 1) if ep_size > 1 else 0)


def stored_dtype(src: Source) -> str:
    """The name (`io.DTYPES`) of the dtype the model's floating-point weights are stored in; fp32 for others."""
    names = {v: k for k, v in DTYPES.items()}
    stored = next((d for d in map(src.reader.dtype, src.reader.keys()) if d.is_floating_point), torch.float32)
    return names.get(stored, "fp32")


def run_export(job: ExportJob, *, overwrite: bool = False, src: Source | None = None,
               on_tensor: Callable[[str], None] = lambda name: None) -> ExportResult:
    """Write `job.model` (our PR-MoE directory, or `src` already opened from it) to `job.output` in
    `job.format` and `job.dtype` ("auto": the dtype its weights are stored in); the output appears only
    when complete."""
    src = src or open_source(job.model)
    dtype = stored_dtype(src) if job.dtype == "auto" else job.dtype
    with atomic_output_dir(job.output, overwrite, inputs=[job.model]) as tmp:
        files = FORMATS[job.format](src, tmp, dtype=dtype, ep_size=job.ep_size, max_shard_size=job.max_shard_size,
                                    on_tensor=on_tensor)
        tokenizer_files = copy_tokenizer_files(src.path, tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir() if p.suffix in WEIGHT_SUFFIXES)  # weight files only
    files = [f for f in files if f not in tokenizer_files]  # hf's save_pretrained also writes generation_config.json
    return ExportResult(job.format, job.output, dtype, job.ep_size, files, size, tokenizer_files)


def export(model: str | Path, out: str | Path, fmt: str = "safetensors", dtype: str = "auto", ep_size: int = 1,
           overwrite: bool = False, max_shard_size: str | None = None, src: Source | None = None,
           on_tensor: Callable[[str], None] = lambda name: None) -> ExportResult:
    """`run_export` with `ExportJob`'s fields as arguments: `export("runs/student", "out", dtype="bf16")`."""
    return run_export(ExportJob(str(model), str(out), fmt, dtype, ep_size, max_shard_size), overwrite=overwrite,
                      src=src, on_tensor=on_tensor)

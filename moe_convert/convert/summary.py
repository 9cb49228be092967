"""`inspect`: the layer table, total and active parameters, dtype and size of a model, from its
config alone.

The model is built on the meta device (shapes, no storage), so a paper-sized config answers in
well under a second and the counts come from the very modules training would build, not from a
formula that could drift from them. Parameters are counted once each (tied embeddings once).
Active parameters per token = total minus, in every MoE layer, the experts a token does not
reach: `(E - top_k) * params_per_expert`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MoEConvertError, one_line
from ..formats import SHARED_FILE, SINGLE_FILE, config_from_manifest, export_manifest, export_weight_files


@dataclass
class LayerRow:
    index: int
    ffn: str  # "dense", "MoE" or "PR-MoE" (residual)
    experts: int  # 0 for a dense layer
    params: int
    active_params: int
    expert_params: int = 0  # of all its experts together (what expert parallelism splits)


@dataclass
class ModelSummary:
    model_type: str  # "prmoe" or the dense host's type
    host: str
    layers: list[LayerRow]
    top_k: int
    total_params: int
    active_params: int
    dtype: str  # of the weights on disk when there are any, else the config's
    size_on_disk: int | None  # bytes of weight files; None for a config alone
    export: str | None = None  # for a `moe-convert export` directory: its format, version and ep size

    def to_dict(self) -> dict:
        return asdict(self)


def fmt(value, spec: str) -> str:
    """`value` formatted with `spec`, or "-" when there is none (tables of optional numbers)."""
    return "-" if value is None else format(value, spec)


def load_config(path: str | Path):
    """A model directory's config.json, or a config .json file itself, as a transformers config."""
    import moe_convert  # noqa: F401  registers PRMoEConfig
    from huggingface_hub.errors import StrictDataclassError  # transformers' typed config fields raise it
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        from ..io import unfinished_run_hint

        export = path.is_dir() and any((path / f).is_file() for f in (SINGLE_FILE, SHARED_FILE))
        raise MoEConvertError(f"{path} is not a model directory (no config.json) nor a config .json file"
                              + ("; it looks like a `moe-convert export` output, which `generate` runs" if export else "")
                              + unfinished_run_hint(path))
    try:
        d = json.loads(file.read_text())
        if not isinstance(d, dict) or "model_type" not in d:
            raise ValueError("no model_type")
        from transformers import CONFIG_MAPPING

        if d["model_type"] not in CONFIG_MAPPING:
            raise ValueError(f"model_type {d['model_type']!r} is not known to transformers")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    except (json.JSONDecodeError, ValueError, TypeError, StrictDataclassError) as e:  # the last: a field's type
        raise MoEConvertError(f"{file} is not a model config ({one_line(e)})") from None


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize_config(config) -> ModelSummary:
    """Build the model on the meta device and count its parameters layer by layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.modeling import PRMoEForCausalLM, host_spec
    from ..model.moe import PRMoELayer

    text = config.get_text_config()
    spec = host_spec(text.model_type)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError:  # a wrapper of a supported host, e.g. a vision-language model around Llama
        raise MoEConvertError(f"model_type {config.model_type!r} is not a causal LM transformers builds with "
                              f"AutoModelForCausalLM (its text model is {text.model_type!r}); give a causal LM") from None
    prefix = "host." if isinstance(model, PRMoEForCausalLM) else ""
    top_k = getattr(config, "num_experts_per_tok", 1) if prefix else 1
    rows = []
    for i, layer in enumerate(model.get_submodule(prefix + spec.layers)):
        ffn = getattr(layer, spec.ffn_attr)
        params = _count(layer)
        if isinstance(ffn, PRMoELayer):
            E, experts = ffn.experts.num_experts, _count(ffn.experts)
            inactive = (E - top_k) * experts // E
            rows.append(LayerRow(i, "PR-MoE" if ffn.residual else "MoE", E, params, params - inactive, experts))
        else:
            rows.append(LayerRow(i, "dense", 0, params, params))
    total = _count(model)
    inactive = sum(r.params - r.active_params for r in rows)
    dtype = str(getattr(text, "dtype", None) or getattr(config, "dtype", None) or "float32").replace("torch.", "")
    return ModelSummary(config.model_type, text.model_type, rows, top_k, total, total - inactive, dtype, None)


def _safetensors_dtypes(file: Path) -> set[str]:
    """The dtype codes ("F32", "BF16", ...) in a safetensors file, from its header alone."""
    from ..io import open_safetensors

    handle = open_safetensors(file)
    return {handle.get_slice(k).get_dtype() for k in handle.keys()}


def summarize(path: str | Path) -> ModelSummary:
    """`inspect MODEL`: config-only counts plus what the weight files on disk say (size, dtype); an export
    directory is summarized from its manifest."""
    path = Path(path)
    manifest = export_manifest(path)
    summary = summarize_config(config_from_manifest(manifest) if manifest else load_config(path))
    from ..io import model_weight_files

    export_files = export_weight_files(manifest) if manifest else None
    if manifest:
        missing = [f for f in export_files if not (path / f).is_file()]
        if missing:
            raise MoEConvertError(f"{path}: incomplete export, {', '.join(missing)} missing")
        summary.export = f"{manifest['format']} v{manifest['version']}, ep size {manifest.get('ep_size', 1)}"
    if path.is_dir():
        files = [path / f for f in export_files] if manifest else model_weight_files(path)
        if files:
            summary.size_on_disk = sum(f.stat().st_size for f in files)
            dtypes = set().union(*(_safetensors_dtypes(f) for f in files if f.suffix == ".safetensors"))
            if dtypes:
                from ..io import TORCH_DTYPES

                summary.dtype = ",".join(sorted(str(TORCH_DTYPES[d]).removeprefix("torch.") if d in TORCH_DTYPES
                                                else d.lower() for d in dtypes))
    return summary

"""The export formats' shared vocabulary: file names, manifest keys, format names and versions, and the
manifest readers that `convert/` (export, from-deepspeed, inspect) and `inference/` (generate) share.

- `safetensors` (format `moe-convert-inference`): `model.safetensors`, or with `ep_size=N` the experts
  of rank r in `experts-0000r-of-0000N.safetensors` and everything else in `shared.safetensors`; the
  manifest (format name + version, layer table, top-k, activation, dtype, host config) sits in every
  file's safetensors metadata under `MANIFEST_KEY`.
- `deepspeed` (format `moe-convert-deepspeed`): per MoE layer a `deepspeed.moe.layer.MoE` state dict,
  the non-MoE weights in `non_moe.safetensors`, and `manifest.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MoEConvertError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")  # weight files, as opposed to config and tokenizer files
FORMAT_NAME = "moe-convert-inference"
FORMAT_VERSION = 1
MANIFEST_KEY = "moe_convert_manifest"  # safetensors __metadata__ key holding the manifest JSON
SINGLE_FILE = "model.safetensors"
SHARED_FILE = "shared.safetensors"
DEEPSPEED_FORMAT = "moe-convert-deepspeed"
DEEPSPEED_NON_MOE = "non_moe.safetensors"
DEEPSPEED_ROUTER = "deepspeed_moe.gate.wg.weight"  # names inside `deepspeed.moe.layer.MoE`'s state dict


def deepspeed_expert_key(j: int, key: str) -> str:
    """Expert j's tensor `key` (its expert module's own name, e.g. `c_fc.weight`) in DeepSpeed's MoE."""
    return f"deepspeed_moe.experts.deepspeed_experts.{j}.{key}"


def experts_file(rank: int, ep_size: int) -> str:
    return f"experts-{rank:05d}-of-{ep_size:05d}.safetensors"


def export_weight_files(manifest: dict) -> list[str]:
    """The weight files an export with this manifest consists of (safetensors or deepspeed format)."""
    if manifest["format"] == FORMAT_NAME:
        ep = manifest["ep_size"]
        return [SINGLE_FILE] if ep == 1 else [SHARED_FILE] + [experts_file(r, ep) for r in range(ep)]
    return [DEEPSPEED_NON_MOE] + [entry["file"] for entry in manifest["layers"]]


def read_manifest(path: str | Path) -> dict:
    """The manifest of an export directory, checked for our format name and a version we can read."""
    from .io import open_safetensors  # here: this module stays light (no torch) for the CLI

    path = Path(path)
    if not path.is_dir():
        raise MoEConvertError(f"{path} is not a directory")
    first = path / SINGLE_FILE if (path / SINGLE_FILE).exists() else path / SHARED_FILE
    if not first.exists():
        raise MoEConvertError(f"{path} is not a moe-convert export (no {SINGLE_FILE} or {SHARED_FILE}); "
                              f"make one with `moe-convert export MODEL --format safetensors`")
    meta = open_safetensors(first).metadata() or {}
    if MANIFEST_KEY not in meta:
        raise MoEConvertError(f"{first} has no moe-convert manifest: not a `--format safetensors` export (make one "
                              f"with `moe-convert export {path} -o OUT`)")
    manifest = json.loads(meta[MANIFEST_KEY])
    if manifest.get("format") != FORMAT_NAME or manifest.get("version", 0) > FORMAT_VERSION:
        raise MoEConvertError(f"{first}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                              f"{FORMAT_NAME} v<={FORMAT_VERSION}")
    return manifest


def read_deepspeed_manifest(path: Path) -> dict:
    """The manifest of an `export --format deepspeed` directory; anything else is a one-line error."""
    from .io import DTYPES

    file = path / "manifest.json"
    if not file.is_file():
        raise MoEConvertError(f"{path} is not a `moe-convert export --format deepspeed` directory (no manifest.json)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MoEConvertError(f"{file}: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DEEPSPEED_FORMAT:
        raise MoEConvertError(f"{file}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                              f"is not {DEEPSPEED_FORMAT}")
    layers = manifest.get("layers")
    types = {"layer": int, "prefix": str, "experts": int, "file": str}
    if (not isinstance(manifest.get("host_config"), dict) or manifest.get("dtype") not in DTYPES
            or not isinstance(layers, list)
            or not all(isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in types.items()) for e in layers)):
        raise MoEConvertError(f"{file}: incomplete or damaged manifest (it needs host_config, a dtype of "
                              f"{', '.join(DTYPES)}, and layers with layer, prefix, experts and file)")
    return manifest


def export_manifest(path: Path) -> dict | None:
    """The manifest of a `moe-convert export` directory (safetensors or deepspeed format, read and checked
    as `generate` and `from-deepspeed` read them), else None."""
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    if (path / "manifest.json").is_file():
        return read_deepspeed_manifest(path)
    if any((path / f).is_file() for f in (SINGLE_FILE, SHARED_FILE)):
        return read_manifest(path)
    return None


def config_from_manifest(m: dict):
    """The PR-MoE config an export was made from, rebuilt from its manifest (host config + layer table)."""
    from .model.configuration_prmoe import PRMoEConfig

    return PRMoEConfig(text_config=m["host_config"], moe_layers=[e["layer"] for e in m["layers"]],
                       num_experts=[e["experts"] for e in m["layers"]], num_experts_per_tok=m["top_k"],
                       residual=m["residual"], capacity_factor=m["capacity_factor"], min_capacity=m["min_capacity"],
                       aux_loss_coef=m.get("aux_loss_coef", 0.01))  # older manifests lack it: the default

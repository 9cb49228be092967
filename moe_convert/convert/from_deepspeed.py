"""`moe-convert from-deepspeed`: an `export --format deepspeed` directory -> our PR-MoE model directory.

The way back after training in DeepSpeed: each `moe_layer_LLL.safetensors` is
the state dict of a `deepspeed.moe.layer.MoE(..., use_residual=<the model's residual>)` (the layer file a DeepSpeed user
saved again after training), `non_moe.safetensors` holds the other weights under the host's names,
and `manifest.json` the host config and layer table. The experts are stacked back into our
`[E, in, out]` tensors (nn.Linear experts transposed), one output tensor at a time, and written with
the modeling code and tokenizer as `upcycle` writes a model: `export`, `train`, `generate` read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import MoEConvertError
from ..formats import (DEEPSPEED_FORMAT, DEEPSPEED_NON_MOE, DEEPSPEED_ROUTER, deepspeed_expert_key,
                       read_deepspeed_manifest, config_from_manifest)
from ..io import DTYPES, ShardWriter, atomic_output_dir, open_safetensors, write_model_files
from ..options import parse_size
from .config import FromDeepSpeedJob


@dataclass
class ImportResult:
    output: str
    source: str
    moe_layers: list[int]
    experts_per_layer: list[int]
    dtype: str
    files: list[str]
    bytes: int  # of the weight files


class _DeepSpeedTensors:
    """Our checkpoint's tensors, each read from the DeepSpeed layout when asked for."""

    def __init__(self, path: Path, manifest: dict, spec):
        self.path, self.spec = path, spec
        self.layers = {entry["prefix"] + ".": entry for entry in manifest["layers"]}
        self.handles: dict[str, object] = {}
        self.read: dict[str, set[str]] = {}  # file -> keys taken from it

    def _read(self, file: str, key: str) -> torch.Tensor:
        if file not in self.handles:
            self.handles[file] = open_safetensors(self.path / file)
        self.read.setdefault(file, set()).add(key)
        try:
            return self.handles[file].get_tensor(key)
        except Exception:  # safetensors: no such tensor
            raise MoEConvertError(f"{self.path / file} has no tensor {key}") from None

    def check_all_read(self) -> None:
        """Every tensor of every file went into the model: more experts than the manifest lists, say, is an error."""
        for file, handle in self.handles.items():
            extra = sorted(set(handle.keys()) - self.read[file])
            if extra:
                raise MoEConvertError(f"{self.path / file} holds {len(extra)} tensor(s) the manifest's model has no "
                                      f"place for, e.g. {extra[0]}")

    def tensor(self, name: str) -> torch.Tensor:
        """Our tensor `name` (`host.` + the host's name)."""
        native = name.removeprefix("host.")
        prefix = next((p for p in self.layers if native.startswith(p)), None)
        if prefix is None:
            return self._read(DEEPSPEED_NON_MOE, native)
        entry, rest = self.layers[prefix], native[len(prefix):]
        if rest == "router.weight":
            return self._read(entry["file"], DEEPSPEED_ROUTER)
        if rest.startswith("experts."):
            key, transposed = self.spec.expert_keys[rest.removeprefix("experts.")]
            parts = [self._read(entry["file"], deepspeed_expert_key(j, key)) for j in range(entry["experts"])]
            parts = [p.t() if transposed else p for p in parts]
            if any(p.shape != parts[0].shape for p in parts):
                raise MoEConvertError(f"{self.path / entry['file']}: the experts' {key} tensors differ in shape "
                                      f"({', '.join(sorted({str(tuple(p.shape)) for p in parts}))})")
            return torch.stack(parts)  # [E, in, out]
        return self._read(entry["file"], rest)  # the residual FFN (mlp.*) and coefficient.*


def run_from_deepspeed(job: FromDeepSpeedJob, *, overwrite: bool = False, on_tensor=lambda name: None) -> ImportResult:
    """Rebuild our model directory from an `export --format deepspeed` directory (possibly trained since).

    `job.dtype` ("auto": the manifest's, as exported) is what the model is written in: tensors saved in
    another precision since (a DeepSpeed run in bf16 saving its layers) are cast to it.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..model.modeling import PRMoEForCausalLM, host_spec

    path = Path(job.source)
    manifest = read_deepspeed_manifest(path)
    try:
        config = config_from_manifest(manifest)
    except (KeyError, TypeError, ValueError) as e:  # a manifest edited by hand: wrong types or values
        raise MoEConvertError(f"{path / 'manifest.json'}: cannot rebuild the model's config: {e}") from None
    config.provenance = {"source": str(path.resolve()), "from": DEEPSPEED_FORMAT, "tool": f"moe-convert {__version__}"}
    config.architectures = [PRMoEForCausalLM.__name__]
    with torch.device("meta"):
        meta = PRMoEForCausalLM(config)
    saved = remove_tied_weights_from_state_dict(meta.state_dict(), meta)  # what save_pretrained writes
    source = _DeepSpeedTensors(path, manifest, host_spec(config.text_config.model_type))
    dtype = DTYPES[manifest["dtype"] if job.dtype == "auto" else job.dtype]
    config.dtype = config.text_config.dtype = str(dtype).removeprefix("torch.")
    plan = [(name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for name, t in saved.items()]

    with atomic_output_dir(job.output, overwrite, inputs=[path]) as tmp:
        writer = ShardWriter(tmp, parse_size(job.max_shard_size),
                             metadata={"producer": f"moe-convert {__version__} from-deepspeed"})
        writer.begin(plan)
        try:
            for name, shape, want in plan:
                t = source.tensor(name)
                if tuple(t.shape) != shape or t.is_floating_point() != want.is_floating_point:
                    raise MoEConvertError(f"{name}: the DeepSpeed files hold {tuple(t.shape)} {t.dtype}, the "
                                          f"manifest's model needs {shape} {want}")
                writer.write(name, t.to(want))
                on_tensor(name)
            source.check_all_read()
            files = writer.finish()
        finally:
            writer.close()
        write_model_files(meta, config, tmp, path)
        size = sum((tmp / f).stat().st_size for f in files)
    return ImportResult(job.output, str(path), list(config.moe_layers), list(config.num_experts),
                        str(dtype).removeprefix("torch."), files, size)


def import_deepspeed(path: str | Path, output: str | Path, overwrite: bool = False, max_shard_size: str = "5GB",
                     dtype: str = "auto", on_tensor=lambda name: None) -> ImportResult:
    """`run_from_deepspeed` with `FromDeepSpeedJob`'s fields as arguments: `import_deepspeed("ds", "back")`."""
    return run_from_deepspeed(FromDeepSpeedJob(str(path), str(output), max_shard_size, dtype), overwrite=overwrite,
                              on_tensor=on_tensor)

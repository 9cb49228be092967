"""Typed, validated options of `upcycle`, `export` and `from-deepspeed`: one dataclass per command, also
one recipe step's fields (`pipeline/recipe.py`).

Pure Python (no torch) so the CLI and recipe validation can use them before anything heavy loads.
Fields with help metadata are the command's --options; the paths before them are its arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MoEConvertError
from ..model.layout import check_layout_options, parse_int_list
from ..options import check_dtype_choice, check_seed, check_types, option, parse_size

INIT_MODES = ("preserve", "copy", "noise:SIGMA", "drop:RATE")
EXPORT_FORMATS = ("safetensors", "hf", "deepspeed")  # the keys of `export.FORMATS`


@dataclass(frozen=True)
class InitSpec:
    """`--init`: preserve | copy | noise:SIGMA | drop:RATE."""

    mode: str
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "InitSpec":
        mode, _, arg = text.partition(":")
        if mode in ("preserve", "copy") and not arg:
            return cls(mode)
        if mode in ("noise", "drop") and arg:
            try:
                value = float(arg)
            except ValueError:
                value = float("nan")
            if mode == "noise" and 0 < value < math.inf or mode == "drop" and 0 < value <= 1:
                return cls(mode, value)
            allowed = "a finite SIGMA > 0" if mode == "noise" else "0 < RATE <= 1"
            raise MoEConvertError(f"init: {text!r} needs {allowed}")
        raise MoEConvertError(f"init: expected one of {', '.join(INIT_MODES)}, got {text!r}")

    def __str__(self) -> str:
        return self.mode if self.mode in ("preserve", "copy") else f"{self.mode}:{self.value:g}"


@dataclass
class UpcycleJob:
    """One `upcycle`: a dense checkpoint (`source`: a local directory or a hub id) -> a PR-MoE directory."""

    KIND = "upcycle"

    source: str
    output: str
    pyramid: str | None = option(None, "Experts per pyramid stage, e.g. 32,64: the last two MoE layers get the last "
                                       "count (paper rule; one layer when each stage needs its own). Default: 8 "
                                       "experts everywhere unless --experts is given.")
    pyramid_split: str | None = option(None, "MoE layers per --pyramid stage, e.g. 8,4 (must add up to the MoE layer "
                                             "count). Default: the paper rule.")
    experts: str | None = option(None, "One expert count per MoE layer, e.g. 32,32,64 (instead of --pyramid). "
                                       "Default: none.")
    moe_every: int = option(2, "MoE on every K-th layer: 0-based layers K-1, 2K-1, ... Default: 2 (layers 1, 3, 5, ...).")
    top_k: int = option(1, "Experts per token (top-1 combines with the raw probability, top-k>1 renormalises).")
    residual: bool = option(True, "PR-MoE residual dense FFN beside the experts. Default: on.")
    capacity_factor: float | None = option(None, "Expert capacity factor; overflow tokens skip the experts. "
                                                 "Default: dropless.")
    aux_loss_coef: float = option(0.01, "Load-balancing loss weight for later training.")
    init: str = option("preserve", "Expert init: preserve (function-preserving: upcycled logits = dense), copy "
                                   "(DeepSpeed: experts = dense FFN), noise:SIGMA, drop:RATE (Drop-Upcycling).")
    seed: int = option(0, "Seed for routers, noise and dropped units; same inputs + seed give byte-identical files.")
    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB, 500MB, 2GiB.")
    dtype: str = option("auto", "Output dtype: auto (the source's), fp32, bf16, fp16.")
    fidelity: bool = option(True, "Load both models and measure max |dlogits|, KL and expert spread on a fixed sample "
                                  "(skipped automatically when the upcycled model needs over half the free RAM). It "
                                  "holds the upcycled model in memory: --no-fidelity keeps upcycle within the dense "
                                  "model's memory. Default: on.")

    def __post_init__(self):
        check_types(self)
        InitSpec.parse(self.init)
        for name in ("pyramid", "pyramid_split", "experts"):  # one spelling, "32,64", however they were given
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, ",".join(map(str, parse_int_list(value, name))))
        check_layout_options(self.pyramid, self.pyramid_split, self.experts)
        check_seed(self.seed)
        parse_size(self.max_shard_size)
        check_dtype_choice(self.dtype)


@dataclass
class ExportJob:
    """One `export`: our PR-MoE model directory -> an inference layout, an HF directory or DeepSpeed state dicts."""

    KIND = "export"

    model: str
    output: str
    format: str = option("safetensors", "safetensors (inference layout + manifest, read by `generate`), hf (our model "
                                        "directory), deepspeed (per-layer DeepSpeed MoE state dicts).")
    dtype: str = option("auto", "Weight dtype: auto (as the model's weights are stored), fp32, bf16, fp16.")
    ep_size: int = option(1, "Expert-parallel ranks: one experts file per rank (contiguous expert ranges) plus "
                             "shared.safetensors; must divide every layer's expert count (safetensors only).")
    max_shard_size: str | None = option(None, "Largest shard for --format hf, e.g. 5GB, 500MB. Default: 5GB.")

    def __post_init__(self):
        check_types(self)
        if self.format not in EXPORT_FORMATS:
            raise MoEConvertError(f"--format {self.format!r} is not known; choose one of {', '.join(EXPORT_FORMATS)}")
        check_dtype_choice(self.dtype)
        if self.ep_size < 1:
            raise MoEConvertError(f"--ep-size must be >= 1, got {self.ep_size}")
        if self.ep_size > 1 and self.format != "safetensors":
            raise MoEConvertError(f"--ep-size applies to --format safetensors only, not {self.format}")
        if self.max_shard_size is not None:
            if self.format != "hf":
                raise MoEConvertError(f"--max-shard-size applies to --format hf only, not {self.format}")
            parse_size(self.max_shard_size)


@dataclass
class FromDeepSpeedJob:
    """One `from-deepspeed`: an `export --format deepspeed` directory (`source`) -> our model directory again."""

    KIND = "from-deepspeed"

    source: str
    output: str
    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB, 500MB.")
    dtype: str = option("auto", "Precision of the model written: auto (as exported, the manifest's) | fp32 | bf16 | "
                                "fp16. Layers saved in another precision since (a bf16 DeepSpeed run) are cast to it.")

    def __post_init__(self):
        check_types(self)
        parse_size(self.max_shard_size)
        check_dtype_choice(self.dtype)

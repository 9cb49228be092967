"""The MoE layout of a model and the parsing of its layout options (pyramid, expert counts, capacity).

Pure Python (no torch) so the CLI and recipe validation can use it before anything heavy loads.
Every check raises `MoEConvertError` naming the field and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import MoEConvertError

MAX_EXPERTS = 1_000_000  # per MoE layer: far past any model, and before torch's integer sizes overflow


@dataclass
class MoELayout:
    """Which layers are MoE and how they route (PR-MoE: DeepSpeed-MoE, arXiv 2201.05596).

    `moe_layers` are 0-based decoder-layer indices; `num_experts[i]` is the expert count of
    `moe_layers[i]`. `capacity_factor=None` means dropless (every token reaches its expert).
    """

    num_layers: int
    moe_layers: list[int]
    num_experts: list[int]
    top_k: int = 1
    residual: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    aux_loss_coef: float = 0.01

    def __post_init__(self):
        if self.num_layers < 1:
            raise MoEConvertError(f"num_layers: must be >= 1, got {self.num_layers}")
        if len(self.moe_layers) != len(self.num_experts):
            raise MoEConvertError(
                f"num_experts: needs one count per MoE layer ({len(self.moe_layers)} MoE layers), "
                f"got {len(self.num_experts)}"
            )
        if len(set(self.moe_layers)) != len(self.moe_layers) or sorted(self.moe_layers) != list(self.moe_layers):
            raise MoEConvertError(f"moe_layers: must be strictly increasing layer indices, got {self.moe_layers}")
        for layer in self.moe_layers:
            if not 0 <= layer < self.num_layers:
                raise MoEConvertError(
                    f"moe_layers: layer {layer} is out of range for a {self.num_layers}-layer model "
                    f"(allowed 0..{self.num_layers - 1})"
                )
        for layer, e in zip(self.moe_layers, self.num_experts):
            if not 1 <= e <= MAX_EXPERTS:
                raise MoEConvertError(f"num_experts: every MoE layer needs 1 to {MAX_EXPERTS:,} experts, got {e} "
                                      f"at layer {layer}")
        if self.num_experts and not 1 <= self.top_k <= min(self.num_experts):
            raise MoEConvertError(
                f"top_k: must be between 1 and the smallest expert count ({min(self.num_experts)}), got {self.top_k}"
            )
        if self.capacity_factor is not None and not 0 < self.capacity_factor < math.inf:
            raise MoEConvertError(f"capacity_factor: must be a finite number > 0 (or unset for dropless), "
                                  f"got {self.capacity_factor}")
        if self.min_capacity < 0:
            raise MoEConvertError(f"min_capacity: must be >= 0, got {self.min_capacity}")
        if not 0 <= self.aux_loss_coef < math.inf:
            raise MoEConvertError(f"aux_loss_coef: must be a finite number >= 0, got {self.aux_loss_coef}")

    def to_dict(self) -> dict:
        return asdict(self)


def moe_layer_indices(num_layers: int, moe_every: int = 2) -> list[int]:
    """MoE on every `moe_every`-th layer, 0-based 1, 3, 5, ... for 2 (Megatron-DeepSpeed `--expert-interval`)."""
    if moe_every < 1:
        raise MoEConvertError(f"moe_every: must be >= 1, got {moe_every}")
    if moe_every > num_layers:
        raise MoEConvertError(f"moe_every: {moe_every} leaves no MoE layer in a {num_layers}-layer model")
    return [i for i in range(num_layers) if (i + 1) % moe_every == 0]


def parse_int_list(text: str | list[int], name: str) -> list[int]:
    """'32,64' -> [32, 64]; a list passes through. The error names the option."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t.strip() for t in str(text).split(",")]
    out = []
    for item in items:
        try:
            out.append(int(item))
        except (TypeError, ValueError):
            raise MoEConvertError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise MoEConvertError(f"{name}: expected at least one integer")
    return out


def pyramid_counts(n_moe: int, stages: list[int], split: list[int] | None = None) -> list[int]:
    """Expert count per MoE layer for a pyramid `A,B[,C...]`.

    Paper rule (350M: 10x32 + 2x64): the last stage gets the last two MoE layers (one, when every
    stage needs a layer of its own), the earlier stages share the rest evenly (earlier stages take
    any remainder). `split` overrides how many
    MoE layers each stage gets and must add up to the MoE layer count.
    """
    if any(s < 1 for s in stages):
        raise MoEConvertError(f"pyramid: every stage needs >= 1 expert, got {','.join(map(str, stages))}")
    if len(stages) > n_moe:
        raise MoEConvertError(f"pyramid: {len(stages)} stages but the model has only {n_moe} MoE layers")
    if split is None:
        if len(stages) == 1:
            split = [n_moe]
        else:
            last = min(2, n_moe - (len(stages) - 1))
            rest, early = n_moe - last, len(stages) - 1
            split = [rest // early + (1 if i < rest % early else 0) for i in range(early)] + [last]
    if len(split) != len(stages):
        raise MoEConvertError(f"pyramid_split: needs one entry per stage ({len(stages)}), got {len(split)}")
    if any(s < 1 for s in split) or sum(split) != n_moe:
        raise MoEConvertError(f"pyramid_split: entries must be >= 1 and add up to the {n_moe} MoE layers, got {split}")
    return [count for count, n in zip(stages, split) for _ in range(n)]


DEFAULT_PYRAMID = [8]  # experts in every MoE layer when neither --pyramid nor --experts is given


def check_layout_options(pyramid, pyramid_split, experts) -> None:
    """The layout options that go together (also checked by a recipe's upcycle step, before any config)."""
    if pyramid is not None and experts is not None:
        raise MoEConvertError("layout: give --pyramid or --experts, not both (neither: 8 experts per MoE layer)")
    if pyramid_split is not None and pyramid is None:
        raise MoEConvertError("layout: --pyramid-split divides the stages of --pyramid; give --pyramid too")


def build_layout(
    num_layers: int,
    *,
    moe_every: int = 2,
    pyramid: str | list[int] | None = None,
    pyramid_split: str | list[int] | None = None,
    experts: str | list[int] | None = None,
    top_k: int = 1,
    residual: bool = True,
    capacity_factor: float | None = None,
    min_capacity: int = 4,
    aux_loss_coef: float = 0.01,
) -> MoELayout:
    """The layout the `--pyramid` / `--experts` / `--moe-every` options describe (neither: 8 experts per MoE layer)."""
    moe_layers = moe_layer_indices(num_layers, moe_every)
    check_layout_options(pyramid, pyramid_split, experts)
    if pyramid is None and experts is None:
        pyramid = DEFAULT_PYRAMID
    if experts is not None:
        counts = parse_int_list(experts, "experts")
        if len(counts) != len(moe_layers):
            raise MoEConvertError(
                f"experts: needs one count per MoE layer ({len(moe_layers)} MoE layers at {moe_layers}), got {len(counts)}"
            )
    else:
        stages = parse_int_list(pyramid, "pyramid")
        split = parse_int_list(pyramid_split, "pyramid_split") if pyramid_split is not None else None
        counts = pyramid_counts(len(moe_layers), stages, split)
    return MoELayout(
        num_layers=num_layers,
        moe_layers=moe_layers,
        num_experts=counts,
        top_k=top_k,
        residual=residual,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        aux_loss_coef=aux_loss_coef,
    )


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity: ceil(k * T / E * cf), at least `min_capacity` (top-2 doubles, as in top2gating)."""
    return max(math.ceil(top_k * num_tokens / num_experts * capacity_factor), min_capacity)

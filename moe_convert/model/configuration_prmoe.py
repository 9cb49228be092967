"""`PRMoEConfig`: a host causal-LM config (`text_config`) plus the PR-MoE layout.

The host config is stored as `text_config` so transformers' generation and cache utilities find
it with `get_text_config()`. This file is copied next to saved checkpoints, so that they load in
plain transformers with `trust_remote_code=True`: it may import only transformers, torch and
sibling modules.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .layout import MoELayout


class PRMoEConfig(PreTrainedConfig):
    """Host model config + which layers are PR-MoE layers, their expert counts and routing."""

    model_type = "prmoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PreTrainedConfig | None = None
    moe_layers: list[int] | None = None
    num_experts: list[int] | None = None
    num_experts_per_tok: int = 1  # router top-k (named as transformers' MoE configs name it)
    residual: bool = True
    capacity_factor: float | None = None
    min_capacity: int = 4
    aux_loss_coef: float = 0.01
    provenance: dict | None = None  # source model, init mode, seed, tool version

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.moe_layers = list(self.moe_layers or [])
        self.num_experts = list(self.num_experts or [])
        self.provenance = dict(self.provenance or {})
        self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        self.layout  # validate now: a bad value fails here, naming the field

    @property
    def layout(self) -> MoELayout:
        return MoELayout(
            num_layers=self.text_config.num_hidden_layers,
            moe_layers=self.moe_layers,
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            residual=self.residual,
            capacity_factor=self.capacity_factor,
            min_capacity=self.min_capacity,
            aux_loss_coef=self.aux_loss_coef,
        )

    @classmethod
    def from_layout(cls, host_config: PreTrainedConfig, layout: MoELayout, provenance: dict | None = None,
                    **kwargs) -> "PRMoEConfig":
        if layout.num_layers != host_config.num_hidden_layers:
            raise ValueError(f"layout is for {layout.num_layers} layers, host has {host_config.num_hidden_layers}")
        fields = layout.to_dict()
        fields.pop("num_layers")
        fields["num_experts_per_tok"] = fields.pop("top_k")
        return cls(text_config=host_config, provenance=provenance, **fields, **kwargs)


if __name__.startswith("moe_convert."):  # the installed package; a trust_remote_code copy is resolved by transformers
    AutoConfig.register(PRMoEConfig.model_type, PRMoEConfig, exist_ok=True)

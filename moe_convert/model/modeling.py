"""`PRMoEForCausalLM`: a host causal LM whose FFN in the chosen layers is a PR-MoE layer.

Host adapters are data: where the decoder layers live, which FFN kind the host uses, and how the
host FFN's tensors map onto our stacked expert tensors. Adding a host is adding an entry to
`HOSTS`. Weight names are the host's own under `host.`; inside a MoE layer the FFN becomes
`router.weight [E, d]`, `experts.<w_*> [E, in, out]`, `mlp.<host FFN keys>` (residual dense FFN) and
`coefficient.{weight [2, d], bias [2]}`.

This file is copied next to saved checkpoints for `trust_remote_code=True`: it imports only
transformers, torch and sibling modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_prmoe import PRMoEConfig
from .errors import MoEConvertError
from .moe import Experts, PRMoELayer


@dataclass(frozen=True)
class HostSpec:
    """What we need to know about a dense host architecture."""

    causal_lm: str  # transformers class of the dense causal LM
    layers: str  # dotted path from the causal LM to its decoder-layer list
    ffn_kind: str  # "mlp" (GPT-2, biased, Conv1D) or "gated" (SwiGLU, no bias)
    # stacked expert tensor -> (key inside the host's FFN module, host stores it [out, in])
    expert_keys: dict[str, tuple[str, bool]]
    activation_attr: str  # config attribute naming the FFN activation
    inner_attr: str  # config attribute with the FFN inner size (None -> 4 * hidden)
    dropout_attr: str | None = None  # config attribute with the FFN output dropout
    ffn_attr: str = "mlp"  # attribute of the decoder layer holding the FFN
    final_norm: str = "model.norm"  # dotted path from the causal LM to the norm after the last decoder layer

    def inner_size(self, config) -> int:
        return getattr(config, self.inner_attr, None) or 4 * config.hidden_size


_GPT2_EXPERT_KEYS = {
    "w_in": ("c_fc.weight", False),  # Conv1D stores [in, out] already
    "b_in": ("c_fc.bias", False),
    "w_out": ("c_proj.weight", False),
    "b_out": ("c_proj.bias", False),
}
_GATED_EXPERT_KEYS = {
    "w_gate": ("gate_proj.weight", True),  # nn.Linear stores [out, in]
    "w_up": ("up_proj.weight", True),
    "w_out": ("down_proj.weight", True),
}


def _llama_family(causal_lm: str) -> HostSpec:
    return HostSpec(causal_lm, "model.layers", "gated", _GATED_EXPERT_KEYS, "hidden_act", "intermediate_size")


HOSTS: dict[str, HostSpec] = {
    "gpt2": HostSpec("GPT2LMHeadModel", "transformer.h", "mlp", _GPT2_EXPERT_KEYS, "activation_function", "n_inner",
                     "resid_pdrop", final_norm="transformer.ln_f"),
    "llama": _llama_family("LlamaForCausalLM"),
    "mistral": _llama_family("MistralForCausalLM"),
    "qwen2": _llama_family("Qwen2ForCausalLM"),
}


def host_spec(model_type: str) -> HostSpec:
    if model_type not in HOSTS:
        raise MoEConvertError(
            f"host architecture {model_type!r} is not supported; supported hosts: {', '.join(sorted(HOSTS))}"
        )
    return HOSTS[model_type]


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the module holding the decoder-layer list, the list's attribute name) of a host causal LM, or of a
    PR-MoE model's host, from the host table."""
    host = getattr(model, "host", model)  # PR-MoE wraps its host causal LM
    parent, _, name = host_spec(host.config.model_type).layers.rpartition(".")
    return host.get_submodule(parent), name


@dataclass
class PRMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` = `ce_loss` + aux_loss_coef * `aux_loss` when labels are given."""

    ce_loss: torch.FloatTensor | None = None


class PRMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PRMoEConfig
    base_model_prefix = "host"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    supports_gradient_checkpointing = True  # the host's decoder layers checkpoint; each MoE layer recomputes in them

    def __init__(self, config: PRMoEConfig):
        super().__init__(config)
        host = config.text_config
        spec = host_spec(host.model_type)
        self.host = getattr(transformers, spec.causal_lm)(host)
        decoder_layers = self.host.get_submodule(spec.layers)
        act = ACT2FN[getattr(host, spec.activation_attr)]
        dropout = getattr(host, spec.dropout_attr) if spec.dropout_attr else 0.0
        init_std = getattr(host, "initializer_range", 0.02)
        for idx, num_experts in zip(config.moe_layers, config.num_experts):
            layer = decoder_layers[idx]
            experts = Experts(spec.ffn_kind, num_experts, host.hidden_size, spec.inner_size(host), act, dropout,
                              init_std)
            dense = getattr(layer, spec.ffn_attr) if config.residual else None
            moe = PRMoELayer(host.hidden_size, experts, dense, config.num_experts_per_tok, config.capacity_factor,
                             config.min_capacity)
            torch.nn.init.normal_(moe.router.weight, std=init_std)
            if config.residual:
                torch.nn.init.normal_(moe.coefficient.weight, std=init_std)
                torch.nn.init.zeros_(moe.coefficient.bias)
            setattr(layer, spec.ffn_attr, moe)
        self.post_init()

    def moe_layers(self) -> list[PRMoELayer]:
        return [m for m in self.modules() if isinstance(m, PRMoELayer)]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Non-reentrant only: each MoE layer leaves its aux loss as a side output of the checkpointed
        forward, which reentrant checkpointing runs without autograd (the aux loss would lose its gradient).
        transformers routes its deprecated alias `gradient_checkpointing_enable` here too, and HF's
        Trainer calls this with `every_n_layers` / `offload`, passed on as they come."""
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        if checkpoint_kwargs.setdefault("use_reentrant", False):
            raise ValueError("PRMoEForCausalLM: use_reentrant=True would cut the MoE aux loss off its gradient; "
                             "use use_reentrant=False (the default here)")
        super().activation_checkpointing_enable(checkpoint_kwargs, **kwargs)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' load-balancing losses from the last forward (unweighted)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def get_input_embeddings(self):
        return self.host.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.host.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.host.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.host.set_output_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None,
                **kwargs) -> PRMoECausalLMOutput | tuple:
        out = self.host(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=True, **kwargs)
        aux = self.aux_loss()
        loss = out.loss
        if loss is not None and aux is not None:
            loss = loss + self.config.aux_loss_coef * aux
        if not (self.config.return_dict if return_dict is None else return_dict):
            if loss is not None:
                out["loss"] = loss  # with the MoE aux term
            return out.to_tuple()  # the host's own tuple: (loss, logits, ...) with labels, (logits, ...) without
        return PRMoECausalLMOutput(
            loss=loss,
            ce_loss=out.loss,
            aux_loss=aux,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


PRMoEConfig.register_for_auto_class()
PRMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if __name__.startswith("moe_convert."):  # the installed package; a trust_remote_code copy is resolved by transformers
    AutoModelForCausalLM.register(PRMoEConfig, PRMoEForCausalLM, exist_ok=True)

"""`--engine deepspeed --ep-size N`: DeepSpeed's own engine (`deepspeed.initialize`) under torchrun, with
each PR-MoE layer run as a DeepSpeed `MoE` module over N-way expert parallelism and ZeRO stage 2 for the rest.

The engine is driven directly, not through Accelerate's DeepSpeed plugin: the plugin builds the engine
from a model and one optimizer without MoE parameter groups (`split_params_into_different_moe_groups_for_
optimizer`), which ZeRO needs to keep expert parameters out of the data-parallel reduction and partition
them over their expert-data-parallel group; and it expects `accelerate launch` with a DeepSpeed config,
not the torchrun processes every other engine runs in. Accelerate still owns the process group (gloo on
CPU, which DeepSpeed adopts), the RNG state in checkpoints and the LR scheduler.

Under EP each process holds E/N experts of every MoE layer (a contiguous range, as `export --ep-size`
splits them); tokens reach their expert by all-to-all. The gate, the residual FFN, the coefficient and
every other weight are replicated; ZeRO-2 partitions their gradients and AdamW state over all
processes, and the experts' over the processes holding the same experts. Checkpoints are DeepSpeed's
(`engine.save_checkpoint`); the final model is our layer again, each expert gathered from its owner.

Our layer and DeepSpeed's `MoE(..., use_residual=True)` compute the same function (`model/moe.py`),
given DeepSpeed's gate with `use_rts=False`, no noisy gate, our capacity (None = `drop_tokens=False`)
and, for top-2, `top2_2nd_expert_sampling=False`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import MoEConvertError
from ..formats import DEEPSPEED_ROUTER, deepspeed_expert_key
from ..model.moe import Experts, PRMoELayer
from ..model.routing import route
from .engines import module_bytes

DS_DIR = "deepspeed"  # inside a checkpoint directory: DeepSpeed's tag folder (model, ZeRO and expert shards)
BUCKET_ELEMENTS = 500_000_000  # ZeRO's reduce and all-gather buckets (DeepSpeed's default size)
NO_STEPS_PRINT = 2**31 - 1  # DeepSpeed prints a line every `steps_per_print` steps: our progress bar does


def import_deepspeed():
    """The `deepspeed` module, its log off stdout (`--json` output stands alone) and at warnings only."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
    except ImportError:
        raise MoEConvertError("engine: deepspeed is not installed; pip install 'moe-convert[deepspeed]'") from None
    from deepspeed.utils import logger

    logger.setLevel("WARNING")
    return deepspeed


def check_deepspeed(ep_size: int, processes: int, config) -> None:
    """What `--engine deepspeed --ep-size N` needs, checked before any weights load: DeepSpeed installed,
    N dividing the process count and every MoE layer's expert count (`config`: the model's)."""
    from ..convert.export import check_ep_size

    import_deepspeed()
    if processes % ep_size:
        raise MoEConvertError(f"ep_size: {ep_size} does not divide the {processes} processes; start torchrun with "
                              f"a multiple of it (--nproc_per_node)")
    if getattr(config, "model_type", None) == "prmoe":
        check_ep_size(config, ep_size)
        if not config.residual:  # DeepSpeed copies the residual FFN module for its experts
            raise MoEConvertError("engine: deepspeed runs PR-MoE layers with their residual FFN and this model has "
                                  "none (upcycled with --no-residual); use --engine ddp or fsdp")
    elif ep_size > 1:
        raise MoEConvertError(f"ep_size: {ep_size} splits experts, and the model has no MoE layers; use --ep-size 1")


class DeepSpeedPRMoE(PRMoELayer):
    """A PR-MoE layer whose router, experts, residual FFN and coefficient live in a DeepSpeed `MoE`
    (`self.moe`), holding E/ep_size of the experts. Like our layer it leaves `aux_loss` (DeepSpeed's
    l_aux), `load` and `expert_counts` after each forward; the load is the gate's softmax over the
    same weight again, for `--aux-scope global` and the load entropies.

    A `PRMoELayer` to the model (its `moe_layers` and aux loss find it), built from one rather than by
    that class's constructor, whose router and experts it does not have."""

    def __init__(self, layer: PRMoELayer, ep_size: int, spec):
        nn.Module.__init__(self)
        from deepspeed.moe.layer import MoE

        experts = layer.experts
        self.top_k, self.capacity_factor, self.min_capacity = layer.top_k, layer.capacity_factor, layer.min_capacity
        self.num_experts, self.ep_size, self.spec = experts.num_experts, ep_size, spec
        self.kind, self.act, self.expert_dropout = experts.kind, experts.act, experts.dropout
        # DeepSpeed keeps `expert` (our residual FFN) as its residual FFN and copies it for each local expert
        self.moe = MoE(layer.router.in_features, layer.mlp, num_experts=self.num_experts, ep_size=ep_size,
                       k=layer.top_k, capacity_factor=layer.capacity_factor or 1.0,
                       eval_capacity_factor=layer.capacity_factor or 1.0, min_capacity=layer.min_capacity,
                       use_residual=True, noisy_gate_policy=None,
                       drop_tokens=layer.capacity_factor is not None, use_rts=False,
                       top2_2nd_expert_sampling=False)
        self.moe.load_state_dict(self._deepspeed_state(layer), strict=True)
        for ffn in self.moe.deepspeed_moe.experts.deepspeed_experts:  # DeepSpeed hands each a strided chunk,
            ffn.register_forward_pre_hook(_contiguous)  # which GPT-2's Conv1D cannot `view`
        self.aux_loss = self.load = self.expert_counts = None

    def _deepspeed_state(self, layer: PRMoELayer) -> dict[str, torch.Tensor]:
        """`layer`'s tensors under `self.moe`'s names, its local experts only (`convert/export.py`'s mapping)."""
        local = self.num_experts // self.ep_size
        first = _ep_rank(self.ep_size) * local
        state = {DEEPSPEED_ROUTER: layer.router.weight.detach()}
        for j in range(local):
            for ours, (key, transposed) in self.spec.expert_keys.items():
                t = getattr(layer.experts, ours).detach()[first + j]
                state[deepspeed_expert_key(j, key)] = t.t() if transposed else t
        state |= {f"mlp.{k}": v for k, v in layer.mlp.state_dict().items()}
        return state | {f"coefficient.{k}": v for k, v in layer.coefficient.state_dict().items()}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d)
        gate = self.moe.deepspeed_moe.gate.wg.weight  # (E, d); logits in fp32 as DeepSpeed's gate computes them
        routing = route(x.float() @ gate.float().t(), self.top_k, self.capacity_factor, self.min_capacity)
        self.load, self.expert_counts = routing.load, routing.first_choice_counts.detach()
        y, self.aux_loss, _ = self.moe(x)  # (T, d)
        return y.reshape(shape)

    def gathered(self) -> PRMoELayer | None:
        """Our layer with every expert, built on the ep group's first process (None on the others): each
        process sends its experts there. A collective over the layer's ep group."""
        import torch.distributed as dist

        group = self.moe.deepspeed_moe.ep_group
        main = dist.get_rank(group) == 0
        local = self.moe.deepspeed_moe.experts.deepspeed_experts
        stacked = {}
        for ours, (key, transposed) in self.spec.expert_keys.items():
            mine = torch.stack([e.get_parameter(key).detach() for e in local])  # (E/N, ...)
            parts = [torch.empty_like(mine) for _ in range(self.ep_size)] if main else None
            dist.gather(mine, parts, group_dst=0, group=group)
            if main:
                full = torch.cat(parts)  # (E, ...) host layout
                stacked[ours] = full.transpose(1, 2) if transposed else full
        if not main:
            return None
        gate = self.moe.deepspeed_moe.gate.wg
        with torch.device("meta"):  # shells: every tensor is set below
            experts = Experts(self.kind, self.num_experts, gate.in_features, stacked["w_out"].shape[1], self.act,
                              self.expert_dropout)
            layer = PRMoELayer(gate.in_features, experts, self.moe.mlp, self.top_k, self.capacity_factor,
                               self.min_capacity)
        for name, t in stacked.items():
            setattr(experts, name, nn.Parameter(t.contiguous()))
        layer.router.weight = gate.weight
        layer.coefficient = self.moe.coefficient
        return layer


def _contiguous(module, args):
    return tuple(a.contiguous() for a in args)


def _ep_rank(ep_size: int) -> int:
    """This process's place in its ep group: DeepSpeed groups consecutive ranks."""
    import torch.distributed as dist

    return dist.get_rank() % ep_size


def _ffn_layers(model) -> list[tuple[nn.Module, str]]:
    """(decoder layer, attribute) of each PR-MoE layer of `model`."""
    from ..model.modeling import host_spec
    from .engines import decoder_blocks

    attr = host_spec(model.config.text_config.model_type).ffn_attr
    return [(block, attr) for block in decoder_blocks(model) if isinstance(getattr(block, attr), PRMoELayer)]


def to_deepspeed_moe(model, ep_size: int):
    """Swap each PR-MoE layer of `model` for a `DeepSpeedPRMoE` over `ep_size` processes, in place.
    `deepspeed.initialize` gives the layers their ep groups; a frozen teacher, which has no engine,
    takes them with `join_ep_groups`."""
    from ..model.modeling import host_spec

    import_deepspeed()
    if getattr(model.config, "model_type", None) != "prmoe":
        return model
    spec = host_spec(model.config.text_config.model_type)
    for block, attr in _ffn_layers(model):
        setattr(block, attr, DeepSpeedPRMoE(getattr(block, attr), ep_size, spec))
    return model


def join_ep_groups(model) -> None:
    """The ep process groups for `model`'s DeepSpeed MoE layers (made by the student's engine, or here)."""
    for block, attr in _ffn_layers(model):
        getattr(block, attr).moe.set_deepspeed_parallelism()


def final_model(engine):
    """The trained model with our layers again, on the main process of each ep group (None on the others):
    under bf16 every weight first becomes its fp32 master copy (ZeRO keeps it partitioned), then every
    expert is gathered from its owner. A collective: all processes call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module
    if engine.bfloat16_enabled():
        for p in model.parameters():  # one parameter at a time, in the same order on every process
            p.data = safe_get_full_fp32_param(p)
    layers = [(block, attr, getattr(block, attr).gathered()) for block, attr in _ffn_layers(model)]  # all gather
    if any(ours is None for *_, ours in layers):
        return None
    for block, attr, ours in layers:
        setattr(block, attr, ours)
    return model


def ds_config(cfg, micro_batch: int) -> dict:
    """DeepSpeed's config for a `TrainConfig`: ZeRO-2, its clipping (global norm), bf16 when asked."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
            "zero_optimization": {"stage": 2, "reduce_bucket_size": BUCKET_ELEMENTS,
                                  "allgather_bucket_size": BUCKET_ELEMENTS},
            "gradient_clipping": cfg.clip,
            "bf16": {"enabled": cfg.mixed_precision == "bf16"}, "steps_per_print": NO_STEPS_PRINT}


def initialize(model, cfg, micro_batch: int, param_groups: list[dict]):
    """(engine, optimizer): `model` with DeepSpeed MoE layers under ZeRO-2, AdamW over `param_groups` split
    into DeepSpeed's MoE groups. The returned optimizer is the torch AdamW (our LR scheduler sets its lr)."""
    deepspeed = import_deepspeed()
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    to_deepspeed_moe(model, cfg.ep_size)
    named = [{**g, "name": f"group{i}"} for i, g in enumerate(param_groups(model))]  # DeepSpeed keys groups by name
    groups = split_params_into_different_moe_groups_for_optimizer(named)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    with contextlib.redirect_stdout(sys.stderr):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, micro_batch))
    return engine, optimizer


def held_bytes(engine) -> dict[str, int]:
    """Bytes this process holds before the optimizer step: its parameters (local experts only) with ZeRO's
    fp32 master partition of them, and the step's partitioned gradients."""
    zero = engine.optimizer
    master = sum(p.numel() * p.element_size() for p in zero.single_partition_of_fp32_groups)
    grads = sum(g.numel() * g.element_size() for parts in zero.averaged_gradients.values() for g in parts)
    return {"params": module_bytes(engine.module) + master, "grads": grads}


def save(engine, path: Path) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        engine.save_checkpoint(str(path), tag=DS_DIR, save_latest=False)


def load(engine, path: Path) -> None:
    if not (path / DS_DIR).is_dir():
        raise MoEConvertError(f"resume: {path} holds no DeepSpeed state ({DS_DIR}/); it was not written by "
                              f"--engine deepspeed")
    with contextlib.redirect_stdout(sys.stderr):
        engine.load_checkpoint(str(path), tag=DS_DIR, load_optimizer_states=True, load_lr_scheduler_states=False)

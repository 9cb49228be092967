"""How `train` and `distill` spread a model over processes: `ddp` (every process holds the whole model,
through Accelerate) or `fsdp` (PyTorch's FSDP2 `fully_shard`, one group per decoder block).

FSDP2 is applied with `torch.distributed.fsdp.fully_shard` itself, not Accelerate's FSDP plugin:
Accelerate applies its plugin only to GPU process groups (`DistributedType.MULTI_GPU` and kin) and
ignores it on CPU, so the plugin could not be the path our gloo tests run. Calling `fully_shard`
directly gives one code path on CPU and GPU; Accelerate still owns the process group, the device,
the RNG state in checkpoints and gradient clipping (which it does DTensor-aware).

Under `fsdp` each parameter is a DTensor sharded on dim 0: a process keeps 1/N of the weights, their
gradients and the AdamW moments; a block's full weights exist only while it runs (all-gathered,
then freed). Checkpoints are torch.distributed.checkpoint (DCP) directories, one file per process;
the final model is gathered one tensor at a time and streamed into the usual safetensors files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MoEConvertError

DCP_DIR = "sharded"  # inside a checkpoint directory: the DCP files of model + optimizer
SAVE_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default: the same files as a DDP run's


def check_engine(engine: str, mixed_precision: str, processes: int) -> None:
    """What an engine needs of the process group and precision, checked before any model loads."""
    if engine == "fsdp" and processes < 2:
        raise MoEConvertError("engine: fsdp shards the model over processes and this is one process; start it with "
                              "torchrun --nproc_per_node N (N >= 2), or use --engine ddp")
    if engine == "fsdp" and mixed_precision == "fp16":
        raise MoEConvertError("mixed_precision: fp16 under --engine fsdp needs a sharded gradient scaler, which is "
                              "not built; use bf16")
    if engine == "deepspeed" and mixed_precision == "fp16":
        raise MoEConvertError("mixed_precision: fp16 under --engine deepspeed is not wired to its loss scaler; use bf16")
    if engine == "ddp" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise MoEConvertError("engine: the accelerate config asks for FSDP; pass --engine fsdp and launch with a "
                              "config without an fsdp section (distributed_type: MULTI_GPU)")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder-layer list (the host's, for a PR-MoE)."""
    from ..model.modeling import decoder_layers

    parent, name = decoder_layers(model)
    return getattr(parent, name)


def shard(model: torch.nn.Module, mixed_precision: str = "no") -> torch.nn.Module:
    """`fully_shard` each decoder block, then the root (embeddings, final norm, head), over the default
    process group. bf16: FSDP2 gathers and computes in bf16 and reduces gradients in fp32, keeping fp32
    master shards (a frozen model keeps its own dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def collective_forward(model: torch.nn.Module) -> bool:
    """Whether a forward takes every process at once: sharded weights are gathered, or tokens reach
    experts on other processes (a DeepSpeed MoE with ep_size > 1, `deepspeed_engine.py`)."""
    return is_sharded(model) or any(getattr(m, "ep_size", 1) > 1 for m in model.modules())


def reshard(model: torch.nn.Module) -> None:
    """Free a sharded model's gathered weights after a forward without backward (FSDP2 keeps the root's
    gathered for the backward that usually follows, which a frozen teacher or an eval never runs)."""
    if is_sharded(model):
        model.reshard()


# -- what a process holds, counted from its tensors ---------------------------------------------------
def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of `t` in this process: a DTensor's local shard, else the tensor."""
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module | None) -> int:
    return sum(local_bytes(p) for p in module.parameters()) if module is not None else 0


def grad_bytes(module: torch.nn.Module) -> int:
    return sum(local_bytes(p.grad) for p in module.parameters())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def max_over_processes(values: list[int]) -> list[int]:
    """Each value's maximum over the default process group (unchanged in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# -- sharded checkpoints (DCP) and the gathered final model -----------------------------------------
def save_sharded(path: Path, model, optimizer) -> None:
    """Model and optimizer shards into `path/DCP_DIR` (every process writes its own file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / DCP_DIR))


def load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / DCP_DIR).is_dir():
        raise MoEConvertError(f"resume: {path} holds no sharded state ({DCP_DIR}/); it was not written by "
                              f"--engine fsdp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (fully_shard swaps in a subclass `FSDP<Name>`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def write_gathered(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype | None, is_main: bool) -> None:
    """The sharded model's weights as `save_pretrained` would write them (tied weights once, under their
    first name), plus config.json, generation_config.json and the modeling code. Every process takes part in
    gathering each tensor; the main process casts and streams it to disk, so at most one full tensor
    exists at a time."""
    from torch.distributed.tensor import DTensor

    from ..io import ShardWriter
    from ..options import parse_size

    params, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # tied parameters appear under every name that holds them
            seen.add(id(t))
            params.append((name, t))
    writer = None
    if is_main:
        writer = ShardWriter(out_dir, parse_size(SAVE_MAX_SHARD_SIZE))
        writer.begin([(n, tuple(t.shape), dtype if dtype is not None and t.is_floating_point() else t.dtype)
                      for n, t in params])
    try:
        for name, t in params:
            full = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()  # a collective: all ranks
            if writer is not None:
                writer.write(name, full.to("cpu", dtype if dtype is not None and full.is_floating_point()
                                           else full.dtype))
            del full
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    if is_main:
        _write_config_files(model, out_dir, dtype or next(t for _, t in params if t.is_floating_point()).dtype)


def _write_config_files(model, out_dir: Path, dtype: torch.dtype) -> None:
    """What `save_pretrained` writes beside the weights, from a weightless copy of the model's class."""
    from transformers.dynamic_module_utils import custom_object_save

    cls = unsharded_class(model)
    config = model.config
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [cls.__name__]
    with torch.device("meta"):
        shell = cls(config)
    if shell.is_remote_code():
        custom_object_save(shell, out_dir, config=config)
    config.save_pretrained(out_dir)
    if shell.can_generate():
        model.generation_config.save_pretrained(out_dir)

"""Per-device memory of a `train` or `distill` step, from configs alone (`--dry-run --devices N`).

What each device holds, for `ddp` (everything whole), `fsdp` (sharded 1/N) and `deepspeed` (EP over
`ep_size` of the N devices, ZeRO-2: weights whole but each MoE layer's experts split E/ep_size per
device, fp32 master weights, gradients and AdamW state partitioned 1/N):

- parameters: fp32 master weights, 4 bytes each (bf16 is a compute dtype: weights stay fp32);
- gradients: fp32, 4 bytes each; optimizer: AdamW's two fp32 moments, 8 bytes each;
- teacher (distill): its weights at `teacher_dtype`, frozen (no gradients, no optimizer state);
- buffers: ddp keeps a second copy of the gradients in its all-reduce buckets; fsdp gathers one
  block's full weights in the compute dtype, and prefetches the next; deepspeed reduces gradients
  through one bucket (`deepspeed_engine.BUCKET_ELEMENTS`, fp32);
- activations of one micro-batch (`batch_size / (grad_accum x devices)` windows of `seq_len`
  tokens), counted per token as in Korthikanti et al. 2022 (arXiv 2205.05198, sec. 4.1) with SDPA
  attention (no s x s scores kept): about 8h for attention and norms plus 2h + 2f for each FFN the
  token passes (a MoE layer: top-k experts, the residual FFN, the router's E logits), plus the
  logits and their fp32 copies in the loss. With activation checkpointing a block keeps only its
  input, and one block's activations exist again while it is recomputed.

The parameter, gradient, optimizer and teacher figures are what a process's tensors add up to (a
test compares them with the bytes counted in real runs); activations and buffers are estimates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import MoEConvertError
from .config import DistillJob, TrainJob

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_DEVICE_MEMORY = "80GB"


@dataclass
class MemoryPlan:
    kind: str  # train | distill
    engine: str
    devices: int
    micro_batch: int  # windows per device per micro-batch
    seq_len: int
    mixed_precision: str
    activation_checkpointing: bool  # what the run is configured with: `total` counts that
    params: int  # bytes per device
    grads: int
    optimizer: int
    teacher: int
    buffers: int
    activations: int
    activations_checkpointed: int
    device_memory: int

    @property
    def state(self) -> int:
        """Parameters, gradients, optimizer state and teacher: what the processes' tensors hold."""
        return self.params + self.grads + self.optimizer + self.teacher

    def total(self, checkpointed: bool | None = None) -> int:
        ckpt = self.activation_checkpointing if checkpointed is None else checkpointed
        return self.state + self.buffers + (self.activations_checkpointed if ckpt else self.activations)

    @property
    def fits(self) -> bool:
        return self.total() <= self.device_memory

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total(False), "total_checkpointed": self.total(True), "fits": self.fits}


def _shape(config) -> dict:
    """Per-token activation sizes of a model config: hidden, FFN, layers, vocabulary, MoE layers."""
    from ..model.modeling import host_spec

    host = config.get_text_config()
    inner = host_spec(host.model_type).inner_size(host)
    moe = dict(zip(config.moe_layers, config.num_experts)) if getattr(config, "model_type", None) == "prmoe" else {}
    return {"h": host.hidden_size, "f": inner, "layers": host.num_hidden_layers, "vocab": host.vocab_size, "moe": moe,
            "top_k": getattr(config, "num_experts_per_tok", 1), "residual": getattr(config, "residual", True)}


def _layer_elements(s: dict, layer: int) -> int:
    """Activation elements one token keeps in one decoder layer."""
    h, f = s["h"], s["f"]
    ffn = 2 * h + 2 * f
    if layer in s["moe"]:
        ffn = s["top_k"] * ffn + (ffn if s["residual"] else 0) + s["moe"][layer]
    return 8 * h + ffn


def activation_bytes(config, tokens: int, compute_bytes: int, checkpointed: bool, kd_teacher_bytes: int = 0) -> int:
    """Activations of `tokens` tokens through the model, and its logits in the loss (distill with KD:
    the teacher's logits at `kd_teacher_bytes` and the KL's fp32 terms too)."""
    s = _shape(config)
    per_layer = [_layer_elements(s, i) for i in range(s["layers"])]
    if checkpointed:  # each block's input kept; one block recomputed at a time
        blocks = s["layers"] * s["h"] + max(per_layer)
    else:
        blocks = sum(per_layer)
    logits = s["vocab"] * (compute_bytes + 8)  # logits, their fp32 copy, the loss's gradient
    if kd_teacher_bytes:
        logits += s["vocab"] * (kd_teacher_bytes + 12)  # teacher logits, log-probs of both, teacher probs
    return tokens * (blocks * compute_bytes + logits)


def _largest_block_params(config) -> int:
    from ..convert.summary import summarize_config

    return max((r.params for r in summarize_config(config).layers), default=0)


def _ep_params(config, ep_size: int) -> int:
    """Parameters one of `ep_size` expert-parallel devices holds: all but the experts, and 1/ep_size of those."""
    from ..convert.summary import summarize_config

    summary = summarize_config(config)
    experts = sum(r.expert_params for r in summary.layers)
    return summary.total_params - experts + experts // ep_size


def _total_params(config) -> int:
    from ..convert.summary import summarize_config

    return summarize_config(config).total_params


def plan_memory(job: TrainJob, model_config, *, devices: int = 1, device_memory: int | str = DEFAULT_DEVICE_MEMORY,
                teacher_config=None) -> MemoryPlan:
    """Per-device memory of `job` on `devices` devices; `model_config` is what is trained (distill: the
    student's), `teacher_config` the teacher's (distill)."""
    from ..options import parse_size

    cfg = job.config
    if devices < 1:
        raise MoEConvertError(f"devices: must be >= 1, got {devices}")
    if cfg.engine == "fsdp" and devices < 2:
        raise MoEConvertError("devices: --engine fsdp shards over devices; give --devices N (N >= 2)")
    if devices % cfg.ep_size:
        raise MoEConvertError(f"devices: --ep-size {cfg.ep_size} does not divide {devices} devices")
    if cfg.batch_size % (cfg.grad_accum * devices):
        raise MoEConvertError(f"batch_size: {cfg.batch_size} is not divisible by grad_accum ({cfg.grad_accum}) x "
                              f"devices ({devices})")
    memory = parse_size(device_memory)
    micro = cfg.batch_size // (cfg.grad_accum * devices)
    n = devices if cfg.engine == "fsdp" else 1  # the shards
    compute = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    params = _total_params(model_config)
    held = 4 * params // n  # weights a device holds: fp32, sharded under fsdp
    teacher, kd_bytes, teacher_block = 0, 0, 0
    if isinstance(job, DistillJob) and job.kd_steps > 0 and teacher_config is not None:
        kd_bytes = DTYPE_BYTES[job.teacher_dtype]
        teacher = _total_params(teacher_config) * kd_bytes // n
        teacher_block = _largest_block_params(teacher_config) * kd_bytes
    if cfg.engine == "fsdp":  # one block gathered and the next prefetched
        buffers = 2 * max(_largest_block_params(model_config) * compute, teacher_block)
    elif cfg.engine == "deepspeed":  # EP: a 1/ep_size share of the experts; ZeRO-2: fp32 master partition
        from .deepspeed_engine import BUCKET_ELEMENTS

        held = compute * _ep_params(model_config, cfg.ep_size) + 4 * params // devices
        n = devices  # gradients and optimizer state partitioned over every device
        if teacher:
            teacher = _ep_params(teacher_config, cfg.ep_size) * kd_bytes
        buffers = 4 * min(params, BUCKET_ELEMENTS)
    else:  # the all-reduce buckets: a second copy of the gradients
        buffers = 4 * params
    tokens = micro * job.seq_len
    return MemoryPlan(
        kind=job.KIND, engine=cfg.engine, devices=devices, micro_batch=micro, seq_len=job.seq_len,
        mixed_precision=cfg.mixed_precision, activation_checkpointing=cfg.activation_checkpointing,
        params=held, grads=4 * params // n, optimizer=8 * params // n, teacher=teacher, buffers=buffers,
        activations=activation_bytes(model_config, tokens, compute, False, kd_bytes),
        activations_checkpointed=activation_bytes(model_config, tokens, compute, True, kd_bytes),
        device_memory=memory)


def plan_job(job: TrainJob, *, devices: int = 1, device_memory: int | str = DEFAULT_DEVICE_MEMORY,
             config=None) -> MemoryPlan:
    """`plan_memory` for a job whose model directory (or `config`, its config) is at hand: distill
    plans its student from the teacher's config."""
    from ..convert.summary import load_config

    config = config if config is not None else load_config(job.model)
    if isinstance(job, DistillJob):
        from .distill import plan_student, student_config

        student = student_config(config, plan_student(config, job.student_layers, job.keep_layers))
        return plan_memory(job, student, devices=devices, device_memory=device_memory, teacher_config=config)
    return plan_memory(job, config, devices=devices, device_memory=device_memory)


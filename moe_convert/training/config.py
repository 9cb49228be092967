"""Typed, validated job configuration: `train`, `distill` and `eval` runs and their optimisation settings.

Pure Python (no torch) so the CLI and recipe validation can use it before anything heavy loads.
Every check raises `MoEConvertError` naming the field and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import MoEConvertError
from ..options import check_seed, check_types, option

MAX_TEMPERATURE = 1e4  # KD softmax temperature: past it every distribution is flat (and T^2 overflows later)

MIXED_PRECISION = ("no", "bf16", "fp16")
ENGINES = ("ddp", "fsdp", "deepspeed")  # how the model is spread over processes (training/engines.py)
SAVE_DTYPE_NAMES = ("fp32", "bf16", "fp16")
AUX_SCOPES = ("micro", "global")  # the tokens each MoE layer's load-balancing loss is computed over
DROP_BY = ("measured", "front")  # how a --student-layers student picks the layers it drops (training/layer_drop.py)


# Settings that change where something is kept, not any result: neither `--resume` nor `run` refuses a change.
# the cache gives what the teacher would, wherever it lives; recomputed activations equal kept ones
WHERE_ONLY = ("teacher_cache", "activation_checkpointing")


@dataclass
class TrainConfig:
    """Optimisation settings shared by `train` and `distill`; every field is a CLI option (help in metadata)."""

    steps: int = option(100, "Optimizer steps (the LR schedule spans them).")
    batch_size: int = option(8, "Global batch in windows per optimizer step (all processes, all micro-batches).")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    lr: float = option(3e-4, "Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, "Cosine decay ends at lr * this.")
    warmup_steps: int = option(10, "Linear warmup steps.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).")
    beta1: float = option(0.9, "AdamW beta1.")
    beta2: float = option(0.95, "AdamW beta2.")
    clip: float = option(1.0, "Max gradient norm; 0 disables clipping.")
    eval_every: int = option(50, "Steps between held-out evals (one always runs at the end); 0 = end only.")
    eval_windows: int = option(0, "Held-out windows per eval; 0 = all.")
    save_every: int = option(0, "Steps between save_state checkpoints; 0 = none.")
    keep_checkpoints: int = option(2, "Newest checkpoints kept.")
    log_every: int = option(1, "Steps between metrics.jsonl records.")
    mixed_precision: str = option("no", "no | bf16 | fp16 (fp16 needs a GPU).")
    engine: str = option("ddp", "ddp: every process holds the whole model | fsdp: parameters, gradients and AdamW "
                                "state sharded per decoder block over the processes (FSDP2; N >= 2 processes) | "
                                "deepspeed: DeepSpeed's engine, PR-MoE experts split over --ep-size processes, "
                                "ZeRO-2 for the rest (pip install 'moe-convert[deepspeed]').")
    ep_size: int = option(1, "--engine deepspeed: processes each MoE layer's experts are split over (expert "
                             "parallelism); must divide the process count and every layer's expert count.")
    activation_checkpointing: bool = option(False, "Recompute each decoder block's activations in the backward "
                                                   "pass instead of keeping them (less memory, ~1/3 more compute).")
    seed: int = option(0, "Seed of the data order and of dropout.")
    aux_scope: str = option("micro", "Tokens the PR-MoE load-balancing loss balances over: micro = each process's "
                                     "micro-batch (DeepSpeed) | global = the optimizer step's whole batch (all "
                                     "processes and micro-batches; one extra routing forward per step when "
                                     "--grad-accum > 1).")

    def __post_init__(self):
        check_types(self)
        positive = ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "ep_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise MoEConvertError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_windows", "save_every"):
            if getattr(self, name) < 0:
                raise MoEConvertError(f"{name}: must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed)
        for name in ("lr", "weight_decay", "clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise MoEConvertError(f"{name}: must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise MoEConvertError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise MoEConvertError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MoEConvertError(
                f"mixed_precision: must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.aux_scope not in AUX_SCOPES:
            raise MoEConvertError(f"aux_scope: must be one of {', '.join(AUX_SCOPES)}, got {self.aux_scope!r}")
        if self.engine not in ENGINES:
            raise MoEConvertError(f"engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.ep_size > 1 and self.engine != "deepspeed":
            raise MoEConvertError(f"ep_size: {self.ep_size} splits experts over processes, which --engine "
                                  f"{self.engine} does not do; use --engine deepspeed")
        if self.batch_size % self.grad_accum:
            raise MoEConvertError(f"batch_size: {self.batch_size} is not divisible by grad_accum={self.grad_accum}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` at optimizer step `step` (0-based): linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainJob:
    """One `train` run: what to train, on which data, where to; one recipe step of kind `train`.

    Fields after `output` (and all of `TrainConfig`) are CLI options of `train` and `distill`."""

    KIND = "train"  # the command and recipe step (not a field: no annotation)

    model: str
    data: str
    output: str
    text_field: str = option("text", "Field holding the text in JSON/Parquet data.")
    seq_len: int = option(128, "Tokens per packed training window.")
    eval_fraction: float = option(0.1, "Fraction of documents held out (crc32 rule, see data.py).")
    save_dtype: str = option("fp32", "dtype of the saved model: fp32 | bf16 | fp16.")
    config: TrainConfig = None

    def __post_init__(self):
        self.config = self.config or TrainConfig()
        check_types(self)
        if self.save_dtype not in SAVE_DTYPE_NAMES:
            raise MoEConvertError(f"save_dtype: must be one of {', '.join(SAVE_DTYPE_NAMES)}, got {self.save_dtype!r}")
        if self.seq_len < 2:
            raise MoEConvertError(f"seq_len: must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise MoEConvertError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainJob":
        """Flat mapping (a recipe step) -> job; `TrainConfig` fields sit beside the job's own."""
        job_fields = {f.name for f in fields(cls)} - {"config"}
        cfg_fields = {f.name for f in fields(TrainConfig)}
        unknown = set(d) - job_fields - cfg_fields
        if unknown:
            raise MoEConvertError(f"{cls.KIND}: unknown field(s) {', '.join(sorted(unknown))}; allowed: "
                                  f"{', '.join(sorted(job_fields | cfg_fields))}")
        missing = {"model", "data", "output"} - set(d)
        if missing:
            raise MoEConvertError(f"{cls.KIND}: missing field(s) {', '.join(sorted(missing))}")
        cfg = TrainConfig(**{k: v for k, v in d.items() if k in cfg_fields})
        return cls(**{k: v for k, v in d.items() if k in job_fields}, config=cfg)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {**d, **asdict(self.config)}


@dataclass
class DistillJob(TrainJob):
    """One `distill` run; `model` is the teacher directory (`teacher` in recipes and on the CLI).

    Its own fields are CLI options of `distill` too (help in metadata)."""

    KIND = "distill"

    student_layers: int | None = option(None, "Student depth: -k = teacher depth minus k, or an absolute depth. "
                                              "Default: -1, or what --keep-layers keeps (given both, they must agree).")
    keep_layers: str | None = option(None, "Teacher layers to keep, e.g. 0,4,5,...; default: drop the layers "
                                           "--drop-by chooses.")
    drop_by: str | None = option(None, "Which layers a --student-layers student drops: measured = the block (or "
                                       "set) whose removal costs the teacher-initialised student least on a "
                                       "calibration sample of the training split | front = the layers right after "
                                       "layer 0 (the paper's L21 student for -3). Default: measured with "
                                       "--student-init teacher, front with scratch.")
    student_init: str = option("teacher", "teacher: copy kept layers, embeddings, final norm | scratch: random "
                                          "(the paper).")
    alpha: float = option(0.5, "Weight of the KD term: (1 - alpha) CE + alpha T^2 KL.")
    temperature: float = option(1.0, "KD softmax temperature T.")
    kd_stop: float = option(0.5, "KD for the first KD_STOP of the steps, then CE only with the teacher released "
                                 "(0 = no KD, 1 = KD throughout; a value that rounds to no KD step, or below 1 to every step, is refused).")
    teacher_dtype: str = option("fp32", "Teacher precision: fp32 | bf16 | fp16.")
    kd_top_k: int | None = option(None, "KD over the teacher's K most likely tokens per position plus one outcome "
                                        "for all others (full KD at K = vocabulary). Default: full KD.")
    teacher_cache: str | None = option(None, "Directory keeping the teacher's top --kd-top-k logits per training "
                                             "window: a window seen before (a later epoch, another run) needs no "
                                             "teacher forward. Needs --kd-top-k.")

    def __post_init__(self):
        super().__post_init__()
        if self.kd_top_k is not None and self.kd_top_k < 1:
            raise MoEConvertError(f"kd_top_k: must be >= 1, got {self.kd_top_k}")
        if self.teacher_cache is not None and self.kd_top_k is None:
            raise MoEConvertError("teacher_cache: the cache keeps the teacher's top-K logits; give --kd-top-k too "
                                  "(e.g. 32)")
        if self.teacher_cache is not None and self.config.ep_size > 1:
            raise MoEConvertError("teacher_cache: under --ep-size > 1 a teacher forward takes every process at once, "
                                  "and a window cached on one process would leave the others waiting; drop "
                                  "--teacher-cache or use --ep-size 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise MoEConvertError(f"alpha: must be in [0, 1], got {self.alpha}")
        if not 0 < self.temperature <= MAX_TEMPERATURE:  # T^2 scales the KD term: inf gave NaN weights
            raise MoEConvertError(f"temperature: must be > 0 and at most {MAX_TEMPERATURE:g}, got {self.temperature}")
        if not 0.0 <= self.kd_stop <= 1.0:
            raise MoEConvertError(f"kd_stop: must be in [0, 1] (a fraction of the steps), got {self.kd_stop}")
        if self.student_init not in ("teacher", "scratch"):
            raise MoEConvertError(f"student_init: must be 'teacher' or 'scratch', got {self.student_init!r}")
        if self.drop_by is not None and self.drop_by not in DROP_BY:
            raise MoEConvertError(f"drop_by: must be one of {', '.join(DROP_BY)}, got {self.drop_by!r}")
        if self.drop_by is not None and self.keep_layers is not None:
            raise MoEConvertError("drop_by: --keep-layers names the kept layers itself; give one of them")
        if self.drop_by == "measured" and self.student_init == "scratch":
            raise MoEConvertError("drop_by: measured scores the teacher's layers for a student that starts from "
                                  "them; a scratch student uses front")
        if self.kd_stop > 0 and self.kd_steps == 0:
            raise MoEConvertError(f"kd_stop: {self.kd_stop} of {self.config.steps} steps rounds to no KD step; "
                                  f"raise it (or the steps), or give 0 for no KD")
        if self.kd_stop < 1 and self.kd_steps == self.config.steps:
            raise MoEConvertError(f"kd_stop: {self.kd_stop} of {self.config.steps} steps rounds to KD at every step "
                                  f"(the teacher is never released); lower it (or raise the steps), or give 1 "
                                  f"for KD throughout")
        if self.teacher_dtype not in SAVE_DTYPE_NAMES:
            raise MoEConvertError(f"teacher_dtype: must be one of {', '.join(SAVE_DTYPE_NAMES)}, "
                                  f"got {self.teacher_dtype!r}")

    @property
    def drop_rule(self) -> str | None:
        """How the student's dropped layers are chosen: measured | front; None when --keep-layers names them."""
        if self.keep_layers is not None:
            return None
        return self.drop_by or ("measured" if self.student_init == "teacher" else "front")

    @property
    def kd_steps(self) -> int:
        """Optimizer steps that use KD: steps [0, kd_steps)."""
        return round(self.kd_stop * self.config.steps)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillJob":
        d = dict(d)
        if "teacher" in d:
            d["model"] = d.pop("teacher")
        return super().from_dict(d)


@dataclass
class EvalJob:
    """What `eval` scores a model on; its fields after `data` are the CLI options of `eval`.

    A recipe's eval step adds the models to score and its output (`pipeline/recipe.py`)."""

    KIND = "eval"

    data: str
    text_field: str = option("text", "Field holding the text in JSON/Parquet data.")
    seq_len: int = option(128, "Tokens per packed window.")
    eval_fraction: float = option(0.1, "Fraction of documents held out (same rule as train).")
    split: str = option("eval", "Which split to score: eval (held out) | train.")
    batch_size: int = option(8, "Windows per forward pass.")
    max_windows: int = option(0, "Score at most this many windows; 0 = all.")

    def __post_init__(self):
        check_types(self)
        if self.split not in ("eval", "train"):
            raise MoEConvertError(f"split: must be eval or train, got {self.split!r}")
        if self.batch_size < 1 or self.max_windows < 0:
            raise MoEConvertError(f"eval: batch_size must be >= 1 and max_windows >= 0 (0 = all), got {self.batch_size} "
                                  f"and {self.max_windows}")
        if self.seq_len < 2:
            raise MoEConvertError(f"seq_len: must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise MoEConvertError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")

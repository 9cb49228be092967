"""The training loop `train` runs and `distill` reuses: Accelerate, one CPU process or torchrun (DDP or
FSDP2, `engines.py`; DeepSpeed's engine with expert parallelism, `deepspeed_engine.py`).

Reusable API::

    cfg = TrainConfig(steps=200, batch_size=16, lr=3e-4)       # validated at construction
    trainer = Trainer(model, data, cfg, out_dir, loss_fn=causal_lm_loss, on_step=None,
                      extra_state=())
    result = trainer.fit(resume=False, stop_after=None)         # -> TrainResult
    trainer.save_model(tokenizer, dtype=None)                    # final save_pretrained + tokenizer

- `loss_fn(model, batch, step) -> dict[str, Tensor]`: `batch` is this process's micro-batch of
  token windows, `(b, seq_len)` int64 on the device; the dict must hold `"loss"` (what is
  backpropagated); every other entry is averaged over micro-batches and processes and logged.
  The default, `causal_lm_loss`, logs `ce` and `aux` next to `loss` for our PR-MoE models
  (`outputs.loss` already includes `aux_loss_coef * aux`).
- `on_step(step)` runs before optimizer step `step` (0-based), also as the first call after a
  resume. A phase change decided from `step` alone (distill: KD off from step k, teacher freed)
  therefore continues exactly across a resume.
- `extra_state`: objects with `state_dict` / `load_state_dict` saved in every checkpoint.
- `settings`: the job's own options (`job_settings`: data, window length, distillation); recorded
  in every checkpoint with `cfg`, and a resume whose values differ is refused.
- `trainer.accelerator` places a teacher and autocasts it; `evaluate(model, windows, batch_size,
  accelerator)` is the held-out CE (`ce_loss` for PR-MoE) that periodic evals and `eval` use;
  `run_training(TrainJob)` is the whole `train` command (also a recipe's `train` step).

Exact resume: batch `step` is a pure function of (seed, step) — an epoch-seeded permutation of the
train windows, the global batch split into `grad_accum` micro-batches and each of those into one
contiguous slice per process — and `save_state` stores model, optimizer, scheduler and every RNG.
So an interrupted run resumed from a checkpoint logs the same loss at every step as one that was
never stopped, and with dropout off N processes (per-process micro-batch = batch_size /
(grad_accum * N)) log the same curve as one process with the same global batch, to float
tolerance. (Each process draws its own dropout masks, as in any DDP run. For PR-MoE models that
holds with `aux_scope="global"`; with "micro" the aux loss is computed over each process's own
micro-batch, as DeepSpeed does per rank, so there the curves match up to that term; see
`balance.py`.) `loss_fn` must return the same keys on every process at a step; for a PR-MoE model
under "global" it must return as `aux` the model's aux loss it adds to `loss` (both built-in ones do).

Output directory: the final model (`config.json` moved in last, so a directory with
`config.json` is complete), `metrics.jsonl` (one record per logged step and per eval) and
`checkpoints/step-NNNNNN/` (`save_state` plus `trainer_state.json`, written last).
"""

from __future__ import annotations

import json
import math
import gc
import os
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import MoEConvertError, one_line
from ..io import (CHECKPOINTS, DTYPES, apply_umask, check_output_apart, checkpoints, durable_replace, fsync_path,
                  fsync_tree, unfinished_run_hint)
from .balance import LoadBalance
from .config import WHERE_ONLY, EvalJob, TrainConfig, TrainJob
from . import deepspeed_engine
from .data import PackedData
from .engines import (check_engine, collective_forward, grad_bytes, load_sharded, max_over_processes, module_bytes,
                      optimizer_bytes, reshard, save_sharded, shard, write_gathered)

NO_DECAY_SUFFIXES = ("bias", "b_in", "b_out")  # biases (incl. stacked expert biases) get no weight decay
# Settings a resumed run may change: they decide what is logged, evaluated and kept, not the training.
RESUME_MAY_CHANGE = ("log_every", "eval_every", "eval_windows", "save_every", "keep_checkpoints", "save_dtype",
                     *WHERE_ONLY)
METRICS = "metrics.jsonl"

LossFn = Callable[[torch.nn.Module, torch.Tensor, int], dict[str, torch.Tensor]]


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed in total (including before a resume)
    total_steps: int  # the steps the run is configured for: complete when `steps` reaches it
    train_loss: float  # mean of the optimized loss over the last (up to) 10 steps, across a resume
    train_ce: float  # mean next-token CE over the same steps (the loss without aux or KD terms)
    eval_loss: float | None
    eval_ppl: float | None
    tokens_per_s: float
    seconds: float
    output: str  # holds the final model once complete; before that, checkpoints/ to --resume from
    processes: int
    complete: bool  # steps == total_steps: the run did not stop early (--stop-after)


def causal_lm_loss(model, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """Next-token CE (+ the PR-MoE aux loss our models add to `loss` when labels are given)."""
    out = model(input_ids=batch, labels=batch)
    logs = {"loss": out.loss, "ce": out.loss}
    if getattr(out, "aux_loss", None) is not None:
        logs["ce"] = out.ce_loss
        logs["aux"] = out.aux_loss
    return logs


def cpu_only() -> bool:
    """Accelerate treats torchrun processes on CPU as one process each unless told `cpu=True`."""
    return not torch.cuda.is_available()


def max_positions(config) -> int | None:
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Any causal LM directory (dense HF or our PR-MoE) via `AutoModelForCausalLM`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MoEConvertError(f"model: {path} is not a model directory (no config.json)" + unfinished_run_hint(path))
    import moe_convert  # noqa: F401  registers PRMoE with the Auto classes
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # the last: truncated or corrupt weights
        raise MoEConvertError(f"model: could not load {path}: {one_line(e)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would initialise them at random and say nothing (its load report is silenced)
        raise MoEConvertError(f"model: {path} lacks {len(missing)} weight(s) its config.json needs, e.g. "
                              f"{missing[0]}: the checkpoint is incomplete")
    return model


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices decay, biases and norms (1-D) do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def perplexity(loss: float) -> float:
    """exp(loss); inf past what a float holds (a diverged model), nan stays nan."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 8, accelerator=None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """Held-out CE over `windows` (N, L) (sharded over processes): loss, perplexity, tokens/s.

    `tokens` counts every position the model reads; tokens/s is timed from the end of the first
    batch (its one-off costs, e.g. oneDNN building its kernels, are not throughput) unless there is
    only one. `scored_tokens` are the L - 1 positions per window that have a next token, which the
    loss averages over. `progress(done, total)` after each batch (windows of this process).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    shard = windows[rank::world]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of window losses, windows)
    start, timed = time.perf_counter(), 0  # timed: windows of this process inside the timing
    starts = range(0, len(shard), batch_size)
    if world > 1 and collective_forward(model):  # every process takes part in each forward: all run as many
        starts = range(0, math.ceil(len(windows) / world) or 1, batch_size)
    for i in starts:
        batch = shard[i:i + batch_size]
        n = len(batch)
        batch = (batch if n else windows[:1]).to(device)  # n = 0: a forward for the others' gathers, scored 0
        with accelerator.autocast() if accelerator else nullcontext():  # mixed precision: a teacher's too
            out = model(input_ids=batch, labels=batch)
        ce = out.ce_loss if getattr(out, "ce_loss", None) is not None else out.loss
        totals += torch.stack([ce.double() * n, torch.tensor(n, dtype=torch.float64, device=device)])
        if i == 0 and len(shard) > batch_size:
            start = time.perf_counter()
        else:
            timed += n
        progress(i + n, len(shard))
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    seconds = time.perf_counter() - start
    reshard(model)
    model.train(was_training)
    loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    n = int(totals[1].item())
    rate = timed * world * windows.shape[1] / seconds if seconds > 0 else 0.0  # every process reads as fast
    return {"loss": loss, "ppl": perplexity(loss), "windows": n, "tokens": n * windows.shape[1],
            "scored_tokens": n * (windows.shape[1] - 1), "seconds": seconds, "tokens_per_s": rate}


def run_eval(model: str | Path, job: EvalJob, progress: Callable[[int, int], None] = lambda done, total: None) -> dict:
    """The `eval` command: a model directory's loss, perplexity and tokens/s on a data split, with the
    unigram-baseline perplexity of the same tokenizer. `progress(done, total)` counts windows."""
    from ..convert.summary import load_config
    from ..io import load_tokenizer
    from .data import load_packed, unigram_perplexity

    tokenizer = load_tokenizer(model)
    packed = load_packed(job.data, tokenizer, job.seq_len, text_field=job.text_field, eval_fraction=job.eval_fraction,
                         max_positions=max_positions(load_config(model)), needed=(job.split,))
    lm = load_model(model)
    windows = getattr(packed, job.split)[: job.max_windows or None]
    if len(windows) == 0:
        raise MoEConvertError(f"eval: the {job.split} split is empty (eval_fraction={job.eval_fraction})")
    return {"model": str(model), "data": job.data, "split": job.split,
            **evaluate(lm, windows, job.batch_size, progress=progress),
            # the baseline's frequencies come from the train split: none without it
            "unigram_ppl": unigram_perplexity(packed.train, windows, len(tokenizer)) if len(packed.train) else None}


def eval_model(model: str | Path, data: str, *, progress: Callable[[int, int], None] = lambda done, total: None,
               **options) -> dict:
    """`run_eval` with `EvalJob`'s fields as keywords: `eval_model("runs/student", "builtin:pydoc", seq_len=64)`."""
    return run_eval(model, EvalJob(data, **options), progress)


def release_memory() -> None:
    """Collect what no longer has a reference (models in reference cycles too) and hand cached device
    memory back to the GPU, where there is one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Trainer:
    """Runs `TrainConfig` over packed data with a pluggable loss; see the module docstring."""

    def __init__(self, model, data: PackedData, cfg: TrainConfig, out_dir: str | Path, *,
                 loss_fn: LossFn = causal_lm_loss, on_step: Callable[[int], None] | None = None,
                 extra_state: Iterable = (), settings: dict | None = None, progress: bool = True,
                 held: Callable[[], dict[str, int]] | None = None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.settings = settings or {}  # beside cfg: recorded, compared on resume
        self.recent: dict[str, list[float]] = {}  # "loss" / "ce" of the last 10 steps (the summary's)
        self.loss_fn, self.on_step, self.progress = loss_fn, on_step, progress
        self.held = held  # bytes of what the loss holds besides the model (distill: the teacher), per process
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise MoEConvertError("mixed_precision: fp16 needs a GPU; use bf16 on CPU")
        # DDP's default (every parameter gets a gradient) holds: stacked experts get one whenever any expert
        # of their layer has tokens, and every token goes to some expert.
        if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
            AcceleratorState._reset_state()  # a new run in this process (tests, recipes); keeps the process group
        self.accelerator = acc = Accelerator(cpu=cpu_only(), mixed_precision=cfg.mixed_precision)
        world = acc.num_processes
        check_batch(cfg, world)
        check_engine(cfg.engine, cfg.mixed_precision, world)
        self.micro = cfg.batch_size // (cfg.grad_accum * world)  # windows per process per micro-batch
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable()
        self.sharded = cfg.engine == "fsdp"
        self.deepspeed = cfg.engine == "deepspeed"  # DeepSpeed's engine is `self.model`
        if self.sharded:  # the optimizer is built on the shards; Accelerate does not wrap the model
            model = shard(model.to(acc.device), cfg.mixed_precision)
        if self.deepspeed:
            self.model, self.optimizer = deepspeed_engine.initialize(
                model.to(acc.device), cfg, self.micro, lambda m: decay_groups(m, cfg.weight_decay))
            optimizer = self.optimizer
        else:
            optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                                          betas=(cfg.beta1, cfg.beta2))
        # Not prepared: Accelerate would step a prepared scheduler once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
        if not self.deepspeed:
            self.model, self.optimizer = (model, optimizer) if self.sharded else acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler, *extra_state)
        # PR-MoE: the aux loss at cfg.aux_scope, and expert-load entropies in the log
        self.balance = LoadBalance(model, cfg.aux_scope, cfg.grad_accum) if hasattr(model, "moe_layers") else None
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    # -- data: batch `step` is a pure function of (seed, step) -------------------------------------
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Window order of one pass over the train split, (N_train,), seeded by (seed, epoch)."""
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data.train), generator=g))
        return self._order[1]

    def _window_ids(self, start: int, count: int) -> torch.Tensor:
        """Ids of the windows at positions [start, start+count) of the endless stream of epoch orders."""
        n = len(self.data.train)
        return torch.tensor([int(self._epoch_order(p // n)[p % n]) for p in range(start, start + count)])

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        """This process's windows for micro-batch `micro` of optimizer step `step`: (micro, seq_len)."""
        acc = self.accelerator
        start = step * self.cfg.batch_size + (micro * acc.num_processes + acc.process_index) * self.micro
        return self.data.train[self._window_ids(start, self.micro)]

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        path = self.out_dir / CHECKPOINTS / f"step-{step:06d}"
        acc.save_state(str(path), safe_serialization=False)  # tied embeddings: plain torch files
        if self.sharded:  # save_state kept the scheduler, extra state and every RNG; the shards go to DCP
            save_sharded(path, self.model, self.optimizer)
        if self.deepspeed:  # and the engine's model, ZeRO and expert shards to DeepSpeed's own files
            deepspeed_engine.save(self.model, path)
        acc.wait_for_everyone()
        if acc.is_main_process:  # trainer_state.json marks the checkpoint complete: every file on disk first
            state = {"step": step, "config": asdict(self.cfg), "settings": self.settings, "recent": self.recent}
            fsync_tree(path)
            tmp = path / ".trainer_state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            fsync_path(tmp)
            durable_replace(tmp, path / "trainer_state.json")
            for old in checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return path

    def _resume(self, stop_after: int | None) -> int:
        """Restore the newest checkpoint (`check_resume` first); its step."""
        ckpt, state = check_resume(self.out_dir, self.cfg, self.settings, stop_after)
        step = state["step"]
        self.accelerator.load_state(str(ckpt))
        if self.sharded:
            load_sharded(ckpt, self.model, self.optimizer)
        if self.deepspeed:
            deepspeed_engine.load(self.model, ckpt)
        self.recent = state.get("recent", {})
        if self.accelerator.is_main_process:  # drop records the resumed run will write again
            metrics = self.out_dir / METRICS
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            metrics.write_text("".join(f"{l}\n" for l in lines if json.loads(l)["step"] <= step))
        return step

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self, model=None) -> dict:
        """Held-out CE of the model being trained, or of `model` (on this run's device) on the same windows."""
        windows = self.data.eval[: self.cfg.eval_windows or None]
        return evaluate(model or self.model, windows, self.micro, self.accelerator)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to `cfg.steps` (or stop, checkpointed, after step `stop_after`)."""
        from accelerate.utils import set_seed
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        cfg, acc = self.cfg, self.accelerator
        check_stop_after(stop_after)
        if acc.is_main_process and not resume:  # a resumed run's directory exists (else _resume refuses it)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if resume:
            start = self._resume(stop_after)  # restores the RNGs too
        else:
            start = 0
            set_seed(cfg.seed)  # dropout (and anything else random) starts from the seed
            if acc.is_main_process:
                (self.out_dir / METRICS).unlink(missing_ok=True)
        stop = min(cfg.steps, stop_after or cfg.steps)
        tokens_per_step = cfg.batch_size * self.data.seq_len
        ev, t_run = None, time.perf_counter()
        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), disable=not (self.progress and acc.is_main_process), transient=False,
                       console=Console(stderr=True))  # stdout keeps the summary (or --json) alone
        with bar:
            task = bar.add_task("train", total=cfg.steps, completed=start, info="")
            for step in range(start, stop):
                if self.on_step is not None:
                    self.on_step(step)
                self.model.train()
                t0 = time.perf_counter()
                sums: dict[str, torch.Tensor] = {}
                batches = [self.micro_batch(step, micro).to(acc.device) for micro in range(cfg.grad_accum)]
                if self.balance:
                    self.balance.begin(batches)
                for micro, batch in enumerate(batches):
                    last = micro == cfg.grad_accum - 1
                    with self._sync_grads(last):
                        out = self.loss_fn(self.model, batch, step)
                        if self.balance:
                            out = self.balance.micro_loss(out)
                        self._backward(out["loss"] / cfg.grad_accum, last)
                    for k, v in out.items():  # logged values may live on the CPU (a loss_fn's counters)
                        sums[k] = sums.get(k, 0.0) + v.detach().float().to(acc.device) / cfg.grad_accum
                if self.balance:
                    sums |= self.balance.end()
                lr = self.scheduler.get_last_lr()[0]
                grad_norm, held = self._optimizer_step()
                held.update(self.held() if self.held else {})
                self.scheduler.step()
                keys = sorted(sums)
                means = acc.reduce(torch.stack([sums[k] for k in keys]), reduction="mean").tolist()
                done, dt = step + 1, time.perf_counter() - t0
                record = {"kind": "train", "step": done, **dict(zip(keys, means)), "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / dt,
                          # the largest process's bytes of each, counted from the tensors it holds
                          **{f"held_{k}": v for k, v in zip(held, max_over_processes(list(held.values())))}}
                if acc.device.type == "cuda":  # this process's peak device memory so far
                    record["gpu_max_gb"] = torch.cuda.max_memory_allocated(acc.device) / 1e9
                for k in ("loss", "ce"):  # the summary's last 10 steps, kept in checkpoints across a resume
                    self.recent[k] = (self.recent.get(k, []) + [record[k]])[-10:]
                if not math.isfinite(record["loss"]):  # every rank has the same reduced loss: all stop here
                    self._log(record)
                    raise MoEConvertError(
                        f"training diverged: the loss is {record['loss']} at step {done}; no final model is written "
                        f"(checkpoints of earlier steps are kept). Lower --lr, raise --warmup-steps or set --clip")
                if done % cfg.log_every == 0 or done == cfg.steps:  # not at --stop-after: a resume would log twice
                    self._log(record)
                bar.update(task, completed=done, info=f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s")
                final = done == cfg.steps
                if len(self.data.eval) and ((cfg.eval_every and done % cfg.eval_every == 0) or final):
                    ev = self.evaluate()
                    self._log({"kind": "eval", "step": done, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"]})
                if (cfg.save_every and done % cfg.save_every == 0 and not final) or (done == stop and not final):
                    self.save_checkpoint(done)
        seconds = time.perf_counter() - t_run
        ran = max(stop - start, 0)

        def mean(k):
            return sum(self.recent[k]) / len(self.recent[k]) if self.recent.get(k) else float("nan")
        return TrainResult(
            steps=stop, total_steps=cfg.steps, train_loss=mean("loss"), train_ce=mean("ce"),
            eval_loss=ev["loss"] if ev else None, eval_ppl=ev["ppl"] if ev else None,
            tokens_per_s=ran * tokens_per_step / seconds if seconds > 0 else 0.0, seconds=seconds,
            output=str(self.out_dir), processes=acc.num_processes, complete=stop == cfg.steps,
        )

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """deepspeed: the engine counts micro-batches itself, stepping (and reducing) at the last one."""
        if not self.deepspeed:
            self.accelerator.backward(loss)
            return
        self.model.backward(loss, scale_wrt_gas=False)  # `loss` is already divided by grad_accum
        if not last:
            self.model.step()

    def _optimizer_step(self) -> tuple[float, dict[str, int]]:
        """Clip to the global norm and step; (that norm before clipping, bytes this process holds of each
        kind of state)."""
        if self.deepspeed:  # the engine clipped to the norm over all processes' gradients, experts included
            held = deepspeed_engine.held_bytes(self.model)
            self.model.step()
            return float(self.model.get_global_grad_norm()), held | {"optimizer": optimizer_bytes(self.optimizer)}
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # fsdp: a DTensor reduced over the shards
            grad_norm = grad_norm.full_tensor()
        held = {"params": module_bytes(self.model), "grads": grad_bytes(self.model)}
        self.optimizer.step()
        held["optimizer"] = optimizer_bytes(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), held

    def _sync_grads(self, last: bool):
        """Gradients are reduced over processes at the last micro-batch of a step only (DeepSpeed's engine
        knows that by itself)."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last or self.deepspeed else self.accelerator.no_sync(self.model)

    def release(self) -> None:
        """Drop the model and optimizer (also the accelerator's references) and return their memory, so
        the next step of a recipe in this process starts without them."""
        self.accelerator.free_memory()
        if self.deepspeed:
            self.model.destroy()
        self.model = self.optimizer = self.scheduler = None
        release_memory()

    def save_model(self, tokenizer, dtype: torch.dtype | None = None) -> None:
        """Final `save_pretrained` + tokenizer into the output dir; `config.json` is moved in last.
        fsdp: the same files, gathered one tensor at a time (`engines.write_gathered`)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        tmp = self.out_dir / ".final.tmp"
        if self.sharded:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            acc.wait_for_everyone()
            try:
                write_gathered(self.model, tmp, dtype, acc.is_main_process)
            except BaseException:
                if acc.is_main_process:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        model = deepspeed_engine.final_model(self.model) if self.deepspeed else None  # our layers, every expert
        if acc.is_main_process:
            if not self.deepspeed:
                model = None if self.sharded else acc.unwrap_model(self.model)
            if dtype is not None and model is not None:
                model = model.to(dtype)
            if not self.sharded:
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                if model is not None:
                    model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                apply_umask(tmp)
            except BaseException:  # interrupted or failed: no half-written model left beside the checkpoints
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_tree(tmp)
            (self.out_dir / "config.json").unlink(missing_ok=True)
            for f in tmp.iterdir():
                if f.name != "config.json":
                    os.replace(f, self.out_dir / f.name)
            fsync_path(self.out_dir)  # those renames on disk before the one that marks the model complete
            durable_replace(tmp / "config.json", self.out_dir / "config.json")
            tmp.rmdir()
        acc.wait_for_everyone()


def check_batch(cfg: TrainConfig, processes: int) -> None:
    if cfg.batch_size % (cfg.grad_accum * processes):
        raise MoEConvertError(f"batch_size: {cfg.batch_size} is not divisible by grad_accum ({cfg.grad_accum}) x "
                              f"processes ({processes})")


def check_stop_after(stop_after: int | None) -> None:
    if stop_after is not None and stop_after < 1:
        raise MoEConvertError(f"--stop-after must be >= 1, got {stop_after}")


def check_resume(out_dir: Path, cfg: TrainConfig, settings: dict, stop_after: int | None) -> tuple[Path, dict]:
    """The newest checkpoint of `out_dir` and its trainer state, once resuming from it is allowed: refused
    when the output is already complete, has no checkpoint, was trained with other settings where they
    shape the training (`cfg` and the job's `settings`, less RESUME_MAY_CHANGE), or when `stop_after` is
    not past it. The runners call it before loading any model, `Trainer.fit` again for the state."""
    check_stop_after(stop_after)
    if (out_dir / "config.json").is_file():  # the final model is written once the last step ran
        raise MoEConvertError(f"resume: {out_dir} is already complete (it holds the final model); "
                              f"pass --overwrite to train it again")
    ckpts = checkpoints(out_dir)
    if not ckpts:
        raise MoEConvertError(f"resume: no complete checkpoint under {out_dir / CHECKPOINTS}")
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    saved = {**state["config"], **state.get("settings", {})}
    now = {**asdict(cfg), **settings}
    changed = [f"{k} {now.get(k)} (the checkpoint's: {v})" for k, v in saved.items()
               if k not in RESUME_MAY_CHANGE and now.get(k) != v]
    if changed:
        raise MoEConvertError(f"resume: {', '.join(changed)}; resume with the settings the run started with")
    if stop_after is not None and stop_after <= state["step"]:
        raise MoEConvertError(f"--stop-after {stop_after}: the newest checkpoint is already at step {state['step']}")
    return ckpts[-1], state


def job_settings(job: TrainJob, data: PackedData) -> dict:
    """A job's own options that shape the training (data, distillation), for `Trainer(settings=...)`, with
    what it starts from (`model`; distill: `teacher`) and the token windows it trains on (`data`), each by
    content: resuming with another model or other data is refused, a moved copy resumes."""
    import hashlib

    own = {f.name: getattr(job, f.name) for f in fields(job) if "help" in f.metadata}  # _resume skips RESUME_MAY_CHANGE
    h = hashlib.sha256()
    for split in (data.train, data.eval):  # the tensors' own memory: no copy of the whole dataset
        h.update(split.contiguous().numpy())  # C-contiguous, read as raw bytes (an empty split too)
    windows = h.hexdigest()[:12]
    return {**own, "teacher" if job.KIND == "distill" else "model": model_fingerprint(job.model),
            "data": f"windows {windows}"}


def model_fingerprint(path: str | Path) -> str:
    """A model directory's config.json and the weight files it loads (`io.model_weight_files`: names and
    bytes), hashed: the same model wherever it lives; any other weights differ. Reading them costs about
    what loading the model costs (another format or an optimizer state beside them is not read)."""
    import hashlib

    from ..io import model_weight_files

    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for f in model_weight_files(path) if path.is_dir() else []:
        with open(f, "rb") as fh:
            h.update(f.name.encode() + hashlib.file_digest(fh, "sha256").digest())
    return "config+weights " + h.hexdigest()[:12]


def claim_output(out: Path, resume: bool, overwrite: bool, inputs=()):
    """The process state (under torchrun this sets up the group: gloo on CPU); refuses a non-empty
    OUTPUT unless resuming or overwriting, an OUTPUT that is a file, and one that is or holds one of
    `inputs` (the model, the data). Nothing is removed yet (see `clear_output`)."""
    from accelerate import PartialState

    if resume and overwrite:
        raise MoEConvertError("--resume continues OUTPUT, --overwrite replaces it: give one of them")
    state = PartialState(cpu=cpu_only())
    check_output_apart(out, inputs)
    if out.exists() and not out.is_dir():
        raise MoEConvertError(f"output: {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise MoEConvertError(f"output: {out} is not empty; pass --resume to continue it or --overwrite to replace it")
    return state


def clear_output(state, out: Path, resume: bool, overwrite: bool) -> None:
    """With --overwrite (and no --resume) remove OUTPUT, once every input has been validated; all
    processes wait until it is gone before anyone writes to it."""
    if overwrite and not resume and state.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
    state.wait_for_everyone()


def check_job_for_model(job: TrainJob, config) -> None:
    """What a train/distill job asks of its model that the model's config decides, checked before anything
    loads (and by `run` at plan time): windows within its positions; distill: --kd-top-k within its vocabulary."""
    from .data import check_seq_len

    check_seq_len(job.seq_len, max_positions(config))
    vocab = config.get_text_config().vocab_size
    if getattr(job, "kd_top_k", None) is not None and job.kd_top_k > vocab:
        raise MoEConvertError(f"kd_top_k: {job.kd_top_k} is more than the teacher's {vocab} tokens")


def load_job_data(job: TrainJob, tokenizer, state, config) -> PackedData:
    """The job's packed windows for the model `config` describes; one process tokenizes and fills the
    cache, the others read it. A tokenizer with more tokens than the model's vocabulary is refused."""
    from .data import load_packed

    vocab = config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        raise MoEConvertError(f"tokenizer: {len(tokenizer)} tokens but the model's vocabulary has {vocab}; "
                              "the model and its data must share one tokenizer")
    with state.main_process_first():
        return load_packed(job.data, tokenizer, job.seq_len, text_field=job.text_field,
                           eval_fraction=job.eval_fraction, max_positions=max_positions(config))


def prepare_job(job: TrainJob, config, *, resume: bool, stop_after: int | None, overwrite: bool):
    """What train and distill check and read before any weights load, in this order: the output, what the
    model's `config` decides, the tokenizer and packed data, and a resume against its checkpoint.
    Returns (process state, tokenizer, data, settings)."""
    from ..io import load_tokenizer

    state = claim_output(Path(job.output), resume, overwrite, inputs=[job.model, job.data])
    check_job_for_model(job, config)
    check_batch(job.config, state.num_processes)
    check_engine(job.config.engine, job.config.mixed_precision, state.num_processes)
    if job.config.engine == "deepspeed":
        deepspeed_engine.check_deepspeed(job.config.ep_size, state.num_processes, config)
    tokenizer = load_tokenizer(job.model)
    data = load_job_data(job, tokenizer, state, config)
    settings = {**job_settings(job, data), "processes": state.num_processes}  # checkpoints hold per-process state
    if resume:  # refused before any model loads
        check_resume(Path(job.output), job.config, settings, stop_after)
    else:
        check_stop_after(stop_after)
    return state, tokenizer, data, settings


def run_training(job: TrainJob, *, resume: bool = False, stop_after: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> TrainResult:
    """The `train` command (and a recipe's `train` step): load, train, save the final model."""
    from ..convert.summary import load_config

    out = Path(job.output)
    state, tokenizer, data, settings = prepare_job(job, load_config(job.model), resume=resume, stop_after=stop_after,
                                                   overwrite=overwrite)
    model = load_model(job.model)
    clear_output(state, out, resume, overwrite)
    trainer = Trainer(model, data, job.config, out, settings=settings, progress=progress)
    result = trainer.fit(resume=resume, stop_after=stop_after)
    if result.steps == job.config.steps:
        trainer.save_model(tokenizer, DTYPES[job.save_dtype])
    trainer.release()
    return result

"""The `moe-convert` command line: parse options, call one library function per command, print.

Only typer/rich are imported at module level so `moe-convert --help` answers at once; torch and
transformers are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console

from .convert.config import ExportJob, FromDeepSpeedJob, UpcycleJob
from .convert.summary import fmt
from .inference.config import GenerateJob
from .options import format_bytes
from .training.config import DistillJob, EvalJob, TrainConfig, TrainJob

app = typer.Typer(
    name="moe-convert",
    help="Dense LM -> PR-MoE (upcycle), Mixture-of-Students with staged KD (distill), and fast MoE export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="MoE layer speed against DeepSpeed, transformers and the hardware floor, as ratios.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)


@contextmanager
def reporting_errors(json_out: bool = False):
    """Turn our own error type into a one-line message and exit code 2 (no traceback).

    Our commands draw their own progress and summaries, so transformers' and the hub's per-load
    progress bars and advisory warnings are silenced for the command's duration. With `--json`,
    stdout carries the JSON alone: what libraries print meanwhile goes to stderr (DeepSpeed, when
    installed, logs to stdout as accelerate imports it), and `print_json` writes to the real stdout.
    """
    import contextlib

    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    from .errors import MoEConvertError

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _JSON_STDOUT.append(sys.stdout)
    on_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so a killed command cleans up as on Ctrl-C
    try:
        with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
            yield
    except MoEConvertError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except OSError as e:  # the file system refused: disk full, read-only, a path through a file, ...
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"[bold red]error:[/] {escape(e.strerror or str(e))}{escape(str(where))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130)
    finally:
        _JSON_STDOUT.pop()
        signal.signal(signal.SIGTERM, on_term)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (`kill`, a job scheduler, torchrun stopping its workers) ends the command through Python:
    half-written outputs are removed as on Ctrl-C, and the exit status is the usual 128 + 15."""
    raise SystemExit(128 + signum)


_JSON_STDOUT: list = []  # the stdout each running command started with (`print_json` writes there)


def tune_memory_for_inference() -> None:
    """Process-wide memory settings for `generate` and `bench layer` (docs/benchmarks.md).

    Transparent huge pages for tensors of 2 MiB or more (`THP_MEM_ALLOC_ENABLE`, read once at torch's
    first allocation, so this runs before torch is imported; a value the user set wins): fewer TLB
    misses when weights stream from DRAM, decode ~12% faster. And glibc keeps freed activations for
    reuse instead of faulting fresh pages in every forward (`io.keep_freed_memory_for_reuse`).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from .io import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()


def _count_bar(json_out: bool):
    """A transient "description, bar, done/total" progress bar on stderr; off under --json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    console=err_console, transient=True, disable=json_out)


def print_json(obj) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else (NaN and infinities, which JSON
    has not, as null)."""
    def strict(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: strict(v) for k, v in o.items()}
        return [strict(v) for v in o] if isinstance(o, (list, tuple)) else o

    (_JSON_STDOUT[-1] if _JSON_STDOUT else sys.stdout).write(json.dumps(strict(obj), indent=2, allow_nan=False) + "\n")


def print_table(title: str, rows, columns: tuple[str, ...] = (), left: tuple[str, ...] = (),
                no_wrap: tuple[str, ...] = (), out: Console | None = None, compact: bool = False) -> None:
    """A summary table: `rows` of cells under `columns` (right-justified unless named in `left`), or, with
    no `columns`, rows of (label, value) and no header. `compact`: no vertical rules (80 columns)."""
    from rich.table import Table

    table = Table(title=title, show_header=bool(columns), **({"box": box.SIMPLE_HEAD} if compact else {}))
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", no_wrap=col in no_wrap)
    for row in rows:
        table.add_row(*row)
    (out or console).print(table)


def with_job_options(*job_classes):
    """Give a command one --option per field of `job_classes` that carries help (default, type and help
    from the dataclass), in place of its `options` parameter; it receives them gathered as `options: dict`,
    ready for the job's constructor. So each option is defined once, where its value is validated, and a
    recipe step checks it as the CLI does.
    """
    import dataclasses
    import functools
    import inspect as pyinspect
    import typing

    shared = [(cls, f) for cls in job_classes for f in dataclasses.fields(cls) if "help" in f.metadata]
    names = [f.name for _, f in shared]
    extra = [pyinspect.Parameter(f.name, pyinspect.Parameter.KEYWORD_ONLY, annotation=typing.get_type_hints(cls)[f.name],
                                 default=typer.Option(f.default, help=f.metadata["help"])) for cls, f in shared]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(**kwargs):
            return command(**{k: v for k, v in kwargs.items() if k not in names}, options={k: kwargs[k] for k in names})

        params = [p.replace(kind=pyinspect.Parameter.KEYWORD_ONLY) for p in pyinspect.signature(command).parameters.values()]
        at = [p.name for p in params].index("options")
        wrapper.__signature__ = pyinspect.Signature(params[:at] + extra + params[at + 1:])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper
    return decorate


@contextmanager
def _bytes_written_bar(json_out: bool):
    """A transient "writing shards" bar on stderr (off under --json), shown from the first write: all
    validation comes before it. Yields the `progress(done, total)` callback."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=json_out)
    task = bar.add_task("writing shards", total=None)

    def progress(done, total):
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        yield progress
    finally:
        if bar.live.is_started:
            bar.stop()


@app.command()
@with_job_options(UpcycleJob)
def upcycle(
    source: str = typer.Argument(..., help="Dense checkpoint: a local model directory, a hub id (from the cache when "
                                                  "offline) or a .gguf file (dequantized once into the cache; needs the gguf extra)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (built under a temporary name, renamed when complete)."),
    options: dict = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only once the new one is complete). Default: off."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table. Default: off."),
):
    """Dense HF checkpoint (local dir, hub id or GGUF file) -> PR-MoE checkpoint dir, streaming."""
    with reporting_errors(json_out):
        from .convert.upcycle import run_upcycle

        job = UpcycleJob(source, str(output), **options)
        with _bytes_written_bar(json_out) as progress:
            s = run_upcycle(job, overwrite=overwrite, progress=progress)
        if json_out:
            print_json(s.to_dict())
            return
        shares = s.max_expert_share or [None] * len(s.experts_per_layer)
        print_table(f"upcycled {s.source} -> {s.output}", [
            ("host / layers", f"{s.host}, {s.num_layers} layers"),
            ("MoE layers", ", ".join(map(str, s.moe_layers))),
            ("experts per layer", ", ".join(map(str, s.experts_per_layer))),
            ("top-k / residual", f"{s.top_k} / {'on' if s.residual else 'off'}"),
            ("init / seed", f"{s.init} / {s.seed}"),
            ("total params", f"{s.total_params:,}"),
            ("active params / token", f"{s.active_params:,}"),
            ("size on disk", f"{format_bytes(s.size_on_disk)} in {s.shards} shard(s), {s.dtype}"),
            ("fidelity", s.fidelity),
            ("max |dlogits|", fmt(s.max_abs_logit_diff, ".3g")),
            ("mean KL(dense||upcycled)", fmt(s.kl, ".3g")),
            ("largest expert share (x fair)",
             ", ".join("-" if x is None else f"{x:.2f} ({x * e:.1f}x)" for x, e in zip(shares, s.experts_per_layer))),
            ("time", f"{s.seconds:.1f} s"),
        ])


DATA_HELP = ("builtin:pydoc (the Python reference shipped with CPython), a .txt/.json/.jsonl/.parquet file, "
             "a directory of them, or a hub dataset name")


def set_threads(threads: int | None) -> None:
    """`--threads`: torch's intra-op threads for this process (None: torch's choice)."""
    if threads is None:
        return
    from .errors import MoEConvertError

    cpus = os.cpu_count() or 1
    if not 1 <= threads <= 4 * cpus:  # thousands of threads exhaust the process limit and crash in BLAS
        raise MoEConvertError(f"--threads must be in 1..{4 * cpus} (4x this machine's {cpus} CPUs), got {threads}")
    import torch

    torch.set_num_threads(threads)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


@app.command()
@with_job_options(TrainJob, TrainConfig)
def train(
    model: Path = typer.Argument(..., help="Model directory (dense HF causal LM or PR-MoE) with its tokenizer."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory: final model, metrics.jsonl, checkpoints/."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the newest checkpoint in OUTPUT; refused if a setting that shapes the training changed."),
    stop_after: Optional[int] = typer.Option(None, help="Stop (with a checkpoint) after this step; resume later. Default: run all steps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-device memory plan from the configs alone (parameters, gradients, optimizer state, teacher, activations of one micro-batch with and without activation checkpointing) and exit."),
    devices: int = typer.Option(1, "--devices", help="Devices (processes) the --dry-run plan spreads the run over."),
    device_memory: str = typer.Option("80GB", "--device-memory", help="Memory of one device, which the --dry-run plan must fit, e.g. 80GB."),
    options: dict = None,
):
    """Continue training a dense or PR-MoE model with CE (+ aux loss); 1 process or torchrun (DDP or FSDP2)."""
    with reporting_errors(json_out):
        from .training.train import run_training

        job = TrainJob.from_dict({"model": str(model), "data": data, "output": str(output), **options})
        if dry_run:
            return _print_memory_plan(job, devices, device_memory, json_out)
        result = run_training(job, resume=resume, stop_after=stop_after, overwrite=overwrite, progress=not json_out)
        if not _is_main_process():
            return
        _note_stop(result, job)
        if json_out:
            print_json(vars(result))
            return
        print_table(f"train -> {output}", [(str(result.steps), fmt(result.train_ce, ".4f"), fmt(result.eval_loss, ".4f"),
                                           fmt(result.eval_ppl, ".2f"), fmt(result.tokens_per_s, ",.0f"),
                                           fmt(result.seconds, ".1f"))],
                    ("steps", "train CE (last 10)", "eval loss", "eval ppl", "tokens/s", "seconds"))


def _print_memory_plan(job, devices: int, device_memory: str, json_out: bool) -> None:
    """`train/distill --dry-run`: what one device holds, as a table that fits 80 columns."""
    from .training.memory import plan_job

    plan = plan_job(job, devices=devices, device_memory=device_memory)
    if json_out:
        return print_json(plan.to_dict())
    rows = [(label, value, value) for label, value in memory_rows(plan)]
    rows += [("activations", format_bytes(plan.activations), format_bytes(plan.activations_checkpointed)),
             ("total", format_bytes(plan.total(False)), format_bytes(plan.total(True))),
             (f"fits {format_bytes(plan.device_memory)}", *("yes" if plan.total(c) <= plan.device_memory else "no"
                                                           for c in (False, True)))]
    print_table(f"{plan.kind} per device: {plan.engine} x {plan.devices}, micro-batch {plan.micro_batch} x "
                f"{plan.seq_len}, {plan.mixed_precision}", rows, ("", "kept", "checkpointed"), left=("",))
    console.print(f"this run ({'checkpointed' if plan.activation_checkpointing else 'kept'}): {format_bytes(plan.total())} "
                  f"per device, {'fits' if plan.fits else 'does not fit'} {format_bytes(plan.device_memory)}")


BUFFER_LABELS = {"fsdp": "gather buffers", "deepspeed": "ZeRO reduce bucket"}  # ddp: all-reduce buckets


def memory_rows(plan) -> list[tuple[str, str]]:
    """The plan's state rows (label, size), the teacher only where there is one."""
    rows = [("parameters (fp32)", plan.params), ("gradients (fp32)", plan.grads),
            ("AdamW state (fp32)", plan.optimizer), ("teacher (frozen)", plan.teacher),
            (BUFFER_LABELS.get(plan.engine, "all-reduce buckets"), plan.buffers)]
    return [(label, format_bytes(n)) for label, n in rows if n or label != "teacher (frozen)"]


def _note_stop(result, job) -> None:
    """On stderr (so also with --json): a run that stopped early is not a finished model; a run that was
    all warmup never decayed its lr."""
    cfg = job.config
    if cfg.warmup_steps >= cfg.steps:
        err_console.print(f"note: --warmup-steps {cfg.warmup_steps} >= --steps {cfg.steps}: the whole run was warmup "
                          f"(the lr rose to {cfg.lr * cfg.lr_factor(cfg.steps - 1):.3g}, "
                          f"{cfg.lr_factor(cfg.steps - 1):.0%} of --lr, and never decayed)")
    if not result.complete:
        err_console.print(f"stopped after step {result.steps} of {result.total_steps}: {result.output} holds "
                          f"checkpoints, not a model yet; continue with --resume")


@app.command()
@with_job_options(DistillJob, TrainConfig)
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher model directory (PR-MoE or dense) with its tokenizer."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory: student model, metrics.jsonl, checkpoints/."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the newest checkpoint in OUTPUT (also across the KD stop); refused if a setting that shapes the training changed."),
    stop_after: Optional[int] = typer.Option(None, help="Stop (with a checkpoint) after this step; resume later. Default: run all steps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-device memory plan from the configs alone (parameters, gradients, optimizer state, teacher, activations of one micro-batch with and without activation checkpointing) and exit."),
    devices: int = typer.Option(1, "--devices", help="Devices (processes) the --dry-run plan spreads the run over."),
    device_memory: str = typer.Option("80GB", "--device-memory", help="Memory of one device, which the --dry-run plan must fit, e.g. 80GB."),
    options: dict = None,
):
    """MoE teacher -> shallower Mixture-of-Students with staged knowledge distillation."""
    with reporting_errors(json_out):
        from .training.distill import run_distill

        job = DistillJob.from_dict({"teacher": str(teacher), "data": data, "output": str(output), **options})
        if dry_run:
            return _print_distill_plan(job, devices, device_memory, json_out)
        result = run_distill(job, resume=resume, stop_after=stop_after, overwrite=overwrite, progress=not json_out)
        if not _is_main_process():
            return
        _note_stop(result.train, job)
        if json_out:
            print_json(result.to_dict())
            return
        plan = result.plan
        if result.drop is not None:
            print_drop_choice(result.drop)
        console.print(f"student: teacher layers {plan.kept} kept, {plan.dropped} dropped; "
                      f"MoE at {plan.moe_layers} with {plan.num_experts} experts; "
                      + (f"KD for steps 1..{result.kd_steps}" if result.kd_steps else "no KD (plain LM loss)"))
        t, s, times = result.teacher, result.student, result.step_seconds
        print_table(f"distill -> {output}", [
            ("teacher", str(t["layers"]), f"{t['total_params']:,}", f"{t['active_params']:,}", fmt(t["eval_ppl"], ".2f"),
             "", ""),
            ("student", str(s["layers"]), f"{s['total_params']:,}", f"{s['active_params']:,}", fmt(s["eval_ppl"], ".2f"),
             fmt(times["kd"], ".3f"), fmt(times["ce"], ".3f")),
        ], ("model", "layers", "total params", "active params", "eval ppl", "step s (KD)", "step s (CE)"))


def _print_distill_plan(job, devices: int, device_memory: str, json_out: bool) -> None:
    """`distill --dry-run`: the student's layers (measured on the teacher with `--drop-by measured`) and
    the memory plan of that student."""
    import dataclasses

    from .training.distill import preview_plan
    from .training.memory import plan_job

    plan, drop = preview_plan(job)
    job = dataclasses.replace(job, keep_layers=",".join(map(str, plan.kept)), student_layers=None, drop_by=None)
    if json_out:
        return print_json({**plan_job(job, devices=devices, device_memory=device_memory).to_dict(),
                           "student": dataclasses.asdict(plan), "drop": drop and dataclasses.asdict(drop)})
    if drop is not None:
        print_drop_choice(drop)
    console.print(f"student: teacher layers {layer_ranges(plan.dropped)} dropped; MoE at {plan.moe_layers} with "
                  f"{plan.num_experts} experts")
    _print_memory_plan(job, devices, device_memory, json_out)


def layer_ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7": a set of layers short enough for a table cell."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def print_drop_choice(drop) -> None:
    """The measured candidates for the dropped layers: what proposed each, its score, and the student's
    perplexity at init on the calibration sample (the lowest is chosen)."""
    rows = [(layer_ranges(c.dropped), c.found_by, fmt(c.score, ".4f"), fmt(c.calibration_ppl, ",.2f"),
             "yes" if c.dropped == drop.dropped else "") for c in drop.candidates]
    print_table(f"dropped layers, measured on {drop.calibration_tokens:,} training tokens (teacher ppl "
                f"{drop.teacher_ppl:,.2f})", rows, ("dropped", "found by", "score", "student ppl", "chosen"),
                left=("dropped", "found by"), compact=True)


@app.command()
@with_job_options(ExportJob)
def export(
    model: Path = typer.Argument(..., help="Our PR-MoE model directory (from upcycle / train / distill)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (built under a temporary name, renamed when complete)."),
    options: dict = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only once the new one is complete). Default: off."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table. Default: off."),
):
    """Model dir -> inference layout (safetensors), HF dir, or DeepSpeed state dicts."""
    with reporting_errors(json_out):
        import time
        from dataclasses import asdict

        from .convert.export import count_tensors, open_source, run_export

        start = time.perf_counter()
        job = ExportJob(str(model), str(output), **options)  # before the progress bar: a one-line error
        src = open_source(model)
        with _count_bar(json_out) as bar:
            task = bar.add_task(f"export {job.format}", total=count_tensors(src, job.format, job.ep_size))
            result = run_export(job, overwrite=overwrite, src=src, on_tensor=lambda name: bar.advance(task))
        if json_out:
            print_json(asdict(result))
            return
        cfg = src.config
        print_table(f"exported {model} -> {output}", [
            ("format / dtype", f"{result.format} / {result.dtype}"),
            ("host / layers", f"{cfg.text_config.model_type}, {cfg.text_config.num_hidden_layers} layers"),
            ("MoE layers (experts)", ", ".join(f"{l} ({e})" for l, e in zip(cfg.moe_layers, cfg.num_experts))),
            ("ep size", str(result.ep_size)),
            ("files", ", ".join(result.files)),
            ("tokenizer files", ", ".join(result.tokenizer_files) or "none"),
            ("size on disk", format_bytes(result.bytes)),
            ("time", f"{time.perf_counter() - start:.1f} s"),
        ])
        if job.format == "safetensors" and not any(f.startswith("tokenizer") for f in result.tokenizer_files):
            err_console.print(f"warning: {model} has no tokenizer files; `generate` needs them in {output}")


@app.command(name="from-deepspeed")
@with_job_options(FromDeepSpeedJob)
def from_deepspeed(
    source: Path = typer.Argument(..., help="An `export --format deepspeed` directory, its layer files possibly trained in DeepSpeed since."),
    output: Path = typer.Option(..., "-o", "--output", help="Output model directory (built under a temporary name, renamed when complete)."),
    options: dict = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (only once the new one is complete). Default: off."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table. Default: off."),
):
    """DeepSpeed MoE state dicts (`export --format deepspeed`) -> our PR-MoE model directory again."""
    with reporting_errors(json_out):
        import time
        from dataclasses import asdict

        from .convert.from_deepspeed import run_from_deepspeed
        from .formats import read_deepspeed_manifest

        start = time.perf_counter()
        job = FromDeepSpeedJob(str(source), str(output), **options)
        read_deepspeed_manifest(source)  # before the progress bar: a one-line error
        with _count_bar(json_out) as bar:
            task = bar.add_task("from-deepspeed", total=None)
            result = run_from_deepspeed(job, overwrite=overwrite, on_tensor=lambda name: bar.advance(task))
        if json_out:
            print_json(asdict(result))
            return
        print_table(f"{source} -> {output}", [
            ("MoE layers (experts)", ", ".join(f"{l} ({e})" for l, e in zip(result.moe_layers, result.experts_per_layer))),
            ("dtype", result.dtype),
            ("files", ", ".join(result.files)),
            ("size on disk", format_bytes(result.bytes)),
            ("time", f"{time.perf_counter() - start:.1f} s"),
        ])


@app.command(name="eval")
@with_job_options(EvalJob)
def eval_(
    model: Path = typer.Argument(..., help="Model directory with its tokenizer."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    options: dict = None,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Held-out loss, perplexity and tokens/s (and the unigram-baseline perplexity of the same tokenizer)."""
    with reporting_errors(json_out):
        from .training.train import run_eval

        job = EvalJob(data, **options)
        with _count_bar(json_out) as bar:
            task = bar.add_task("eval (windows)", total=None)
            r = run_eval(model, job, progress=lambda done, total: bar.update(task, completed=done, total=total))
        if json_out:
            print_json(r)
            return
        print_table(f"eval {model} on {data} ({job.split})", [
            (str(r["windows"]), f"{r['tokens']:,} ({r['scored_tokens']:,})", f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
             fmt(r["unigram_ppl"], ".2f"), f"{r['tokens_per_s']:,.0f}"),
        ], ("windows", "tokens (scored)", "loss", "perplexity", "unigram ppl", "tokens/s"))


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Model directory, a `moe-convert export` directory, or a config .json file alone (no weights needed)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Layer table: experts per layer, total vs active params, dtype, size on disk (meta device: instant)."""
    with reporting_errors(json_out):
        from .convert.summary import summarize

        s = summarize(model)
        if json_out:
            print_json(s.to_dict())
            return
        what = f"export {s.export}" if s.export else s.model_type
        print_table(f"{model}  ({what}, host {s.host}, top-{s.top_k})",
                    [(str(r.index), r.ffn, str(r.experts or "-"), f"{r.params:,}", f"{r.active_params:,}")
                     for r in s.layers],
                    ("layer", "FFN", "experts", "params", "active/token"))
        console.print(f"total params {s.total_params:,} ({_params(s.total_params)})   active per token "
                      f"{s.active_params:,} ({_params(s.active_params)})   dtype {s.dtype}   size on disk "
                      f"{format_bytes(s.size_on_disk)}")


@app.command()
def doctor(
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Measure the GEMM rates (fp32, bf16) and the memory bandwidth (a few seconds). Default: on."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads. Default: torch's choice."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON. Default: off."),
):
    """Which inference kernels run on this machine, for each dtype, and why the others are off; the CPU, its features, and the measured GEMM rate and bandwidth. Paste it into bug reports."""
    with reporting_errors(json_out):
        from dataclasses import asdict

        from .inference.doctor import diagnose

        set_threads(threads)
        from rich.progress import Progress, SpinnerColumn

        with Progress(SpinnerColumn(), "measuring the machine", console=err_console, transient=True,
                      disable=json_out or not measure) as bar:
            bar.add_task("", total=None)
            report = diagnose(measure)
        if json_out:
            print_json(asdict(report))
            return
        features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report.features.items())
        console.print(f"CPU {report.cpu} ({report.threads} threads), torch {report.torch}\n{features}\n"
                      f"native kernel: {report.native}")
        columns = ("dtype", "path", "on", "why not")
        print_table("kernel paths", [(k.dtype, k.path, "yes" if k.on else "no", k.why) for k in report.paths], columns,
                    left=columns, no_wrap=columns[:-1])
        if report.gemm_gflops:
            rates = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in report.gemm_gflops.items())
            console.print(f"GEMM (2048 x 1024 x 4096, best of 5): {rates}; memory read bandwidth "
                          f"{report.bandwidth_gbs:.1f} GB/s")


@app.command()
@with_job_options(GenerateJob)
def generate(
    export_dir: Path = typer.Argument(..., metavar="EXPORT", help="A `moe-convert export --format safetensors` directory."),
    prompt: Optional[list[str]] = typer.Option(None, help="Prompt text (tokenized with the tokenizer copied into the "
                                                          "export); repeat it to decode several prompts as one batch."),
    options: dict = None,
    threads: Optional[int] = typer.Option(None, help="torch CPU threads. Default: torch's choice."),
    json_out: bool = typer.Option(False, "--json", help="Print text, tokens and speed as JSON. Default: off."),
):
    """Text from an export through our inference kernels (KV-cache decoding); several prompts decode as one batch.

    Started as N processes (`torchrun --nproc_per_node N -m moe_convert generate ...`) on an `--ep-size N` export, each process holds one rank's experts and tokens reach them by all-to-all; rank 0 prints.

    Weights are packed for oneDNN at load. The process asks for transparent huge pages (THP_MEM_ALLOC_ENABLE=1 unless you set it) and keeps freed heap memory for reuse.
    """
    tune_memory_for_inference()
    with reporting_errors(json_out):
        from .inference.runtime import generate_text

        job = GenerateJob(str(export_dir), list(prompt or []), **options)
        set_threads(threads)
        gens = generate_text(job)
        if gens[0].rank != 0:  # rank 0 reports for the group
            return
        records = [{"prompt": g.prompt, "text": g.text, "tokens": g.new_tokens, "new_tokens": g.generation.new_tokens,
                    "prefill_s": g.generation.prefill_s, "decode_s": g.generation.decode_s,
                    "tokens_per_s": g.generation.tokens_per_s, "decode_tokens_per_s": g.generation.decode_tokens_per_s,
                    "stopped_at_context": g.generation.stopped_at_context} for g in gens]
        new = sum(g.generation.new_tokens for g in gens)
        prefill_s, decode_s = gens[0].generation.prefill_s, max(g.generation.decode_s for g in gens)
        decode_rate = (new - len(gens)) / decode_s if decode_s > 0 and new > len(gens) else None  # over the batch
        if json_out:
            print_json(records[0] if len(records) == 1 else {
                "completions": records, "new_tokens": new, "prefill_s": prefill_s, "decode_s": decode_s,
                "decode_tokens_per_s": decode_rate})
            return
        if job.greedy and (job.top_k, job.top_p, job.seed) != (None, None, None):
            err_console.print("note: --top-k, --top-p and --seed apply only with --temperature > 0; decoding greedily")
        if gens[0].widened_fp16:
            err_console.print("fp16 export computed in fp32: this CPU has no native fp16 matmul")
        for g in gens:
            console.print(g.prompt + g.text, highlight=False, markup=False)
            if g.generation.stopped_at_context:
                err_console.print(f"stopped at the model's context of {g.context} tokens")
        prompts = f"{gens[0].prompt_tokens} prompt tokens" if len(gens) == 1 else f"{len(gens)} prompts"
        err_console.print(f"{new} tokens in {(prefill_s + decode_s) * 1e3:.1f} ms: prefill {prefill_s * 1e3:.1f} ms "
                          f"for {prompts}, then decode {fmt(decode_rate, '.1f')} tokens/s")


@bench_app.command("layer")
def bench_layer(
    tokens: int = typer.Option(4096, help="Tokens through the layer (4096 ~ prefill, 8 ~ decode)."),
    hidden: int = typer.Option(512, help="Hidden size d; experts are GPT-2 FFNs d -> 4d -> d."),
    experts: str = typer.Option("8,32,128", help="Expert counts to run, comma-separated."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or fp16."),
    impls: Optional[str] = typer.Option(None, help="Comma-separated subset of: moe_convert, moe_convert\\[loop], moe_convert\\[grouped_mm], deepspeed, einsum, hf_eager, hf_grouped_mm, hf_batched_mm, dense_ffn. Default: all (deepspeed when installed)."),
    repeats: int = typer.Option(5, help="Timed rounds per implementation (median reported)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads. Default: torch's choice."),
    seed: int = typer.Option(0, help="Seed of the weights and inputs."),
    backward: bool = typer.Option(False, "--backward", help="Time training steps (forward, a scalar loss, backward; gradients reset before each) instead of inference; the floor counts 3x the FLOPs and the gradients written, max rel err covers the input's gradient too. Default: off."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of rows (impl, tokens, hidden, experts, dtype, ms, backward, ...). Default: off."),
):
    """One MoE layer: ours vs DeepSpeed vs transformers vs the hardware floor.

    Same weights and inputs for every implementation, interleaved rounds (each starting one implementation later), every call after a 256 MiB read, medians. The process asks for transparent huge pages (THP_MEM_ALLOC_ENABLE=1 unless you set it) and keeps freed heap memory for reuse, for every implementation alike. Run it on an otherwise idle machine.
    """
    tune_memory_for_inference()
    with reporting_errors(json_out):
        from dataclasses import asdict

        from rich.progress import Progress, SpinnerColumn

        from .inference.bench import bench_layer as run_bench, check_bench_args
        from .model.layout import parse_int_list

        counts = parse_int_list(experts, "experts")
        names = None if impls is None else list(dict.fromkeys(s.strip() for s in impls.split(",") if s.strip()))
        check_bench_args(tokens, hidden, counts, dtype, names, repeats, seed)  # before any warning or spinner
        set_threads(threads)
        load = os.getloadavg()[0]
        if load > 1.0:
            err_console.print(f"warning: 1-minute load average {load:.1f} — other work is running, timings will be noisy")
        from .inference.kernels import native_fp16_matmul

        if dtype == "fp16" and not native_fp16_matmul():
            err_console.print("warning: this CPU has no native fp16 matmul: every implementation (and the floor's "
                              "GEMM rate) runs torch's slow fallback; `generate` computes fp16 exports in fp32")
        with Progress(SpinnerColumn(), "[progress.description]{task.description}", console=err_console,
                      transient=True, disable=json_out) as bar:
            task = bar.add_task("measuring the machine", total=None)
            machine, rows = run_bench(tokens, hidden, counts, dtype, names, repeats, seed, backward,
                                      on_step=lambda s: bar.update(task, description=s))
        if json_out:
            from .inference.native import cpu_model

            print_json([asdict(r) | {"gemm_gflops": machine.gemm_gflops, "bandwidth_gbs": machine.bandwidth_gbs,
                                     "load_avg_at_start": load, "cpu": cpu_model()} for r in rows])
            return
        from rich.markup import escape

        from .inference.native import cpu_model

        columns = ("E", "impl", "ms", "x floor", "vs DS", "max rel err", "note")
        print_table(f"bench layer: T={tokens} d={hidden} top-1+residual {dtype}"
                    f"{' forward+backward' if backward else ''} on {cpu_model()}; "
                    f"GEMM {machine.gemm_gflops:.0f} GFLOP/s, bandwidth {machine.bandwidth_gbs:.1f} GB/s",
                    [(str(r.experts), escape(r.impl), fmt(r.ms, ".2f"), fmt(r.vs_floor, ".2f"),
                      fmt(r.speedup_vs_deepspeed, ".2f"), fmt(r.max_err, ".1e"), r.note) for r in rows],
                    columns, left=("impl", "note"), no_wrap=columns[:-1],
                    out=Console(width=max(console.width, 130)))  # wide enough for the impl names, even in a pipe
        console.print("x floor = ms / floor (the floor takes the GEMM rate measured on (2048, d) x (d, 4d): a shape "
                      "that runs faster, e.g. tiny or fp16 ones, can go below 1); vs DS = DeepSpeed ms / ms "
                      "(> 1: faster than DeepSpeed)")


def _params(n) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML: steps (upcycle, train, distill, export, eval, bench) chained."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides: kind.field=value (every step "
                                                    "of that kind), N.field=value (step N), output=DIR (run dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (each step's model: layers, experts, "
                                 "total/active params, size, peak memory) without loading weights. Default: off."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan / summary as JSON. Default: off."),
    devices: int = typer.Option(1, "--devices", help="Devices (processes) the --dry-run plan spreads train and distill steps over, each with its engine."),
    device_memory: str = typer.Option("80GB", "--device-memory", help="Memory of one device, which the --dry-run plan must fit, e.g. 80GB."),
):
    """Run a recipe: upcycle/train/distill/export/eval/bench steps chained from one YAML file; finished steps are skipped (refused if their settings changed); a missing input is refused before any work; writes report.md."""
    with reporting_errors(json_out):
        from dataclasses import asdict

        from .pipeline.recipe import load_recipe
        from .pipeline.run import execute, plan_recipe, statuses  # execute validates the whole plan before any work

        r = load_recipe(recipe, overrides or [])
        if dry_run:
            plans = plan_recipe(r, devices, device_memory)
            if json_out:
                print_json([asdict(p) for p in plans])
                return
            todo = statuses(plans)
            rows = []
            for p, status in zip(plans, todo):
                m = p.model or {}
                experts = _compact(m.get("experts")).replace(" + ", "+") if m else ""
                rows.append((str(p.index), p.kind, status, str(m.get("layers", "")), experts,
                             _params(m["total_params"]) if m else "", _params(m["active_params"]) if m else "",
                             format_bytes(p.peak_bytes)))
            # 80 columns: no vertical rules; outputs and memory plans as lines below the table
            print_table(f"plan: {recipe} -> {r.output}", rows,
                        ("#", "kind", "status", "layers", "experts", "params", "active", "peak/dev"),
                        left=("kind", "status", "experts"), compact=True)
            for p, status in zip(plans, todo):
                size = f" ({format_bytes(p.model['size_bytes'])})" if p.model else ""
                console.print(f"step {p.index} -> {p.output}{size}", highlight=False)
                if p.memory:
                    console.print(_memory_line(p.memory), highlight=False)
                for line in filter(None, (p.note, p.changed if status == "refused" else "")):
                    console.print(f"step {p.index}: {line}", highlight=False)
            return

        def report_step(step, status):
            if not json_out:
                verb = {"skip": "[dim]skip (complete)[/]", "start": "[bold]run[/]", "done": "[green]done[/]"}[status]
                console.print(f"step {step.index} {step.kind}: {verb}  -> {step.output}")

        from .pipeline.report import write_report

        state = execute(r, on_step=report_step)
        report, rows = write_report(r, state)
        if json_out:
            print_json({"report": str(report), "models": rows})
            return
        if not rows:  # no eval step: nothing scored to tabulate
            console.print(f"{recipe}: done, no eval step scored a model; report: {report}")
            return
        print_table(f"{recipe}: summary (report: {report})",
                    [(row["model"], str(row["layers"]), _compact(row["experts"]) or "dense", _params(row["total_params"]),
                      _params(row["active_params"]), f"{row['eval_ppl']:.2f}", f"{row['tokens_per_s']:,.0f}")
                     for row in rows],
                    ("model", "layers", "experts per MoE layer", "total", "active", "held-out ppl", "tokens/s"),
                    left=("model", "experts per MoE layer"))


def _memory_line(mem: dict) -> str:
    """One train/distill step's per-device plan (`MemoryPlan.to_dict`) in two short lines."""
    ckpt = "checkpointed" if mem["activation_checkpointing"] else "kept"
    parts = [f"params {format_bytes(mem['params'])}", f"grads {format_bytes(mem['grads'])}", f"AdamW {format_bytes(mem['optimizer'])}"]
    parts += [f"teacher {format_bytes(mem['teacher'])}"] if mem["teacher"] else []
    parts += [f"buffers {format_bytes(mem['buffers'])}", f"activations {format_bytes(mem['activations'])} "
              f"({format_bytes(mem['activations_checkpointed'])} checkpointed)"]
    total = mem["total_checkpointed"] if mem["activation_checkpointing"] else mem["total"]
    return (f"  {mem['engine']} x {mem['devices']}, micro-batch {mem['micro_batch']}: {', '.join(parts[:3])},\n"
            f"  {', '.join(parts[3:])}\n"
            f"  total {format_bytes(total)} per device (activations {ckpt}): "
            f"{'fits' if mem['fits'] else 'does not fit'} {format_bytes(mem['device_memory'])}")


def _compact(counts) -> str:
    """[32]*10 + [64]*2 -> '10x32 + 2x64'."""
    if not counts:
        return ""
    groups, prev, n = [], counts[0], 0
    for c in counts + [None]:
        if c == prev:
            n += 1
        else:
            groups.append(f"{n}x{prev}")
            prev, n = c, 1
    return " + ".join(groups)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

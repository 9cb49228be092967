"""The `moe-convert` command line: parse options, call one library function per command, print.

Only typer/rich are imported at module level so `moe-convert --help` answers at once; torch and
transformers are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="moe-convert",
    help="Dense LM -> PR-MoE (upcycle), Mixture-of-Students with staged KD (distill), and fast MoE export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="MoE layer and model speed against the anchors, as ratios.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)


@contextmanager
def reporting_errors():
    """Turn our own error type into a one-line message and exit code 2 (no traceback)."""
    from .errors import MoEConvertError

    try:
        yield
    except MoEConvertError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130)


def print_json(obj) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def not_yet(issue: int) -> None:
    err_console.print(f"[yellow]not implemented yet[/] (tracked in issue {issue})")
    raise typer.Exit(3)


@app.command()
def upcycle():
    """Dense HF checkpoint (hub id or local dir) -> PR-MoE checkpoint dir, streaming."""
    not_yet(3)


@app.command()
def train():
    """Continue training a dense or PR-MoE model with CE (+ aux loss)."""
    not_yet(4)


@app.command()
def distill():
    """MoE teacher -> shallower Mixture-of-Students with staged knowledge distillation."""
    not_yet(5)


@app.command()
def export():
    """Model dir -> inference layout (safetensors), HF dir, or DeepSpeed state dicts."""
    not_yet(6)


@app.command(name="eval")
def eval_():
    """Held-out loss, perplexity and tokens/s."""
    not_yet(4)


@app.command()
def inspect():
    """Layer table: experts per layer, total vs active params, dtype, size on disk."""
    not_yet(4)


@app.command()
def generate():
    """Text from an export through our inference kernels (KV-cache decoding)."""
    not_yet(6)


@bench_app.command("layer")
def bench_layer():
    """One MoE layer: ours vs DeepSpeed vs transformers vs the hardware floor."""
    not_yet(6)


@app.command()
def run():
    """Run a recipe: the steps above chained from one YAML file."""
    not_yet(7)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

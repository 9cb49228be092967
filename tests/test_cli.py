"""The CLI shell: fast --help, every command documented."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moe_convert.cli import app

COMMANDS = ["upcycle", "train", "distill", "export", "from-deepspeed", "eval", "inspect", "generate", "run", "bench"]


def test_help_imports_nothing_heavy():
    """`--help` stays instant because no command module pulls torch/transformers at import."""
    code = (
        "import sys; sys.argv = ['moe-convert', '--help']\n"
        "from moe_convert.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for cmd in COMMANDS:
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    result = CliRunner().invoke(app, [cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_json_output_is_strict_json(capsys):
    """NaN / infinity (an eval with no held-out windows) print as null: other tools' JSON parsers refuse NaN."""
    from moe_convert.cli import print_json

    print_json({"eval_loss": float("nan"), "rows": [1.5, float("inf"), {"ppl": float("-inf")}], "pair": (2, "x")})

    def refuse(name):
        raise ValueError(name)

    got = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert got == {"eval_loss": None, "rows": [1.5, None, {"ppl": None}], "pair": [2, "x"]}


def test_sigterm_removes_the_half_written_output(tmp_path):
    """A command killed with SIGTERM (kill, a scheduler, torchrun) cleans up as on Ctrl-C and exits 143."""
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from moe_convert.cli import reporting_errors\n"
        "from moe_convert.io import atomic_output_dir\n"
        "with reporting_errors():\n"
        "    with atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
        "        (tmp / 'half.safetensors').write_bytes(b'x' * 1000)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary sibling


def test_command_options_are_the_job_fields():
    """Each command's options come from its job dataclass, so a recipe step and the CLI take the same
    names and validate them alike."""
    import dataclasses

    from moe_convert.convert.config import ExportJob, FromDeepSpeedJob, UpcycleJob
    from moe_convert.inference.config import GenerateJob
    from moe_convert.training.config import EvalJob

    for cmd, job in [("upcycle", UpcycleJob), ("export", ExportJob), ("from-deepspeed", FromDeepSpeedJob),
                     ("eval", EvalJob), ("generate", GenerateJob)]:
        res = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "300"})
        for f in dataclasses.fields(job):
            if "help" in f.metadata:
                assert "--" + f.name.replace("_", "-") in res.output, (cmd, f.name)


def test_bad_option_value_names_the_field():
    res = CliRunner().invoke(app, ["upcycle", "x", "-o", "y", "--init", "noise:0"])
    assert res.exit_code == 2 and "init: 'noise:0' needs a finite SIGMA > 0" in res.output, res.output

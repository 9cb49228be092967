"""The CLI shell: fast --help, every command documented."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moe_convert.cli import app

COMMANDS = ["upcycle", "train", "distill", "export", "eval", "inspect", "generate", "run", "bench"]


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

"""Durable outputs: every file and directory reaches the disk before the rename that publishes it (upcycle,
export and from-deepspeed through `atomic_output_dir`; train/distill final models and checkpoints), and
what a killed run leaves beside its output is removed by the next run."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_convert import io
from moe_convert.cli import app
from moe_convert.io import atomic_output_dir

from test_train import DATA, SEQ, dense_dir, tokenizer, cache  # noqa: F401  (fixtures)


@pytest.fixture
def events(monkeypatch):
    """("fsync", path) and ("rename", src, dst) as they happen (the real calls still run)."""
    seen = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def recorded_fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorder(real):
        def renamed(src, dst, **kw):
            seen.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
            return real(src, dst, **kw)
        return renamed
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorder(replace))
    monkeypatch.setattr(os, "rename", recorder(rename))
    return seen


def synced_before(events, event, now: Path, then: Path, skip=()) -> None:
    """Every file and directory under `now` (and itself), but `skip`, was fsynced before `event`, when it lay
    under `then` (the rename's source)."""
    paths = {str(then / p.relative_to(now)) for p in [now, *now.rglob("*")] if p.name not in skip}
    before = {e[1] for e in events[:events.index(event)] if e[0] == "fsync"}
    assert paths <= before, sorted(paths - before)


def test_atomic_output_dir_syncs_files_then_renames_then_syncs_the_parent(tmp_path, events):
    out = tmp_path / "out"
    for overwrite in (False, True):
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "a.safetensors").write_bytes(b"1" * 100)
            (tmp / "sub" / "b.json").write_text("{}")
        publish = next(e for e in events if e[0] == "rename" and e[2] == str(out.resolve()))
        synced_before(events, publish, out.resolve(), Path(publish[1]))  # out holds what tmp held
        after = events[events.index(publish) + 1:]
        assert ("fsync", str(tmp_path.resolve())) in after  # the rename itself on disk
        events.clear()


def test_train_syncs_checkpoints_and_the_final_model_before_marking_them_complete(dense_dir, tmp_path, events):
    out = tmp_path / "run"
    args = ["train", str(dense_dir), "--data", DATA, "-o", str(out), "--seq-len", str(SEQ), "--batch-size", "4",
            "--steps", "4", "--save-every", "2", "--eval-every", "0", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ckpt = out / io.CHECKPOINTS / "step-000002"
    state = next(e for e in events if e[0] == "rename" and e[2] == str((ckpt / "trainer_state.json").resolve()))
    synced_before(events, state, ckpt.resolve(), ckpt.resolve(), skip={"trainer_state.json"})
    assert ("fsync", state[1]) in events[:events.index(state)]  # the state file itself
    config = next(e for e in events if e[0] == "rename" and e[2] == str((out / "config.json").resolve()))
    written = Path(config[1]).parent  # where save_pretrained wrote the final model's files
    moved = [e for e in events if e[0] == "rename" and Path(e[1]).parent == written and e != config]
    assert {Path(e[2]).name for e in moved} >= {"model.safetensors", "tokenizer.json", "generation_config.json"}
    assert all(("fsync", e[1]) in events[:events.index(e)] for e in [*moved, config])  # each file on disk first
    assert all(events.index(e) < events.index(config) for e in moved)  # config.json moves in last,
    assert ("fsync", str(out.resolve())) in events[events.index(moved[-1]):events.index(config)]  # the others on disk
    assert ("fsync", str(out.resolve())) in events[events.index(config) + 1:]


KILLED = textwrap.dedent("""
    import sys, time
    from moe_convert.io import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"0" * 1_000_000)
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_a_killed_runs_temporary_dir_is_removed_by_the_next_run(tmp_path, caplog):
    """SIGKILL skips every cleanup: the next run into the same output removes what is left and says so, and
    keeps a live run's temporary dir and another machine's."""
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True)
    left = Path(run.stdout.readline().strip())
    assert left.is_dir() and left.name.startswith(".out.tmp-")
    run.send_signal(signal.SIGKILL)
    run.wait()
    elsewhere = tmp_path / ".out.tmp-123-456@another-machine"
    elsewhere.mkdir()
    with caplog.at_level(logging.WARNING, logger="moe_convert"):
        with atomic_output_dir(out) as tmp:
            assert not left.exists() and elsewhere.is_dir()
            (tmp / "f").write_text("1")
            io.clean_stale_temporaries(out)  # another run into `out` now: this live run's dir stays
            assert tmp.is_dir()
    assert (out / "f").read_text() == "1" and elsewhere.is_dir()
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert f"removed {left} (1.0 MB), left by a run that is gone" in messages
    assert "another machine" in messages

"""Expert-parallel inference: 2 real processes (torchrun, gloo), each holding one rank's experts of an
`--ep-size 2` export, against the single-process runtime holding them all."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import conftest
from conftest import ROOT, tiny_prmoe
from moe_convert.errors import MoEConvertError
from moe_convert.inference.expert_parallel import from_environment
from moe_convert.convert.export import export
from test_runtime import save_tokenizer

WORKER = textwrap.dedent("""
    import sys
    import torch
    from moe_convert.inference.runtime import load_runtime

    for path in sys.argv[1:]:
        ep, full = load_runtime(path, expert_parallel=True), load_runtime(path)
        rank = ep.ep.rank
        held = [len(w["moe"].stacked.weights) if hasattr(w["moe"].stacked, "weights")
                else w["moe"].stacked["w_out"].shape[0] for w in ep.ffns if "moe" in w]
        assert held == [e["experts"] // 2 for e in ep.manifest["layers"]], held
        # each rank its own tokens, of its own length: rows cross between ranks unevenly
        ids = torch.randint(0, 101, (2, 9 + 4 * rank), generator=torch.Generator().manual_seed(100 + rank))
        err = float((ep.logits(ids) - full.logits(ids)).abs().max())
        assert err <= 1e-5, err
        prompt = ids[0, :5].tolist()  # rank 0's prompt decoded by the group, agreed token by token
        ours, ref = ep.generate(prompt, 8).tokens, full.generate(ids[0, :5].tolist(), 8).tokens
        print(f"rank {rank} {path}: max |dlogits| {err:.1e}, tokens {ours}", flush=True)
        if rank == 0:
            assert ours == ref, (ours, ref)
""")


def torchrun(*args, timeout=600):
    return conftest.torchrun(*args, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ep_exports(tmp_path_factory):
    """--ep-size 2 exports: GPT-2 top-1 dropless, and Llama top-2 with a capacity factor (tokens dropped
    per rank, as DeepSpeed computes capacity from each rank's own tokens)."""
    out = []
    for host, layout in [("gpt2", {}), ("llama", {"num_experts_per_tok": 2, "capacity_factor": 1.0})]:
        src = tmp_path_factory.mktemp(f"ep-src-{host}")
        tiny_prmoe(host, num_experts=(4, 6), seed=31, **layout).save_pretrained(src)
        save_tokenizer(src)
        export(src, src.parent / f"{src.name}-ep2", ep_size=2)
        out.append(src.parent / f"{src.name}-ep2")
    return out


def test_two_ranks_equal_one_process(ep_exports, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    done = torchrun(str(worker), *map(str, ep_exports))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("max |dlogits|") == 2 * len(ep_exports), done.stdout

    args = ["generate", str(ep_exports[0]), "--prompt", "w5 w9 w17", "--max-new-tokens", "6", "--json"]
    group = torchrun("-m", "moe_convert", *args)
    assert group.returncode == 0, group.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "moe_convert", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert json.loads(group.stdout)["tokens"] == json.loads(one.stdout)["tokens"]  # rank 0 alone prints


def test_a_rank_that_cannot_load_stops_the_group_with_one_line_each(ep_exports, tmp_path):
    import shutil

    broken = shutil.copytree(ep_exports[0], tmp_path / "broken")
    (broken / "experts-00001-of-00002.safetensors").unlink()
    done = torchrun("-m", "moe_convert", "generate", str(broken), "--prompt", "w5 w9", timeout=300)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and sorted(ours) == sorted([
        "error: expert-parallel rank 1 could not load its part of the export (its error is above)",
        f"error: {broken / 'experts-00001-of-00002.safetensors'} is missing"]), done.stderr[-3000:]
    assert "Connection closed" not in done.stderr  # rank 0 no longer waits in an all-to-all


def test_process_count_must_match_the_exports_ep_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MoEConvertError, match="3 processes, but the export has --ep-size 2"):
        from_environment(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert from_environment(2) is None  # one process joins the rank files

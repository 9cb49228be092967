"""Lazy checkpoint reader, streaming shard writer, atomic output dirs: checked against safetensors itself."""

import json
import platform
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_convert.errors import MoEConvertError
from moe_convert.io import (CHECKPOINTS, HUGE_PAGE, SAFE_INDEX, CheckpointReader, checkpoints,
                            collapse_into_huge_pages, ShardWriter, atomic_output_dir, copy_tokenizer_files,
                            keep_freed_memory_for_reuse, read_safetensors, return_freed_memory)
from moe_convert.options import parse_size


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(11, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(3, 4, 2, generator=g).half(),
        "d.ids": torch.randint(-50, 50, (9,), generator=g),
        "e.mask": torch.rand(6, generator=g) > 0.5,
        "f.scalar": torch.tensor(3.5),
        "g.big": torch.randn(40, 3, generator=g),
    }


def write(out, tensors, cap, blocks=False):
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, cap, metadata={"producer": "test"})
    w.begin([(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v.split(2) if blocks and v.dim() else v)  # row blocks concatenate along dim 0
    return w.finish()


def load_dir(out, files):
    got, meta = {}, []
    for f in files:
        with safe_open(str(out / f), framework="pt") as h:
            meta.append(h.metadata())
            got.update({k: h.get_tensor(k) for k in h.keys()})
    return got, meta


@pytest.mark.parametrize("cap", [10**9, 200])
def test_shard_writer_output_loads_with_safetensors(tmp_path, cap):
    tensors = random_tensors(torch.seed() % 2**31)
    files = write(tmp_path / "o", tensors, cap)
    got, meta = load_dir(tmp_path / "o", files)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert all(m == {"format": "pt", "producer": "test"} for m in meta)
    if cap == 10**9:
        assert files == ["model.safetensors"] and not (tmp_path / "o" / SAFE_INDEX).exists()
    else:
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "o" / SAFE_INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        for f in files:  # a shard over the cap holds exactly one (oversized) tensor
            names = [k for k, v in index["weight_map"].items() if v == f]
            size = sum(tensors[k].numel() * tensors[k].element_size() for k in names)
            assert size <= cap or len(names) == 1


def test_shard_writer_is_byte_identical_and_blocks_equal_whole(tmp_path):
    tensors = random_tensors(1)
    write(tmp_path / "a", tensors, 300)
    write(tmp_path / "b", tensors, 300, blocks=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_shard_writer_rejects_out_of_plan_writes(tmp_path):
    w = ShardWriter(tmp_path, 100)
    w.begin([("x", (2, 3), torch.float32), ("y", (4,), torch.float32)])
    with pytest.raises(ValueError, match="expected 'x'"):
        w.write("y", torch.zeros(4))
    with pytest.raises(ValueError, match="planned"):
        w.write("x", torch.zeros(2, 3, dtype=torch.float16))
    w.write("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="never written"):
        w.finish()
    w.close()


def test_reader_single_sharded_and_bin(tmp_path):
    tensors = random_tensors(2)
    for name, cap in (("single", 10**9), ("sharded", 200)):
        d = tmp_path / name
        write(d, tensors, cap)
        (d / "config.json").write_text('{"model_type": "gpt2"}')
    for name, zipped in (("bin", True), ("legacy_bin", False)):  # torch's zip format, and the pre-1.6 one
        d = tmp_path / name
        d.mkdir()
        torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
        (d / "config.json").write_text('{"model_type": "gpt2"}')
    for name in ("single", "sharded", "bin", "legacy_bin"):
        r = CheckpointReader(tmp_path / name)
        assert r.config == {"model_type": "gpt2"} and sorted(r.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(r.get(k), v) and r.shape(k) == v.shape and r.dtype(k) == v.dtype


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(MoEConvertError, match="no config.json"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MoEConvertError, match="has no model.safetensors"):
        CheckpointReader(tmp_path)
    save_file(random_tensors(3), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 17])
    with pytest.raises(MoEConvertError, match="model.safetensors.*truncated or corrupt"):
        CheckpointReader(tmp_path)


def test_reader_of_a_config_or_index_that_is_no_such_thing(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MoEConvertError, match="is not a model config"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    for text in ("{not json", '{"metadata": {}}'):
        (tmp_path / SAFE_INDEX).write_text(text)
        with pytest.raises(MoEConvertError, match="is not a shard index"):
            CheckpointReader(tmp_path)


def test_reader_of_a_stale_index_names_the_tensor(tmp_path):
    tensors = random_tensors(4)
    write(tmp_path, tensors, 200)  # sharded, with an index
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    name = next(iter(tensors))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]  # a shard that does not hold it
    (tmp_path / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(MoEConvertError, match=f"has no tensor '{name}', though the index puts it there"):
        CheckpointReader(tmp_path).dtype(name)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                       ("1234", 1234), ("1.5kb", 1500), (77, 77)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "GB", "-3MB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(MoEConvertError, match="size"):
        parse_size(text)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(MoEConvertError, match="already exists"):
        with atomic_output_dir(out):
            pass
    for exc in (RuntimeError, KeyboardInterrupt):  # a failed overwrite keeps the old dir, leaves no temp
        with pytest.raises(exc):
            with atomic_output_dir(out, overwrite=True) as tmp:
                (tmp / "f").write_text("2")
                raise exc()
        assert (out / "f").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["g"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_copy_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    wanted = ["generation_config.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json"]
    for n in wanted + ["config.json", "model.safetensors"]:
        (src / n).write_text(n)
    assert copy_tokenizer_files(src, dst) == wanted
    assert sorted(p.name for p in dst.iterdir()) == wanted and (dst / "vocab.json").read_text() == "vocab.json"


def test_read_safetensors_owns_what_safe_open_reads(tmp_path):
    """Plain-read tensors (every dtype we write, empty ones too) equal safetensors' own, and own their memory."""
    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(7, 5, generator=g), "h": torch.randn(4, generator=g).bfloat16(),
               "f": torch.randn(3, 3, generator=g).half(), "i": torch.randint(-9, 9, (6,), generator=g),
               "b": torch.rand(5, generator=g) > 0.5, "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    got = read_safetensors(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert set(got) == set(f.keys())
        for k in f.keys():
            assert got[k].dtype == f.get_tensor(k).dtype and torch.equal(got[k], f.get_tensor(k))
    got["w"].add_(1)  # writable, private memory: the file keeps its values
    assert torch.equal(read_safetensors(tmp_path / "x.safetensors")["w"], tensors["w"])


def test_read_safetensors_truncated_or_corrupt_is_one_line(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    for name, cut in [("short.safetensors", data[: len(data) - 100]), ("header.safetensors", data[:20]),
                      ("empty.safetensors", b"")]:
        (tmp_path / name).write_bytes(cut)
        with pytest.raises(MoEConvertError, match=f"cannot read .*{name}.*truncated or corrupt"):
            read_safetensors(tmp_path / name)
    with pytest.raises(MoEConvertError, match="missing"):
        read_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_inference_heap_settings():
    assert keep_freed_memory_for_reuse() is True
    return_freed_memory()  # malloc_trim: callable, returns nothing


def _huge_page_bytes_over(start: int, end: int) -> int:
    """AnonHugePages of the mappings that overlap [start, end) (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < end and hi > start
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def _can_collapse() -> bool:
    """Linux >= 6.1 (MADV_COLLAPSE) with transparent huge pages not switched off."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    major, minor = (int(v) for v in platform.release().split(".")[:2])
    return platform.system() == "Linux" and (major, minor) >= (6, 1) and thp.exists() and "[never]" not in thp.read_text()


def test_collapse_into_huge_pages_keeps_contents_and_skips_thin_pages():
    t = torch.randn(5 * HUGE_PAGE // 4)  # 5 MiB of fp32, at whatever alignment the allocator gave
    before = t.clone()
    start, size = t.data_ptr(), t.numel() * 4
    full = (start + size) // HUGE_PAGE - -(-start // HUGE_PAGE)  # huge pages wholly inside: 1 or 2
    done = collapse_into_huge_pages([(start, size)])
    assert torch.equal(t, before)
    assert done % HUGE_PAGE == 0 and done <= (full + 2) * HUGE_PAGE
    if _can_collapse():
        assert done >= full * HUGE_PAGE and _huge_page_bytes_over(start, start + size) >= done
    # a region that fills little of any huge page is left alone
    assert collapse_into_huge_pages([(start, HUGE_PAGE // 4)]) == 0


def test_checkpoints_come_in_step_order(tmp_path):
    """Past step 999999 the names outgrow their zero padding: newest is by step number, not by name."""
    for step in (999_999, 1_000_000, 12):
        d = tmp_path / CHECKPOINTS / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
    (tmp_path / CHECKPOINTS / "step-000013").mkdir()  # no trainer_state.json: incomplete, left out
    assert [p.name for p in checkpoints(tmp_path)] == ["step-000012", "step-999999", "step-1000000"]

"""Checkpoint I/O that never holds more than one tensor: lazy reader, streaming shard writer, atomic dirs.

`CheckpointReader` opens a Hugging Face model directory (single or sharded safetensors, or a
`.bin` through `torch.load(weights_only=True)`) and reads one tensor at a time. `ShardWriter`
knows every output tensor's name, shape and dtype before the first byte is written, so it writes
each shard's safetensors header first and appends tensors (or row-slices of them) as they are
produced (mergekit's lazy loader and tensor writer). `atomic_output_dir` builds an output under a
temporary name and renames it when complete. `read_safetensors` reads a whole file into memory the
process owns (no mmap), for the inference runtime, which repacks every weight at load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import struct
import sys
from glob import escape as glob_escape
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .errors import MoEConvertError, one_line
from .options import format_bytes

log = logging.getLogger("moe_convert")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# `options.DTYPE_NAMES` (--dtype, save_dtype, teacher_dtype) -> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch dtype <-> the safetensors header's dtype string
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}  # and back

# Files a tokenizer (and generation) needs beside the weights; copied verbatim to an output dir.
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "spiece.model", "generation_config.json")


def cast_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` when it is floating point; integer and bool tensors stay as they are."""
    return t.to(dtype) if t.is_floating_point() else t


CHECKPOINTS = "checkpoints"  # a train/distill output's checkpoint folder


def cache_root() -> Path:
    """Where moe-convert keeps what it can rebuild (native builds in `native/`, packed data in `data/`):
    `$MOE_CONVERT_CACHE`, default `~/.cache/moe-convert`."""
    return Path(os.environ.get("MOE_CONVERT_CACHE") or Path.home() / ".cache" / "moe-convert")


def checkpoints(out_dir: Path) -> list[Path]:
    """A train/distill output's complete checkpoints (trainer_state.json written last), oldest first: by step
    number (`step-1000000` comes after `step-999999`, which a sort by name would not give)."""
    found = [p.parent for p in (out_dir / CHECKPOINTS).glob("step-*/trainer_state.json")]
    return sorted((p for p in found if p.name[len("step-"):].isdigit()), key=lambda p: int(p.name[len("step-"):]))


def unfinished_run_hint(path: Path) -> str:
    """For a message about a directory that is not a model: what it is instead when it is a train/distill
    output stopped before its last step (checkpoints, no final model yet); else ""."""
    steps = checkpoints(path) if path.is_dir() else []
    if not steps or (path / "config.json").is_file():
        return ""
    return f"; it is an unfinished training run (checkpoint {steps[-1].name}): finish it with --resume"


def open_safetensors(file: Path):
    """A lazy `safe_open` handle; a missing, truncated or corrupt file is a one-line error naming it."""
    from safetensors import safe_open

    if not file.is_file():
        raise MoEConvertError(f"{file} is missing")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors' errors on a truncated/corrupt header or data section
        raise MoEConvertError(f"cannot read {file}: {one_line(e)}"
                              " (truncated or corrupt?)") from None


class SafetensorsFile:
    """A safetensors file's header, read once; its tensors (or row ranges of them) read with plain file reads.

    No mmap: a mapped file keeps every page the process touched in its RSS for as long as the file is
    open (or any tensor from it lives), so a reader of a model's shards would grow to the model's size.
    A missing, truncated or corrupt file is a one-line error naming it.
    """

    def __init__(self, file: Path):
        self.file = file
        if not file.is_file():
            raise MoEConvertError(f"{file} is missing")
        size = file.stat().st_size
        with open(file, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
            except (struct.error, ValueError):
                raise self._corrupt("bad header") from None
        if not isinstance(header, dict):
            raise self._corrupt("bad header")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> dtype, shape, file offsets
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in TORCH_DTYPES or 8 + n + end > size:
                raise self._corrupt(f"tensor {name} is {entry['dtype']} at bytes {begin}..{end} of the data")
            self.entries[name] = TORCH_DTYPES[entry["dtype"]], entry["shape"], 8 + n + begin, 8 + n + end

    def _corrupt(self, why: str) -> MoEConvertError:
        return MoEConvertError(f"cannot read {self.file}: {why} (truncated or corrupt?)")

    def get(self, name: str, rows: tuple[int, int] | None = None, f=None) -> torch.Tensor:
        """Tensor `name`, or its rows `rows[0]:rows[1]` along dim 0, in memory this process owns."""
        dtype, shape, begin, end = self.entries[name]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            shape = [max(0, stop - start), *shape[1:]]
            begin, end = begin + start * row_bytes, begin + max(start, stop) * row_bytes
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.file, "rb") if f is None else contextlib.nullcontext(f) as fh:
            fh.seek(begin)
            if fh.readinto(raw.numpy()) != end - begin:
                raise self._corrupt(f"tensor {name} is cut short")
        return raw.view(dtype).reshape(shape)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read with plain file reads into memory this process owns
    (`SafetensorsFile`; the runtime repacks every weight at load, so a mapped copy would only add to RSS)."""
    sf = SafetensorsFile(file)
    with open(file, "rb") as f:
        return {name: sf.get(name, f=f) for name in sf.entries}


def keep_freed_memory_for_reuse() -> bool:
    """Let glibc keep freed heap memory for the next allocation instead of handing it back at once.

    Inference allocates the same tens of MB of activations every forward; by default glibc trims the
    top of the heap and maps fresh pages again, and the page faults cost 10-25 ms of system time per
    T=4096 MoE layer. With these settings (`M_TRIM_THRESHOLD` 256 MiB, `M_MMAP_THRESHOLD` 32 MiB, the
    largest glibc takes) the layer ran 6-8% faster at E=8 (docs/benchmarks.md). True when glibc took them.
    """
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt and mallopt(M_TRIM_THRESHOLD, 256 * 2**20) and mallopt(M_MMAP_THRESHOLD, 32 * 2**20))


def return_freed_memory() -> None:
    """Hand heap pages freed by large temporaries back to the OS (glibc's `malloc_trim`; elsewhere a no-op).

    glibc keeps freed heap memory in the process: after the runtime packs its weights (each packed
    copy made while its source is freed) RSS would otherwise stay near twice the model's size.
    """
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


HUGE_PAGE = 2 * 2**20  # a transparent huge page on x86-64 and most arm64 kernels
# Least share of a huge page the given regions must fill for it to be collapsed: the rest of it is
# other heap memory, made resident with it (at most this much waste).
HUGE_PAGE_MIN_SHARE = 0.9


def collapse_into_huge_pages(regions: Iterable[tuple[int, int]]) -> int:
    """Back the memory of `regions` ((address, bytes) each) with transparent huge pages, now; bytes collapsed.

    torch's `THP_MEM_ALLOC_ENABLE` asks for huge pages, but it aligns allocations to 4 KiB, so a
    4 MiB weight matrix lies on one huge page and 4 KiB pages for the rest. Here every 2 MiB-aligned
    page the regions fill at least `HUGE_PAGE_MIN_SHARE` of (e.g. one shared by two adjacent matrices)
    is marked for huge pages and collapsed into one (Linux >= 6.1 `MADV_COLLAPSE`; addresses and
    contents stay as they are). The MoE layer then ran 0-7% faster, most at E=128, where its 1 GB of
    experts streams from DRAM (docs/benchmarks.md). Where the kernel refuses (older, THP off, memory short)
    nothing changes.
    """
    import ctypes

    madvise = getattr(ctypes.CDLL(None), "madvise", None) if sys.platform.startswith("linux") else None
    if madvise is None:
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <sys/mman.h>
    filled: dict[int, int] = {}  # huge page index -> bytes of the regions in it
    for start, size in regions:
        for page in range(start // HUGE_PAGE, (start + size - 1) // HUGE_PAGE + 1):
            overlap = min(start + size, (page + 1) * HUGE_PAGE) - max(start, page * HUGE_PAGE)
            filled[page] = filled.get(page, 0) + overlap
    pages = [p * HUGE_PAGE for p, n in sorted(filled.items()) if n >= HUGE_PAGE_MIN_SHARE * HUGE_PAGE]
    return HUGE_PAGE * sum(madvise(a, HUGE_PAGE, MADV_HUGEPAGE) == 0 and madvise(a, HUGE_PAGE, MADV_COLLAPSE) == 0
                           for a in pages)


class CheckpointReader:
    """A model directory's tensors by name, each read on demand (never a whole shard)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MoEConvertError(f"{self.path} has no config.json: not a model directory"
                                  + unfinished_run_hint(self.path))
        try:
            self.config: dict = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoEConvertError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(self.config, dict):
            raise MoEConvertError(f"{config_file} is not a model config (a JSON object)")
        self._handles: dict[Path, object] = {}  # SafetensorsFile headers / mmap'ed .bin dicts
        found, weight_map = _find_weights(self.path)
        self._file_of: dict[str, Path] = (  # tensor name -> file holding it
            {name: found for name in self._names(found)} if weight_map is None else weight_map)

    def files(self) -> list[Path]:
        """The weight files the model is read from (not other formats or copies beside them)."""
        return sorted(set(self._file_of.values()))

    def _open(self, file: Path):
        if file not in self._handles:
            if file.suffix == ".safetensors":
                self._handles[file] = SafetensorsFile(file)
            elif not file.is_file():
                raise MoEConvertError(f"{file} is missing")
            else:  # pickled state dict: tensors only, memory-mapped so nothing is read up front
                self._handles[file] = self._load_pickled(file)
        return self._handles[file]

    @staticmethod
    def _load_pickled(file: Path) -> dict:
        """A torch.save'd state dict, memory-mapped; one saved in torch's pre-1.6 format cannot be, so it
        is read whole (the only case that holds a shard in memory)."""
        try:
            try:
                return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used with files saved with" not in str(e):
                    raise
                return torch.load(file, map_location="cpu", weights_only=True)  # legacy: no zip archive to map
        except Exception as e:  # pickle errors on truncated or corrupt files
            raise MoEConvertError(f"cannot read {file}: {one_line(e)}"
                                  " (truncated or corrupt?)") from None

    def _names(self, file: Path) -> list[str]:
        handle = self._open(file)
        return list(handle.entries if isinstance(handle, SafetensorsFile) else handle)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _stored(self, name: str):
        """(the open file holding `name`, whether it is safetensors); an index naming the wrong shard is an error."""
        file = self._file_of[name]
        handle = self._open(file)
        if name not in (handle.entries if isinstance(handle, SafetensorsFile) else handle):
            raise MoEConvertError(f"{file} has no tensor {name!r}, though the index puts it there")
        return handle

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name`, or only its rows `rows[0]:rows[1]` along dim 0 (one expert of a stacked tensor)."""
        handle = self._stored(name)
        if isinstance(handle, SafetensorsFile):
            return handle.get(name, rows)
        return handle[name] if rows is None else handle[name][rows[0]:rows[1]]  # memory-mapped: reads only those rows

    def _meta(self, name: str) -> tuple[torch.Size, torch.dtype]:
        handle = self._stored(name)
        if isinstance(handle, SafetensorsFile):
            dtype, shape, _, _ = handle.entries[name]
            return torch.Size(shape), dtype
        return handle[name].shape, handle[name].dtype

    def shape(self, name: str) -> torch.Size:
        return self._meta(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta(name)[1]


def _find_weights(path: Path) -> tuple[Path, dict[str, Path] | None]:
    """Where a model directory's weights are: (its single weights file, None), or (its shard index,
    tensor name -> shard), safetensors before .bin, as transformers looks."""
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                return path / index, {name: path / f for name, f in weight_map.items()}
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise MoEConvertError(f"{path / index} is not a shard index (JSON with a weight_map "
                                      f"of tensor -> file)") from None
        if (path / single).is_file():
            return path / single, None
    raise MoEConvertError(f"{path} has no {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}")


def model_weight_files(path: Path) -> list[Path]:
    """The weight files a model directory is loaded from (`CheckpointReader.files`), found without opening
    any: other formats and checkpoints beside them (a hub snapshot's .bin, a trainer's optimizer.pt) are
    not its weights. None for a directory without weights (a config alone)."""
    if not any((path / f).is_file() for f in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)):
        return []
    found, weight_map = _find_weights(path)
    return [found] if weight_map is None else sorted(set(weight_map.values()))


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    begin: int  # byte offset inside the shard's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _shard_name(i: int, n: int) -> str:
    return SAFE_WEIGHTS if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Writes a planned set of tensors into size-capped safetensors shards, streaming.

    Usage: `w = ShardWriter(out, parse_size("5GB")); w.begin(plan)` with `plan` a list of
    `(name, shape, dtype)` in write order; then `w.write(name, tensor)` for each, in plan order (a
    tensor may also be given as an iterable of row blocks that concatenate along dim 0, so a
    stacked `[E, ...]` tensor is never whole in memory); `w.finish()` writes the index last.
    A shard is cut before a tensor that would push it past `max_shard_bytes` (one tensor larger
    than the cap gets a shard of its own). Identical input gives byte-identical files.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.slots: list[_Slot] = []
        self.files: list[str] = []
        self._next = 0  # index of the next slot to write
        self._file = None  # open shard being filled
        self._file_shard = -1  # which shard `_file` is
        self._written = 0  # bytes written into the current slot

    def begin(self, plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        shard, used = 0, 0
        for name, shape, dtype in plan:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors encoding")
            nbytes = math.prod(shape) * dtype.itemsize
            if used and used + nbytes > self.max_shard_bytes:
                shard, used = shard + 1, 0
            self.slots.append(_Slot(name, tuple(int(s) for s in shape), dtype, shard, used, used + nbytes))
            used += nbytes
        n = self.slots[-1].shard + 1 if self.slots else 1
        self.files = [_shard_name(i, n) for i in range(n)]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def _header(self, shard: int) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        for s in self.slots:
            if s.shard == shard:
                header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                                  "data_offsets": [s.begin, s.end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor]) -> None:
        if self._next >= len(self.slots) or self.slots[self._next].name != name:
            expected = self.slots[self._next].name if self._next < len(self.slots) else "nothing"
            raise ValueError(f"ShardWriter: got {name!r}, expected {expected!r} (write in plan order)")
        slot = self.slots[self._next]
        if self._file_shard != slot.shard:
            self._close_file()
            self._file, self._file_shard = open(self.out_dir / self.files[slot.shard], "wb"), slot.shard
            self._file.write(self._header(slot.shard))
        self._written = 0
        for block in ([data] if isinstance(data, torch.Tensor) else data):
            self._append(slot, block)
        if self._written != slot.nbytes:
            raise ValueError(f"ShardWriter: {name} got {self._written} bytes, planned {slot.nbytes}")
        self._next += 1

    def _append(self, slot: _Slot, block: torch.Tensor) -> None:
        whole = tuple(block.shape) == slot.shape
        if block.dtype != slot.dtype or not (whole or tuple(block.shape[1:]) == slot.shape[1:]):
            raise ValueError(f"ShardWriter: {slot.name} planned {slot.shape} {slot.dtype}, "
                             f"got a block {tuple(block.shape)} {block.dtype}")
        raw = block.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._written += raw.nbytes
        if self._written > slot.nbytes:
            raise ValueError(f"ShardWriter: {slot.name} got more bytes than its planned {slot.nbytes}")
        self._file.write(memoryview(raw))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard and write the index (when sharded); returns the shard file names."""
        if self._next != len(self.slots):
            raise ValueError(f"ShardWriter: {len(self.slots) - self._next} planned tensors were never written")
        self._close_file()
        if not self.slots:  # an empty plan still gives a valid (empty) safetensors file
            (self.out_dir / self.files[0]).write_bytes(self._header(0))
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {s.name: self.files[s.shard] for s in self.slots}}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self.files)

    def close(self) -> None:
        """Release the open file without finishing (after an error)."""
        self._close_file()


def check_output_apart(out: str | Path, inputs) -> None:
    """Refuse an output directory that is one of the existing `inputs` or holds one: writing or
    replacing it would destroy what the command reads."""
    o = Path(out).resolve()
    if o == Path.cwd() or o in Path.cwd().parents:
        raise MoEConvertError(f"output {str(out) or '.'} is the working directory or holds it; choose another output")
    for i in inputs:
        p = Path(i).resolve()
        if p.exists() and (o == p or o in p.parents):
            raise MoEConvertError(f"output {out} {'is' if o == p else 'contains'} the input {i}; choose another output")


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Every file under `directory` to disk, then every directory's entries, deepest first: after it, a
    rename that publishes `directory` cannot outlive a power loss while its contents do not."""
    directories = []
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(Path(root) / name)
        directories.append(Path(root))
    for d in reversed(directories):
        fsync_path(d)


def durable_replace(src: Path, dst: Path) -> None:
    """`os.replace(src, dst)` of a file or directory already on disk (`fsync_tree`), then the rename too."""
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def _run_tag() -> str:
    """This process on this machine, as temporary names carry it: `<pid>-<start time>@<host>` (the start
    time tells a live process from a later one that reuses a dead one's pid)."""
    return f"{os.getpid()}-{int(psutil.Process().create_time())}@{socket.gethostname()}"


def _tag_is_gone(tag: str) -> bool | None:
    """Whether the process of a `_run_tag` has ended; None if it ran on another machine (unknowable here)."""
    who, _, host = tag.partition("@")
    pid, _, start = who.partition("-")
    if host != socket.gethostname() or not pid.isdigit() or not start.isdigit():
        return None
    try:
        return int(psutil.Process(int(pid)).create_time()) != int(start)
    except psutil.NoSuchProcess:
        return True


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def clean_stale_temporaries(out: Path) -> None:
    """Remove what killed runs into `out` left beside it (`.OUT.tmp-<tag>`, `.OUT.old-<tag>`: SIGKILL or a
    power loss skip the cleanup), saying so with the bytes freed; another machine's are only reported."""
    left = [p for kind in ("tmp", "old") for p in out.parent.glob(f".{glob_escape(out.name)}.{kind}-*")]
    for path in sorted(left):
        gone = _tag_is_gone(path.name.split("-", 1)[1])
        size = _tree_bytes(path) if path.is_dir() else path.stat().st_size
        if gone:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.warning("removed %s (%s), left by a run that is gone", path, format_bytes(size))
        elif gone is None:
            log.warning("%s (%s) was left by a run on another machine; remove it if that run is over",
                        path, format_bytes(size))


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs=()):
    """Yield a temporary sibling of `out` to fill; it becomes `out` only if the block completes.

    An existing `out` is refused unless `overwrite` (and then replaced only at the very end), and so
    is an `out` that is or holds one of `inputs`. On any failure or interrupt the temporary
    directory is removed, so nothing that looks like a finished checkpoint is left behind; what a
    killed run left is removed by the next one (`clean_stale_temporaries`). Durable: every file
    and directory is on disk before the rename that publishes them, and the rename before this returns.
    """
    out = Path(out)
    check_output_apart(out, inputs)
    if out.exists() and not overwrite:
        raise MoEConvertError(f"output {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)
    tag = _run_tag()
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            durable_replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            durable_replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_umask(directory: Path) -> None:
    """Give every file under `directory` the mode a new file gets here (0644 under the usual umask):
    transformers' `save_pretrained` writes weights 0600, which other users and services cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def write_model_files(model, config, out_dir: Path, tokenizer_from: str | Path) -> None:
    """The files of our model directory beside its weights: the modeling code (for `trust_remote_code`,
    with `auto_map` in the config), config.json, and the tokenizer files of `tokenizer_from`."""
    from transformers.dynamic_module_utils import custom_object_save

    custom_object_save(model, out_dir, config=config)
    config.save_pretrained(out_dir)
    copy_tokenizer_files(tokenizer_from, out_dir)


def _names_no_tokenizer_class(dst: Path, names: list[str]) -> bool:
    """Neither tokenizer.json nor a tokenizer_config.json with `tokenizer_class` among the copied files."""
    if "tokenizer.json" in names:
        return False
    if "tokenizer_config.json" not in names:
        return True
    try:
        return "tokenizer_class" not in json.loads((dst / "tokenizer_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model directory; a one-line error when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise MoEConvertError(f"model: {path} is not a model directory")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise MoEConvertError(f"tokenizer: {path} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
                              + unfinished_run_hint(path))
    from transformers import AutoTokenizer  # here: `io` loads without transformers

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # files it cannot build a tokenizer from
        raise MoEConvertError(f"tokenizer: could not load the tokenizer in {path}: {one_line(e)}") from None


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files and generation_config.json found in `src` to `dst`; returns their names.

    A tokenizer of vocab.json + merges.txt whose files do not name its class (no tokenizer.json, no
    `tokenizer_class` in tokenizer_config.json) gets it from `src`'s config.json, which `dst` does not
    share (a PR-MoE model, an export without config.json): it is loaded from `src` and saved in full
    into `dst` (tokenizer_config.json naming the class, tokenizer.json).
    """
    src, dst = Path(src), Path(dst)
    names = _tokenizer_files(src)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    if any(n.startswith(("vocab", "merges")) for n in names) and _names_no_tokenizer_class(dst, names):
        try:
            load_tokenizer(src).save_pretrained(str(dst))
        except MoEConvertError:  # not loadable in `src` either: left as found
            return names
        names = _tokenizer_files(dst)  # the copies and what save_pretrained added
    return names


def _tokenizer_files(directory: Path) -> list[str]:
    return sorted({p.name for pattern in TOKENIZER_FILES for p in directory.glob(pattern) if p.is_file()})

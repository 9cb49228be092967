"""Options as validated dataclass fields, and the plain checks every stage's options share.

Pure Python (no torch) so the CLI builds its options from these fields, and recipes validate their
steps, before anything heavy loads. Every check raises `MoEConvertError` naming the field and what
is allowed.
"""

from __future__ import annotations

import re
from dataclasses import field, fields

from .errors import MoEConvertError

MAX_SEED = 2**32 - 1  # numpy's seeds (Accelerate's set_seed seeds numpy too) stop here
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # what every --dtype takes (`io.DTYPES` maps them to torch dtypes)
FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}  # annotation -> accepted types
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def option(default, help: str):
    """A dataclass field that is also a CLI option: its default and its --help text."""
    return field(default=default, metadata={"help": help})


def check_types(obj) -> None:
    """Each scalar field must have its annotated type, `X | None` allowing None (recipes and overrides
    are YAML: a quoted number or `yes` would otherwise slip through)."""
    for f in fields(obj):
        kind = f.type.removesuffix(" | None")
        value, allowed = getattr(obj, f.name), FIELD_TYPES.get(kind)
        if allowed is None or (value is None and kind != f.type):
            continue
        if isinstance(value, bool) != (kind == "bool") or not isinstance(value, allowed):
            raise MoEConvertError(f"{f.name}: expected {f.type}, got {value!r}")


def check_seed(seed: int | None, name: str = "seed") -> None:
    """A seed every generator we seed accepts: 0..MAX_SEED (None: no seed)."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise MoEConvertError(f"{name}: must be in 0..{MAX_SEED}, got {seed}")


def check_dtype_choice(dtype: str) -> None:
    """A `--dtype` that takes `auto` (keep the source's) or one of `DTYPE_NAMES`."""
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise MoEConvertError(f"--dtype {dtype!r} is not known; choose one of auto, {', '.join(DTYPE_NAMES)}")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, '500MB', '1024' (bytes); as transformers' max_shard_size."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if unit not in _SIZE_UNITS:
        raise MoEConvertError(f"size: expected a number of bytes or e.g. 5GB, 500MB, 2GiB, got {text!r}")
    size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise MoEConvertError(f"size: must be at least 1 byte, got {text!r}")
    return size


def format_bytes(n: int | None) -> str:
    """n bytes in decimal units: "5.2 GB"; "-" for None (a size not known)."""
    if n is None:
        return "-"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"

"""A GGUF file (llama.cpp's format) as a source: transformers reads it and dequantizes it into a regular
model, written once as a safetensors directory into the cache, keyed by the file's content hash. The hash
is computed once per (path, size, modification time) and remembered beside the cache: a GGUF of tens of
GB is not read whole again on every use.

Why a directory and not the in-memory model: every reader in this package streams safetensors tensor by
tensor (`io.CheckpointReader`); the dequantized copy gives it exactly that, and later runs reuse it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import MoEConvertError, one_line
from ..io import atomic_output_dir, cache_root

GGUF_SUFFIX = ".gguf"
_HASH_PREFIX = 16  # hex digits of the sha256 naming the cached directory


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _content_key(path: Path) -> str:
    """The first `_HASH_PREFIX` hex digits of the file's sha256, read back from `cache_root()/gguf/hashes/` when
    this path was hashed before at the same size and modification time."""
    st = path.stat()
    memo = cache_root() / "gguf" / "hashes" / hashlib.sha256(
        f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:_HASH_PREFIX]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = file_sha256(path)[:_HASH_PREFIX]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def is_gguf(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def gguf_to_dir(gguf_file: str | Path) -> Path:
    """The dequantized model directory of `gguf_file` (fp32 safetensors, config, tokenizer), built on first use
    under `cache_root()/gguf/<stem>-<sha256 prefix>`."""
    path = Path(gguf_file).expanduser().resolve()
    out = cache_root() / "gguf" / f"{path.stem}-{_content_key(path)}"
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise MoEConvertError(f"{path.name}: reading GGUF needs the gguf package: pip install 'moe-convert[gguf]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise MoEConvertError(f"{path.name}: transformers could not read this GGUF file: {one_line(e)}") from None
    # the weights are plain fp32 tensors now; only the loader's record of the GGUF quantization blocks saving
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out

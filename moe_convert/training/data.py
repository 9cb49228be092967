"""Text data for every command that reads it: load documents, split, tokenize, pack, cache.

`--data` is one of
- `builtin:pydoc`: the built-in corpus, the English prose of the Python language reference that
  ships with every CPython (`pydoc_data.topics`, ~0.5 MB); one document per paragraph. Nothing is
  downloaded and no text is vendored in this repository. (The exact text follows the Python
  version, so record it next to anything trained on it.)
- a local `.txt` (one document per paragraph), `.json`/`.jsonl` (one per record, `--text-field`),
  `.parquet` file (one per row, `--text-field`), or a directory of such files, read through `datasets`;
- otherwise a dataset name on the Hugging Face hub (its `train` split), where the hub is reachable.

Documents are stripped of surrounding whitespace; empty ones are skipped.

Split: a document is held out when `crc32(utf-8 text) % 10000 < eval_fraction * 10000`. The rule
depends on nothing but the text, so it is the same for every tokenizer, window length and file order,
and a duplicated paragraph never sits on both sides. Each split is tokenized, every document
followed by the tokenizer's EOS token, concatenated and cut into windows of `seq_len` tokens (the
remainder dropped). The packed windows are cached under `$MOE_CONVERT_CACHE/data` (default
`~/.cache/moe-convert`), keyed by the data's fingerprint, the tokenizer, `seq_len` and the split,
so a second run does not re-tokenize.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MoEConvertError, one_line
from ..io import cache_root

BUILTIN_PREFIX = "builtin:"
CACHE_FORMAT = 1  # bump when the packing rule changes: old cache entries are then ignored
# file suffix -> (datasets builder, builder options)
FILE_BUILDERS = {
    ".txt": ("text", {"sample_by": "paragraph"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def _pydoc_documents() -> list[str]:
    """The Python language reference's prose, one document per paragraph, topics in sorted order."""
    from pydoc_data.topics import topics

    return [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]


BUILTIN_CORPORA = {"pydoc": _pydoc_documents}


class Documents:
    """The documents of a `--data` source and a fingerprint that changes whenever they may have.

    `texts` are read on first use: a cached packing needs only the fingerprint (for local files,
    their names, sizes and modification times), so a cache hit never reads the corpus.
    """

    def __init__(self, read: Callable[[], list[str]], fingerprint: str):
        self._read, self.fingerprint = read, fingerprint

    @functools.cached_property
    def texts(self) -> list[str]:
        return self._read()


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS)
        if not files:
            raise MoEConvertError(f"data: directory {path} holds no {'/'.join(FILE_BUILDERS)} files")
    if path.is_file() and path.suffix not in FILE_BUILDERS:
        raise MoEConvertError(f"data: {path} has suffix {path.suffix!r}; supported: {', '.join(FILE_BUILDERS)}")
    kinds = {FILE_BUILDERS[f.suffix][0] for f in files}
    if len(kinds) > 1:
        raise MoEConvertError(f"data: directory {path} mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    for f in files:
        if f.stat().st_size == 0:
            raise MoEConvertError(f"data: {f} is empty")
    return files


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise MoEConvertError(
            f"data: {where} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
            "pick one with --text-field"
        )
    return [t.strip() for t in ds[text_field] if isinstance(t, str) and t.strip()]


def check_data_source(source: str, offline_hub_ok: bool = False) -> None:
    """`--data source` names something `load_documents` can try, checked without reading it (a recipe checks
    every step's data before any work): a built-in corpus, an existing local path, or a hub dataset name
    while the hub is reachable (`offline_hub_ok`: any name, so an offline machine can plan a hub recipe)."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise MoEConvertError(f"data: no built-in corpus {name!r}; built-in: {', '.join(BUILTIN_CORPORA)}")
        return
    path = Path(source).expanduser()
    if path.exists():
        _local_files(path)  # a directory of one kind of supported file
    elif source.startswith((".", "/", "~")) or path.suffix in FILE_BUILDERS:
        raise MoEConvertError(f"data: {source} does not exist")
    elif not offline_hub_ok and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise MoEConvertError(f"data: {source} does not exist (and the hub is offline, HF_HUB_OFFLINE=1)")


def load_documents(source: str, text_field: str = "text") -> Documents:
    """The documents `--data source` names, in a deterministic order."""
    check_data_source(source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        texts = BUILTIN_CORPORA[name]()
        return Documents(lambda: texts, _sha(["builtin", name, hashlib.sha256("\0".join(texts).encode()).hexdigest()]))

    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.exists():
        files = _local_files(path)
        builder, options = FILE_BUILDERS[files[0].suffix]

        def read() -> list[str]:
            try:
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
            except Exception as e:  # datasets raises many types for unreadable files; report one line
                raise MoEConvertError(f"data: could not read {path} as {builder}: {_why(e)}") from None
            return _texts_of(ds, text_field, str(path))

        stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return Documents(read, _sha(["local", stats, text_field]))
    try:  # a hub dataset name (check_data_source: not a path, hub reachable)
        ds = datasets.load_dataset(source, split="train")
    except Exception as e:
        raise MoEConvertError(f"data: {source} is neither a local path nor a loadable hub dataset: {_why(e)}") from None
    return Documents(lambda: _texts_of(ds, text_field, f"dataset {source}"),  # read on a cache miss only
                     _sha(["hub", source, ds._fingerprint, text_field]))


def _why(e: BaseException) -> str:
    """An exception in one line, with the error under it (datasets wraps the real one, e.g. a
    UnicodeDecodeError, in "An error occurred while generating the dataset")."""
    cause = e.__cause__ or e.__context__
    return one_line(e) if cause is None else f"{one_line(e)} ({type(cause).__name__}: {one_line(cause)})"


def _texts_of(ds, text_field: str, where: str) -> list[str]:
    texts = _column(ds, text_field, where)
    if not texts:
        raise MoEConvertError(f"data: {where} contains no text")
    return texts


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """The documented held-out rule: crc32 of the UTF-8 text, mod 10000, below the fraction."""
    return zlib.crc32(text.encode("utf-8")) % 10_000 < round(eval_fraction * 10_000)


def split_documents(texts: list[str], eval_fraction: float) -> dict[str, list[str]]:
    if not 0.0 <= eval_fraction < 1.0:
        raise MoEConvertError(f"eval_fraction: must be in [0, 1), got {eval_fraction}")
    held_out = [is_eval_document(t, eval_fraction) for t in texts]
    return {
        "train": [t for t, e in zip(texts, held_out) if not e],
        "eval": [t for t, e in zip(texts, held_out) if e],
    }


def train_bpe_tokenizer(texts: list[str], vocab_size: int, eos: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained with `tokenizers`, EOS its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha([type(tokenizer).__name__, hashlib.sha256(spec.encode()).hexdigest(), tokenizer.eos_token_id])


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize, append EOS to each document, concatenate, cut into windows: -> (N, seq_len) int64.

    Each batch of documents becomes an int32 array at once, and the chunks fill the int64 result: ~12
    bytes a token at the peak, the result included (a list of Python ints for the corpus took ~48)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chunks, batch = [], 1000
    for start in range(0, len(texts), batch):
        docs = tokenizer(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        chunks.append(np.fromiter(itertools.chain.from_iterable(doc + eos for doc in docs), dtype=np.int32))
    n = sum(map(len, chunks)) // seq_len
    ids = np.empty(n * seq_len, dtype=np.int64)  # filled chunk by chunk: no int32 copy of the whole corpus
    at = 0
    for chunk in chunks:
        take = min(len(chunk), len(ids) - at)
        ids[at:at + take] = chunk[:take]
        at += take
    return torch.from_numpy(ids).view(n, seq_len)


@dataclass
class PackedData:
    """Packed token windows of the train and held-out splits."""

    train: torch.Tensor  # (N_train, seq_len) int64
    eval: torch.Tensor  # (N_eval, seq_len) int64
    from_cache: bool
    cache_file: Path | None

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def check_seq_len(seq_len: int, max_positions: int | None = None) -> None:
    """A window has a next token to predict and fits the model's positions."""
    if seq_len < 2:
        raise MoEConvertError(f"seq_len: must be >= 2, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise MoEConvertError(f"seq_len: {seq_len} is larger than the model's {max_positions} positions")


def load_packed(
    source: str,
    tokenizer,
    seq_len: int,
    *,
    text_field: str = "text",
    eval_fraction: float = 0.1,
    max_positions: int | None = None,
    needed: tuple[str, ...] = ("train", "eval"),
) -> PackedData:
    """`--data` -> packed train/eval windows, read from the cache when this exact packing exists.

    A split in `needed` that is shorter than one window is an error (the held-out one only when
    `eval_fraction` > 0); `eval --split train` needs only the train split, say."""
    from safetensors.torch import load_file, save_file

    check_seq_len(seq_len, max_positions)
    docs = load_documents(source, text_field)
    key = _sha([CACHE_FORMAT, docs.fingerprint, tokenizer_fingerprint(tokenizer), seq_len, eval_fraction])
    cache_file = cache_root() / "data" / f"{key[:32]}.safetensors"
    if cache_file.exists():
        tensors = load_file(str(cache_file))
        data = PackedData(tensors["train"].long(), tensors["eval"].long(), True, cache_file)
        _check_splits(data, needed, source, seq_len, eval_fraction)
        return data

    splits = split_documents(docs.texts, eval_fraction)
    packed = {name: pack(texts, tokenizer, seq_len) for name, texts in splits.items()}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    save_file({name: t.int() for name, t in packed.items()}, str(tmp), metadata={"source": source})
    os.replace(tmp, cache_file)  # atomic: concurrent processes never read half a file
    data = PackedData(packed["train"], packed["eval"], False, cache_file)
    _check_splits(data, needed, source, seq_len, eval_fraction, {k: len(v) for k, v in splits.items()})
    return data


def _check_splits(data: PackedData, needed: tuple[str, ...], source: str, seq_len: int, eval_fraction: float,
                  documents: dict[str, int] | None = None) -> None:
    """Each split in `needed` holds a window (the held-out one only when `eval_fraction` > 0); the error
    counts the split's documents when known (`documents`: split -> count)."""
    for name, what, remedy in (("train", "train split", "lower --eval-fraction or --seq-len"),
                               ("eval", "held-out split", "raise --eval-fraction or lower --seq-len")):
        if name not in needed or len(getattr(data, name)) or (name == "eval" and eval_fraction == 0):
            continue
        count = ""
        if documents is not None:
            total = sum(documents.values())
            count = f" ({documents[name]} of {total} documents" + (
                "; a .txt file's documents are separated by blank lines)" if total == 1 else ")")
        raise MoEConvertError(f"data: the {what} of {source}{count} is shorter than one window of seq_len={seq_len} "
                              f"tokens; {remedy}")


def unigram_perplexity(train: torch.Tensor, eval: torch.Tensor, vocab_size: int) -> float:
    """The baseline a model must beat: exp(cross-entropy of the eval tokens under the train split's
    add-one-smoothed unigram frequencies), over the same tokens a causal LM predicts (all but the
    first of each window)."""
    counts = torch.bincount(train.reshape(-1), minlength=vocab_size).double() + 1.0  # (V,)
    log_p = counts.log() - counts.sum().log()
    targets = eval[:, 1:].reshape(-1)
    return float(torch.exp(-log_p[targets].mean()))

"""Data loading, the held-out split rule, packing, the tokenized-data cache, and bad-input errors."""

import json
import math
import random
import zlib
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from typer.testing import CliRunner

from conftest import CHECKPOINT
from moe_convert.cli import app
from moe_convert.errors import MoEConvertError
from moe_convert.io import load_tokenizer
from moe_convert.training.data import (load_documents, load_packed, pack, split_documents, train_bpe_tokenizer,
                                       unigram_perplexity)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def random_docs(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(random_docs(random.Random(0), 200), vocab_size=300)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CONVERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builtin_corpus_is_real_text_with_the_documented_split():
    docs = load_documents("builtin:pydoc")
    assert sum(map(len, docs.texts)) > 300_000 and any("assert" in t for t in docs.texts)
    assert load_documents("builtin:pydoc").fingerprint == docs.fingerprint
    splits = split_documents(docs.texts, 0.1)
    # the documented rule, recomputed by hand
    assert splits["eval"] == [t for t in docs.texts if zlib.crc32(t.encode()) % 10_000 < 1000]
    assert len(splits["train"]) + len(splits["eval"]) == len(docs.texts)
    assert 0.05 < len(splits["eval"]) / len(docs.texts) < 0.15
    assert not set(splits["train"]) & set(splits["eval"])


@pytest.mark.parametrize("n_docs", [30, 2100])  # one batch of documents, and three
def test_pack_is_tokens_plus_eos_concatenated_and_windowed(tokenizer, n_docs):
    docs = random_docs(random.Random(1), n_docs)
    L = 17
    windows = pack(docs, tokenizer, L)
    stream = []
    for d in docs:
        stream += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert windows.shape == (len(stream) // L, L)
    assert windows.reshape(-1).tolist() == stream[: windows.numel()]


def write_formats(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"txt": tmp_path / "d.txt", "json": tmp_path / "d.json", "jsonl": tmp_path / "d.jsonl",
             "parquet": tmp_path / "d.parquet", "dir": tmp_path / "shards"}
    paths["txt"].write_text("\n\n".join(docs) + "\n")
    paths["json"].write_text(json.dumps([{"body": d, "id": i} for i, d in enumerate(docs)]))
    paths["jsonl"].write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), paths["parquet"])
    paths["dir"].mkdir()
    half = len(docs) // 2
    for i, part in enumerate([docs[:half], docs[half:]]):
        (paths["dir"] / f"part{i}.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in part))
    return paths


def test_every_local_format_yields_the_same_documents(tmp_path):
    docs = random_docs(random.Random(2), 25)
    for kind, path in write_formats(tmp_path, docs).items():
        field = "text" if kind == "txt" else "body"
        assert load_documents(str(path), field).texts == docs, kind


def test_cache_second_load_does_not_retokenize(tmp_path, tokenizer, cache, monkeypatch):
    docs = random_docs(random.Random(3), 300)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs))
    calls = []
    original = type(tokenizer).__call__

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    type(tokenizer).__call__ = counting
    try:
        first = load_packed(str(path), tokenizer, 16)
        n_calls = len(calls)
        with monkeypatch.context() as m:  # a cache hit needs only the files' stats, not their text
            m.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a cache hit read the corpus"))
            second = load_packed(str(path), tokenizer, 16)
        assert n_calls > 0 and len(calls) == n_calls, "the second load tokenized again"
        assert not first.from_cache and second.from_cache and second.cache_file.parent.parent == cache
        assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
        assert not load_packed(str(path), tokenizer, 32).from_cache  # another seq_len is another entry
        path.write_text("\n\n".join(docs[:-1]))  # edited data is re-tokenized
        assert not load_packed(str(path), tokenizer, 16).from_cache
    finally:
        type(tokenizer).__call__ = original
    # the packed splits hold the split documents
    splits = split_documents(docs[:-1], 0.1)
    fresh = load_packed(str(path), tokenizer, 16)
    assert torch.equal(fresh.eval, pack(splits["eval"], tokenizer, 16))


def test_unigram_perplexity_matches_a_hand_count():
    g = torch.Generator().manual_seed(4)
    V = 13
    train = torch.randint(0, V - 2, (7, 9), generator=g)  # tokens V-2, V-1 unseen in train
    ev = torch.randint(0, V, (3, 9), generator=g)
    counts = Counter(train.reshape(-1).tolist())
    total = train.numel() + V
    targets = ev[:, 1:].reshape(-1).tolist()
    nll = -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)
    assert unigram_perplexity(train, ev, V) == pytest.approx(math.exp(nll), rel=1e-9)


# -- bad input: one-line errors ---------------------------------------------------------------------

def test_library_errors_are_ours(tmp_path, tokenizer, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = {
        str(tmp_path / "missing.txt"): "does not exist",
        str(empty): "is empty",
        "builtin:nope": "no built-in corpus",
    }
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    cases[str(latin1)] = "UnicodeDecodeError"  # the error datasets wraps, not only its generic message
    for source, message in cases.items():
        with pytest.raises(MoEConvertError, match=message):
            load_packed(source, tokenizer, 8)
    with pytest.raises(MoEConvertError, match="larger than the model's 64 positions"):
        load_packed("builtin:pydoc", tokenizer, 65, max_positions=64)
    with pytest.raises(MoEConvertError, match="has no tokenizer"):
        load_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("no_tok")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(path)
    return path


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="checkpoints/tiny-gpt2 not built")
def test_cli_bad_input_gives_one_line_errors(tmp_path, no_tokenizer_model, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_field = tmp_path / "d.jsonl"
    no_field.write_text('{"body": "some text here"}\n')
    cases = [
        (["eval", str(CHECKPOINT), "--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["eval", str(CHECKPOINT), "--data", str(empty)], "is empty"),
        (["eval", str(CHECKPOINT), "--data", str(no_field)], "has no field 'text' (fields: body)"),
        (["eval", str(CHECKPOINT), "--data", "builtin:pydoc", "--seq-len", "4096"], "larger than the model's 256 positions"),
        (["eval", str(no_tokenizer_model), "--data", "builtin:pydoc"], "has no tokenizer files"),
        (["train", str(no_tokenizer_model), "--data", "builtin:pydoc", "-o", str(tmp_path / "o"), "--seq-len", "16"],
         "has no tokenizer"),
        (["train", str(CHECKPOINT), "--data", str(empty), "-o", str(tmp_path / "o2")], "is empty"),
    ]
    runner = CliRunner()
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.output)
        assert "Traceback" not in result.output

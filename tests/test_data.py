"""The data pipeline (oneday.data.prepare / .sources): every source kind, the cache, the split, bad input.

Corpora are written by the tests into tmp_path (a few hundred KB of pseudo-words, so a 300-400 token BPE
trains and tokenizes in a fraction of a second); the cache is always under tmp_path.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from oneday.data import prepare as data_mod
from oneday.data.documents import DOC_MAX_CHARS, DOC_TARGET_CHARS, split_documents
from oneday.data.prepare import PreparedData, load_prepared, prepare_data
from oneday.data.token_files import VAL_MIN_TOKENS, choose_dtype, choose_validation
from oneday.data.tokenizer import EOT, MIN_VOCAB_SIZE
from oneday.errors import UserError

# The development machines keep real English corpora beside the checkout (outside this repository). The one test
# that reads them (WikiText-2) skips where they are not; every other test writes its own tiny data.
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
VOCAB = 400

_SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["th", "ch", "qu", "x"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n))


def _paragraph(rng: random.Random) -> str:
    sentences = [_words(rng, rng.randint(4, 14)).capitalize() + rng.choice([".", ".", "!", "?"])
                 for _ in range(rng.randint(2, 6))]
    return " ".join(sentences)


@functools.cache
def make_rows(n: int, seed: int = 0) -> tuple[str, ...]:
    """`n` documents of 1-3 paragraphs (~1 KB each), deterministic for a seed."""
    rng = random.Random(seed)
    return tuple("\n\n".join(_paragraph(rng) for _ in range(rng.randint(1, 3))) for _ in range(n))


def make_text(n_paragraphs: int = 1000, seed: int = 0) -> str:
    """Blank-line-separated paragraphs: 1000 make ~230 KB, ~110k tokens at vocab 400."""
    rng = random.Random(seed)
    return "\n\n".join(_paragraph(rng) for _ in range(n_paragraphs)) + "\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def prepare(spec: str | Path, cache: Path, **kwargs) -> PreparedData:
    kwargs.setdefault("vocab_size", VOCAB)
    return prepare_data(str(spec), cache_dir=cache, **kwargs)


def segments(p: PreparedData) -> list[np.ndarray]:
    """The documents of both token files, as arrays of ids between end-of-text tokens."""
    out = []
    for arr in (p.train_array(), p.val_array()):
        arr = np.asarray(arr)
        ends = np.flatnonzero(arr == p.eot_id)
        assert len(ends) and ends[-1] == len(arr) - 1, "every document ends with the end-of-text token"
        out.extend(np.split(arr, ends + 1)[:-1])
    return [s[:-1] for s in out]


def check_counts(p: PreparedData) -> None:
    itemsize = np.dtype(p.dtype).itemsize
    assert sum((p.directory / name).stat().st_size for name, _ in p.shards) == p.train_tokens * itemsize
    assert (p.directory / "val.bin").stat().st_size == p.val_tokens * itemsize
    assert int((p.train_array() == p.eot_id).sum()) == p.train_documents
    assert int((p.val_array() == p.eot_id).sum()) == p.val_documents
    assert int(p.train_array().max()) < p.vocab_size
    meta = p.metadata()
    for name in ("train_tokens", "val_tokens", "train_documents", "val_documents", "text_bytes",
                 "val_text_bytes", "vocab_size", "eot_id", "dtype", "key"):
        assert meta[name] == getattr(p, name), name
    assert meta["bytes_per_token"] == pytest.approx(p.bytes_per_token())
    assert p.val_bytes_per_token() == pytest.approx(p.val_text_bytes / p.val_tokens)
    assert VAL_MIN_TOKENS <= p.val_tokens <= 0.15 * (p.train_tokens + p.val_tokens)


@pytest.fixture(scope="module")
def auto_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained


# ----------------------------------------------------------------------------------------------------
# Source kinds


def test_txt_file_counts_and_round_trip(tmp_path: Path, cache: Path, auto_tokenizer) -> None:
    text = make_text()
    f = write(tmp_path / "corpus.txt", text)
    p = prepare(f, cache)
    check_counts(p)
    assert p.dtype == "uint16" and not p.from_cache
    assert p.source == f"{f} (1 .txt)"
    meta = p.metadata()
    assert meta["files_per_kind"] == {"txt": 1}
    expected, _ = split_documents(text, final=True)
    assert meta["text_bytes"] == sum(len(d.encode()) for d in expected)
    assert p.train_documents + p.val_documents == len(expected)
    assert all(len(d) <= DOC_MAX_CHARS for d in expected)
    assert sum(len(d) >= DOC_TARGET_CHARS - 16 for d in expected) >= len(expected) - 1  # the last is shorter

    tok = auto_tokenizer(p.tokenizer_dir)
    assert len(tok) == p.vocab_size == VOCAB
    assert tok.eos_token_id == p.eot_id and tok.convert_ids_to_tokens(p.eot_id) == EOT
    decoded = [tok.decode(s.tolist()) for s in segments(p)]
    assert Counter(decoded) == Counter(expected)


def test_jsonl_file(tmp_path: Path, cache: Path, auto_tokenizer) -> None:
    rows = make_rows(500, seed=1)
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"id": i, "text": r}) + "\n" for i, r in enumerate(rows)))
    p = prepare(f, cache)
    check_counts(p)
    assert p.train_documents + p.val_documents == len(rows)
    assert p.metadata()["text_columns"] == {"text": 1}
    assert p.text_bytes == sum(len(r.encode()) for r in rows)
    tok = auto_tokenizer(p.tokenizer_dir)
    sample = [tok.decode(s.tolist()) for s in segments(p)[:20]]
    assert set(sample) <= set(rows)


def test_json_file_picks_story_column(tmp_path: Path, cache: Path) -> None:
    rows = make_rows(500, seed=2)
    f = tmp_path / "stories.json"
    f.write_text(json.dumps([{"title": f"t{i}", "story": r} for i, r in enumerate(rows)]))
    p = prepare(f, cache)
    check_counts(p)
    assert p.train_documents + p.val_documents == len(rows)
    assert p.metadata()["text_columns"] == {"story": 1}


def test_parquet_file(tmp_path: Path, cache: Path) -> None:
    import pandas as pd

    rows = make_rows(500, seed=3)
    f = tmp_path / "rows.parquet"
    pd.DataFrame({"n": range(len(rows)), "content": list(rows)}).to_parquet(f)
    p = prepare(f, cache)
    check_counts(p)
    assert p.train_documents + p.val_documents == len(rows)
    assert p.metadata()["files_per_kind"] == {"parquet": 1}


def test_csv_file_only_string_column(tmp_path: Path, cache: Path) -> None:
    import pandas as pd

    rows = make_rows(500, seed=4)
    f = tmp_path / "rows.csv"
    pd.DataFrame({"n": range(len(rows)), "blurb": list(rows)}).to_csv(f, index=False)
    p = prepare(f, cache)
    check_counts(p)
    assert p.train_documents + p.val_documents == len(rows)
    assert p.metadata()["text_columns"] == {"blurb": 1}


def test_text_column_option(tmp_path: Path, cache: Path) -> None:
    rows = make_rows(500, seed=5)
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps({"text": "x", "other": r}) + "\n" for r in rows))
    p = prepare(f, cache, text_column="other")
    assert p.text_bytes == sum(len(r.encode()) for r in rows)


def test_directory_recursive_counts_kinds(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "corpus"
    write(root / "a.txt", make_text(300, seed=6))
    write(root / "sub" / "b.md", make_text(200, seed=7))
    write(root / "sub" / "deeper" / "c.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in make_rows(150, 8)))
    write(root / "sub" / "empty.txt", "")
    (root / "image.png").write_bytes(b"\x89PNG\0\0")
    write(root / ".hidden" / "skip.txt", "never read " * 100)
    with caplog.at_level(logging.INFO, logger="oneday.data"):
        p = prepare(root, cache)
    check_counts(p)
    assert p.source == f"3 files under {root} (1 .jsonl, 1 .md, 1 .txt)"
    assert p.metadata()["files_per_kind"] == {"txt": 1, "md": 1, "jsonl": 1}
    assert any("3 files under" in r.getMessage() for r in caplog.records)


def test_glob(tmp_path: Path, cache: Path) -> None:
    write(tmp_path / "d" / "one.txt", make_text(450, seed=9))
    write(tmp_path / "d" / "two.txt", make_text(450, seed=10))
    write(tmp_path / "d" / "three.md", make_text(100, seed=11))
    p = prepare(tmp_path / "d" / "*.txt", cache)
    check_counts(p)
    assert p.metadata()["files_per_kind"] == {"txt": 2}
    assert p.source.startswith("2 files matching")


def test_builtin_pydoc(cache: Path, auto_tokenizer) -> None:
    from pydoc_data.topics import topics

    p = prepare("builtin:pydoc", cache, vocab_size=512)
    check_counts(p)
    assert p.source.startswith("builtin:pydoc")
    topic_docs = sum(1 for t in topics.values() if t.strip())
    assert p.train_documents + p.val_documents > 2 * topic_docs  # the stdlib's prose too
    # What the README's 3-minute CPU demo consumes (~1.3M tokens at vocab 8192): the topics alone were 97k.
    assert p.train_tokens > 800_000
    tok = auto_tokenizer(p.tokenizer_dir)
    texts = {t.strip("\n").rstrip() for t in topics.values()}
    assert all(tok.decode(s.tolist()) in texts for s in segments(p)[:10])
    assert any("json.decoder" in tok.decode(s.tolist()) for s in segments(p))


def test_module_prose_reads_docstrings_comments_and_messages_without_importing() -> None:
    from oneday.data.documents import module_prose

    source = b'''"""The module says hello."""
raise SystemExit("imported!")
# A comment about the
# next function, in two lines.
def f(x):
    """F does things."""
    x = 1  # trailing comments are code's
    # ----------
    #x=compute(y)
    if x:
        raise ValueError("x must be a positive number of seconds")
    pattern = r"^(?P<name>[a-z_]+)\\s*=\\s*(?P<value>.*)$ for each line"
    log(f"could not read the file {x} because it is locked")
    raise ValueError("x must be a positive number of seconds")
def g():
    """Decodes \\udc80 alone."""
    return "a lone \\udc80 is what this string has"
'''
    text = module_prose(source, name="pkg.mod")
    assert text.encode("utf-8")  # no lone surrogate (the codecs' tests spell them): the tokenizer could not encode it
    # a message once; not a one-word string, a regular expression, or the pieces of an f-string
    assert text == ("pkg.mod\n\nThe module says hello.\n\nA comment about the next function, in two lines.\n\n"
                    "f: F does things.\n\nx must be a positive number of seconds\n\ng: Decodes ? alone.")
    assert module_prose(b"def (:", name="broken") == ""


def test_validation_size_rule() -> None:
    """65,536 tokens where the corpus allows (a val loss to ~0.02-0.03 nats), at most 10%, 0.5% of a big one."""
    from oneday.data.token_files import val_target

    assert val_target(1_200_000) == 65536  # was 0.5%: 6,000 (8,192 at the floor)
    assert val_target(200_000) == 20_000  # 10% of a small corpus
    assert val_target(81_920) == 8192
    assert val_target(100_000_000) == 500_000
    assert val_target(10**10) == 10_000_000
    rng = np.random.default_rng(0)
    tokens = np.full(1200, 1000, dtype=np.int64)  # 1.2M tokens in documents of 1,000
    chosen = choose_validation(tokens, rng.integers(0, 2**63, size=1200, dtype=np.uint64))
    assert 65536 <= tokens[chosen].sum() <= 65536 * 1.5


@pytest.mark.skipif(not (SHARED_DATA / "wikitext2").is_dir(), reason="../shared/data/wikitext2 not present")
def test_wikitext2(cache: Path, auto_tokenizer) -> None:
    p = prepare(SHARED_DATA / "wikitext2", cache, vocab_size=1024)
    check_counts(p)
    assert p.metadata()["files_per_kind"] == {"raw": 2}
    assert p.train_tokens > 500_000 and 2.0 < p.bytes_per_token() < 4.0
    tok = auto_tokenizer(p.tokenizer_dir)
    first = tok.decode(segments(p)[0].tolist())
    assert "\r" not in first and first.startswith(" = ")  # CRLF normalized, the first article's title


# ----------------------------------------------------------------------------------------------------
# Cache


def test_second_call_reuses_cache_without_work(tmp_path: Path, cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "c.txt", make_text())
    first = prepare(f, cache)
    mtime = (first.directory / "train-00000.bin").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("no tokenizing or training on a cache hit")

    monkeypatch.setattr(data_mod, "tokenize_into_shards", boom)
    monkeypatch.setattr(data_mod, "train_tokenizer", boom)
    second = prepare(f, cache)
    assert second.from_cache and not first.from_cache
    assert second == first
    assert (second.directory / "train-00000.bin").stat().st_mtime_ns == mtime
    assert [p.name for p in (cache / "data").iterdir()] == [first.key]


def test_changed_file_gets_new_key(tmp_path: Path, cache: Path) -> None:
    f = write(tmp_path / "c.txt", make_text())
    first = prepare(f, cache)
    write(f, make_text() + "\nOne more line.\n")
    second = prepare(f, cache)
    assert second.key != first.key and not second.from_cache
    assert prepare(f, cache, vocab_size=VOCAB + 10).key != second.key  # settings are in the key too


def test_same_content_elsewhere_same_key(tmp_path: Path, cache: Path) -> None:
    text = make_text()
    a = prepare(write(tmp_path / "a" / "c.txt", text), cache)
    b = prepare(write(tmp_path / "b" / "c.txt", text), cache)
    assert a.key == b.key and b.from_cache


def test_given_tokenizer_directory(tmp_path: Path, cache: Path) -> None:
    first = prepare(write(tmp_path / "a.txt", make_text()), cache)
    other = write(tmp_path / "b.txt", make_text(seed=12))
    p = prepare(other, cache, tokenizer=str(first.tokenizer_dir))
    check_counts(p)
    assert p.vocab_size == first.vocab_size and p.eot_id == first.eot_id
    assert p.metadata()["tokenizer"]["origin"] == "dir"
    assert p.key != prepare(other, cache).key


def test_literal_end_of_text_in_text_is_not_a_separator(tmp_path: Path, cache: Path, auto_tokenizer) -> None:
    text = make_text() + f"\n\nA document that mentions {EOT} in its text.\n"
    p = prepare(write(tmp_path / "c.txt", text), cache)
    check_counts(p)  # end-of-text count == documents: the literal was tokenized as text
    tok = auto_tokenizer(p.tokenizer_dir)
    assert any(EOT in tok.decode(s.tolist()) for s in segments(p))


def test_load_prepared_missing_and_incomplete(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match="no prepared data"):
        load_prepared(tmp_path / "nothing")
    p = prepare(write(tmp_path / "c.txt", make_text()), cache)
    assert load_prepared(p.directory) == p
    with open(p.directory / "train-00000.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(UserError, match="incomplete"):
        load_prepared(p.directory)
    again = prepare(tmp_path / "c.txt", cache)  # a broken entry is prepared again
    assert not again.from_cache and again == p


def test_stale_temp_dir_of_dead_process_removed(tmp_path: Path, cache: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = int(proc.stdout)
    stale = cache / "data" / f".tmp-abc123-{data_mod._host()}-{dead}-zz_9"
    stale.mkdir(parents=True)
    (stale / "all.bin").write_bytes(b"\0" * 10)
    alive = cache / "data" / f".tmp-abc123-{data_mod._host()}-{os.getpid()}-zz_8"
    alive.mkdir()
    prepare(write(tmp_path / "c.txt", make_text()), cache)
    assert not stale.exists() and alive.exists()


# ----------------------------------------------------------------------------------------------------
# Documents, split, dtype


def test_split_documents_independent_of_blocks() -> None:
    text = make_text(200, seed=13) + "x" * (DOC_MAX_CHARS * 2 + 5) + "\n" + make_text(50, seed=14)
    whole, _ = split_documents(text, final=True)
    pieces: list[str] = []
    rest = ""
    for i in range(0, len(text), 3001):
        docs, rest = split_documents(rest + text[i:i + 3001], final=False)
        pieces.extend(docs)
    docs, _ = split_documents(rest, final=True)
    pieces.extend(docs)
    assert pieces == whole
    assert max(len(d) for d in whole) == DOC_MAX_CHARS  # the over-long line was cut hard


def test_choose_validation_deterministic_and_sized() -> None:
    rng = np.random.default_rng(0)
    lens = rng.integers(200, 2000, size=5000).astype(np.uint32)
    hashes = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    val = choose_validation(lens, hashes)
    total = int(lens.sum())
    from oneday.data.token_files import val_target

    target = val_target(total)
    assert target == 65536 and target <= int(lens[val].sum()) <= 1.5 * target
    assert np.array_equal(val, choose_validation(lens, hashes)) and np.all(np.diff(val) > 0)
    with pytest.raises(UserError, match=r"too small .* 9 documents"):
        choose_validation(lens[:9], hashes[:9])
    with pytest.raises(UserError, match="too large"):
        choose_validation(np.full(20, 100_000, np.uint32), hashes[:20])


def test_choose_dtype() -> None:
    assert choose_dtype(257) == "uint16"
    assert choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32"
    assert choose_dtype(2**32) == "uint32"
    with pytest.raises(UserError):
        choose_dtype(2**32 + 1)


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear UserError each


def test_missing_path(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match="no such file or directory") as err:
        prepare(tmp_path / "nope.txt", cache)
    assert "nope.txt" in str(err.value) and "\n" not in str(err.value)


def test_empty_file(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match="empty"):
        prepare(write(tmp_path / "e.txt", ""), cache)


def test_whitespace_only_file(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match="no text in"):  # the least vocabulary: 7 bytes cannot give 400 tokens
        prepare(write(tmp_path / "w.txt", "\n\n   \n"), cache, vocab_size=MIN_VOCAB_SIZE)


def test_directory_without_text(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.bin").write_bytes(b"\0\1")
    (tmp_path / "bin" / "b.png").write_bytes(b"\0\1")
    with pytest.raises(UserError, match=r"no text files under .* \(found 2 other files\)"):
        prepare(tmp_path / "bin", cache)
    write(tmp_path / "empties" / "a.txt", "")
    with pytest.raises(UserError, match="all 1 files are empty"):
        prepare(tmp_path / "empties", cache)


def test_non_utf8_few_bytes_replaced(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture,
                                     auto_tokenizer) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(make_text().encode() + "\n\nCaf\xe9 cr\xe8me.\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="oneday.data"):
        p = prepare(f, cache)
    check_counts(p)
    assert p.metadata()["invalid_bytes_replaced"] == 2
    assert any("replaced 2 invalid bytes" in r.getMessage() for r in caplog.records)
    tok = auto_tokenizer(p.tokenizer_dir)
    assert any("Caf\ufffd cr\ufffdme." in tok.decode(s.tolist()) for s in segments(p))


def test_non_utf8_file_refused(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "latin1_heavy.txt"
    f.write_bytes(("\xe9t\xe9 \xe0 la for\xeat " * 2000).encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1_heavy.txt is not UTF-8 text: \d+ of \d+ bytes"):
        prepare(f, cache)
    g = tmp_path / "binary.txt"
    g.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(UserError, match=r"binary\.txt is not text"):
        prepare(g, cache)


def test_jsonl_line_not_json(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "broken.jsonl"
    lines = [json.dumps({"text": r}) for r in make_rows(500, seed=15)]
    lines[2] = '{"text": oops}'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        prepare(f, cache)
    msg = str(err.value)
    assert "broken.jsonl" in msg and "line 3" in msg and "\n" not in msg


def test_missing_text_column_lists_columns(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"id": i, "body": r}) + "\n" for i, r in enumerate(make_rows(20))))
    with pytest.raises(UserError, match=r"no column 'words'; its columns are: id, body"):
        prepare(f, cache, text_column="words")


def test_several_text_columns_ask_for_one(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"a": r, "b": r}) + "\n" for r in make_rows(20)))
    with pytest.raises(UserError, match=r"several text columns .* --text-column"):
        prepare(f, cache)


@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_name_offline_fails_fast(cache: Path, monkeypatch: pytest.MonkeyPatch, offline_env: bool) -> None:
    if not offline_env:  # the quick socket check has to answer instead
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    started = time.perf_counter()
    with pytest.raises(UserError, match="Hugging Face hub is not available") as err:
        prepare("roneneldan/TinyStories", cache)
    assert time.perf_counter() - started < 5
    assert "roneneldan/TinyStories" in str(err.value) and "\n" not in str(err.value)


def test_hub_tokenizer_offline_fails_fast(tmp_path: Path, cache: Path) -> None:
    from transformers import AutoTokenizer  # noqa: F401  (the import itself takes seconds; not timed)

    f = write(tmp_path / "c.txt", make_text())
    started = time.perf_counter()
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        prepare(f, cache, tokenizer="oneday-tests/no-such-tokenizer")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(("vocab", "message"), [(256, "too small"), (2**32 + 1, "too large")])
def test_vocab_size_bounds(tmp_path: Path, cache: Path, vocab: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        prepare(write(tmp_path / "c.txt", make_text()), cache, vocab_size=vocab)


def test_corpus_too_small(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(UserError, match=r"corpus too small to hold out a validation set: \d+ documents, [\d,]+ tok"):
        prepare(write(tmp_path / "small.txt", make_text(20)), cache)
    assert not cache.exists()  # not even the empty folders this call made


def test_nothing_half_written_after_failure(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mixed"
    write(root / "a.txt", make_text())
    write(root / "b.jsonl", '{"text": "fine"}\n{not json}\n')
    with pytest.raises(UserError, match=r"b.jsonl, line 2"):  # raised while training the tokenizer
        prepare(root, cache)
    assert not cache.exists()

    good = write(tmp_path / "good.txt", make_text())

    tokenize_into_shards = data_mod.tokenize_into_shards

    def fail(*args, **kwargs):  # fails after the token shards are written
        tokenize_into_shards(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(data_mod, "tokenize_into_shards", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(good, cache)
    assert not cache.exists()


def test_runner_data_does_not_import_torch() -> None:
    code = ("import sys, oneday.data.prepare, oneday.data.sources; "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hub_dataset_path_simulated(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub code path end to end, with the hub replaced by an in-memory streaming dataset."""
    import datasets
    import huggingface_hub

    from oneday.data import sources

    rows = make_rows(500, seed=16)
    calls: list[dict] = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        table = {"id": list(range(len(rows))), "story": list(rows)}
        return datasets.Dataset.from_dict(table).to_iterable_dataset()  # in memory: no lock files anywhere

    monkeypatch.setattr(sources, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, **kw: type("Info", (), {"sha": "abc123"})())
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    p = prepare("hf:someone/stories", cache, config="small", split="validation")
    check_counts(p)
    assert p.train_documents + p.val_documents == len(rows)
    assert p.source == "hub:someone/stories (small) split validation"
    assert calls[-1]["path"] == "someone/stories" and calls[-1]["name"] == "small"
    assert calls[-1]["streaming"] is True and calls[-1]["revision"] == "abc123"
    assert p.metadata()["settings"]["hub"]["revision"] == "abc123"
    assert prepare("hf:someone/stories", cache, config="small", split="validation").from_cache


class RecordingProgress:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, float | None, float]] = []

    def task(self, description: str, *, total: float | None = None, unit: str = ""):
        import contextlib

        outer = self

        class _Task:
            done = 0.0

            def advance(self, amount: float = 1.0) -> None:
                self.done += amount

            def update(self, *, completed=None, total=None, description=None) -> None:
                pass

        @contextlib.contextmanager
        def cm():
            t = _Task()
            yield t
            outer.tasks.append((description, total, t.done))

        return cm()


def test_progress_reports_each_phase(tmp_path: Path, cache: Path) -> None:
    f = write(tmp_path / "c.txt", make_text())
    progress = RecordingProgress()
    prepare_data(str(f), vocab_size=VOCAB, cache_dir=cache, progress=progress)
    names = [d for d, _, _ in progress.tasks]
    assert names[0] == "reading 1 file" and names[1].startswith("training tokenizer") and names[2] == "tokenizing"
    size = f.stat().st_size
    assert all(total == size and done == size for _, total, done in progress.tasks)


def test_tokenizer_not_a_tokenizer_directory(tmp_path: Path, cache: Path) -> None:
    f = write(tmp_path / "corpus" / "c.txt", make_text())
    with pytest.raises(UserError, match="is not a tokenizer directory"):
        prepare(f, cache, tokenizer=str(tmp_path / "corpus"))
    with pytest.raises(UserError, match="tokenizer directory not found"):
        prepare(f, cache, tokenizer=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------
# Issue 11: a vocabulary the corpus or the trainer cannot give, a cache that cannot be written, a changed cache


def test_vocab_size_beyond_the_trainer_refused_before_training(tmp_path: Path, cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("refused before the tokenizer is trained")

    monkeypatch.setattr(data_mod, "train_tokenizer", boom)
    with pytest.raises(UserError, match=r"vocab size 1,000,000,000 is too large: .* at most 1,048,576 tokens"):
        prepare("builtin:pydoc", cache, vocab_size=10**9)  # the Rust trainer aborted the process (SIGABRT)
    assert not cache.exists()


def test_vocab_size_beyond_the_corpus_refused_before_training(tmp_path: Path, cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from oneday.data.sources import resolve_source
    from oneday.data.tokenizer import check_vocab_fits_corpus

    f = write(tmp_path / "c.txt", make_text(300))
    most = MIN_VOCAB_SIZE + f.stat().st_size
    check_vocab_fits_corpus(most, resolve_source(str(f)))  # the bound itself is allowed

    def boom(*args, **kwargs):
        raise AssertionError("refused before the tokenizer is trained")

    monkeypatch.setattr(data_mod, "train_tokenizer", boom)
    with pytest.raises(UserError, match=rf"vocab size {most + 1:,} is more than .*c\.txt.* at most {most:,} tokens"):
        prepare(f, cache, vocab_size=most + 1)
    assert not cache.exists()


def _refuse_mkdir_in(cache: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system refuses to create anything under `cache` (os.mkdir: the cache's folders and temp folder)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path) == cache or cache in Path(path).parents:
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "read-only file system"),
                                              (errno.EACCES, "permission denied")])
def test_cache_that_cannot_be_written_is_one_line(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                  code: int, reason: str) -> None:
    f = write(tmp_path / "c.txt", make_text())
    _refuse_mkdir_in(cache, code, monkeypatch)
    with pytest.raises(UserError) as refused:
        prepare(f, cache)
    assert str(refused.value) == f"cannot write to {cache}: {reason}"
    assert not cache.exists()


def test_cache_that_cannot_be_written_still_reads_what_is_there(tmp_path: Path, cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "c.txt", make_text())
    prepare(f, cache)
    _refuse_mkdir_in(cache, errno.EROFS, monkeypatch)
    assert prepare(f, cache).from_cache


def _disk_full_for_token_files(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a token file (.bin) under `cache` fails once some bytes are in: the file system filled up."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle) -> None:
            self.handle = handle
            self.written = 0

        def write(self, data) -> int:
            if self.written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write(2) names no file
            self.written = self.handle.write(data)
            return self.written

        def __getattr__(self, name: str):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        path = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
        if path is not None and "w" in mode and path.suffix == ".bin" and cache in path.parents:
            return FullDisk(handle)
        return handle

    monkeypatch.setattr(builtins, "open", full_open)


def test_full_cache_is_one_line_and_nothing_half_written(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path / "c.txt", make_text(3000))  # several tokenizing batches: the second write fails
    _disk_full_for_token_files(cache, monkeypatch)
    with pytest.raises(UserError) as refused:
        prepare(f, cache)
    assert str(refused.value) == f"cannot write to {cache}: no space left on device"
    assert not (cache / "data").exists() or list((cache / "data").iterdir()) == []  # no build folder left


def test_tokenizer_that_cannot_be_saved_raises_the_os_error(tmp_path: Path, cache: Path) -> None:
    from oneday.data.tokenizer import save_tokenizer

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux) to fill the disk under the Rust writer")
    p = prepare(write(tmp_path / "c.txt", make_text()), cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p.tokenizer_dir)
    target = tmp_path / "tok"
    target.mkdir()
    (target / "tokenizer.json").symlink_to("/dev/full")  # the Rust backend writes it: "(os error 28)"
    with pytest.raises(OSError) as failed:
        save_tokenizer(tok, target)
    assert failed.value.errno == errno.ENOSPC


def _shuffle(path: Path) -> None:
    """The same tokens in another order: the same size, other bytes."""
    tokens = np.fromfile(path, dtype=np.uint16)
    np.random.default_rng(0).permutation(tokens).tofile(path)


@pytest.mark.parametrize("name", ["train-00000.bin", "val.bin"])
def test_changed_token_file_of_the_same_size_is_refused_and_prepared_again(
        tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    f = write(tmp_path / "c.txt", make_text())
    first = prepare(f, cache)
    original = (first.directory / name).read_bytes()
    _shuffle(first.directory / name)
    with pytest.raises(UserError, match=rf"{first.directory / name} changed after it was prepared .*prepare the"):
        load_prepared(first.directory)
    with caplog.at_level(logging.WARNING, logger="oneday.data.prepare"):
        again = prepare(f, cache)
    assert not again.from_cache and again == first
    assert (again.directory / name).read_bytes() == original
    assert any(f"{name} changed" in r.getMessage() and "preparing it again" in r.getMessage()
               for r in caplog.records)


def _data_info(p: PreparedData, spec: Path):
    from oneday.plan import DataInfo

    return DataInfo(source=p.source, key=p.key, path=str(p.directory), tokenizer=str(p.tokenizer_dir),
                    vocab_size=p.vocab_size, train_tokens=p.train_tokens, val_tokens=p.val_tokens,
                    bytes_per_token=p.bytes_per_token(), spec=str(spec))


def test_plan_data_prepares_a_changed_entry_again(tmp_path: Path, cache: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from oneday.data.plan_data import load_plan_data

    f = write(tmp_path / "c.txt", make_text())
    first = prepare(f, cache)
    assert first.vocab_size == VOCAB  # a plan's data is prepared again with the vocabulary it records
    original = (first.directory / "train-00000.bin").read_bytes()
    _shuffle(first.directory / "train-00000.bin")
    with caplog.at_level(logging.WARNING):
        data, seconds = load_plan_data(_data_info(first, f))
    assert data == first and seconds > 0
    assert (data.directory / "train-00000.bin").read_bytes() == original
    assert any("train-00000.bin changed" in r.getMessage() for r in caplog.records)


def test_entry_of_the_layout_before_checksums_is_prepared_again(tmp_path: Path, cache: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from oneday.data.plan_data import load_plan_data

    f = write(tmp_path / "c.txt", make_text())
    first = prepare(f, cache)
    meta = first.metadata()
    old = meta | {"format_version": 2}  # one train.bin, checksums in meta.json, no manifest
    (first.directory / "meta.json").write_text(json.dumps(old), encoding="utf-8")
    data, seconds = load_plan_data(_data_info(first, f))  # the plan keeps working: the same key
    assert data == first and seconds > 0
    (first.directory / "meta.json").write_text(json.dumps(old), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="oneday.data.prepare"):
        again = prepare(f, cache)
    assert not again.from_cache and again == first
    assert any("format version 2" in r.getMessage() for r in caplog.records)


def test_checksums_recorded_for_every_token_file(tmp_path: Path, cache: Path) -> None:
    p = prepare(write(tmp_path / "c.txt", make_text()), cache)
    manifest = json.loads((p.directory / "manifest.json").read_text())
    records = [*manifest["shards"], manifest["val"]]
    assert [r["name"] for r in records] == ["train-00000.bin", "val.bin"]
    assert all(r["xxh3_64"] == data_mod.file_checksum(p.directory / r["name"]) for r in records)


def test_evaluate_reports_the_standard_error_over_batches() -> None:
    """Every val loss comes with its standard error (`val_loss_se`): here batches of means 1, 2, 3 (2 windows each)."""
    import torch

    from oneday.runner.step import evaluate_with_se

    class Fixed(torch.nn.Module):
        def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return inputs[:, 0].float().mean()  # the batch's "loss": its first token ids' mean

    batches = [torch.full((2, 5), v) for v in (1, 2, 3)]
    mean, se = evaluate_with_se(Fixed(), batches)
    assert mean == pytest.approx(2.0)
    assert se == pytest.approx(np.std([1, 2, 3], ddof=1) / np.sqrt(3))
    assert np.isnan(evaluate_with_se(Fixed(), batches[:1])[1])


def test_max_tokens_streams_a_hub_split_from_parquet(tmp_path: Path, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config/--split/--max-tokens` on a hub dataset, the hub replaced by local parquet read as a stream: the
    cap is met by whole documents and the split is read no further than it needs (not downloaded whole)."""
    import datasets
    import huggingface_hub
    import pandas as pd

    from oneday.data import sources

    rows = make_rows(6000, seed=21)
    f = tmp_path / "train-00000.parquet"
    pd.DataFrame({"text": list(rows)}).to_parquet(f, row_group_size=500)
    real_load = datasets.load_dataset
    calls: list[dict] = []
    pulled = [0]

    def count(row: dict) -> dict:
        pulled[0] += 1
        return row

    def hub_from_parquet(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, "split": kwargs.get("split")})
        ds = real_load("parquet", data_files=str(f), split="train", streaming=True, cache_dir=kwargs["cache_dir"])
        return ds.map(count)

    monkeypatch.setattr(sources, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, **kw: type("Info", (), {"sha": "abc123"})())
    monkeypatch.setattr(datasets, "load_dataset", hub_from_parquet)
    p = prepare("hf:someone/big", cache, config="en", split="train[:90%]", max_tokens=100_000,
                workers=0)  # in process: a pool reads 2 batches per worker ahead
    total = p.train_tokens + p.val_tokens
    assert 100_000 <= total < 100_000 + 2_000  # whole documents: the last one crosses the cap
    assert {(c["name"], c["split"]) for c in calls} == {("en", "train[:90%]")}
    # Two passes (tokenizer training, tokenizing) read batches of 1,000 rows; uncapped they would pull 2 × 6,000.
    assert pulled[0] <= 2 * 2000, f"pulled {pulled[0]} rows (of 2 × {len(rows)}) for 100k tokens"
    assert p.metadata()["settings"]["max_tokens"] == 100_000
    with pytest.raises(UserError, match="--max-tokens: at least 81,920"):
        prepare("hf:someone/big", cache, max_tokens=1000)


# ----------------------------------------------------------------------------------------------------
# Shards


def _shard_files(p: PreparedData) -> list[bytes]:
    return [(p.directory / name).read_bytes() for name, _ in p.shards] + [(p.directory / "val.bin").read_bytes()]


def test_shards_resume_after_an_interrupt_and_match_an_uninterrupted_run(tmp_path: Path, cache: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from oneday.data import shards

    f = write(tmp_path / "c.txt", make_text(1500, seed=31))
    whole = prepare(f, tmp_path / "other", shard_tokens=30_000, workers=0)
    assert len(whole.shards) >= 5 and all(n >= 30_000 for _, n in whole.shards[1:-1])
    check_counts(whole)
    real_close = shards.ShardWriter._close

    def interrupted(self, *, final):  # Ctrl-C while the fourth shard is written
        if len(self.progress.shards) >= 3:
            raise KeyboardInterrupt
        return real_close(self, final=final)

    monkeypatch.setattr(shards.ShardWriter, "_close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(f, cache, shard_tokens=30_000, workers=0)
    partial = next((cache / "data").glob(".partial-*"))
    kept = sorted(p.name for p in partial.glob("train-*.bin"))
    assert kept == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    monkeypatch.setattr(shards.ShardWriter, "_close", real_close)
    encoded_docs = [0]
    real_encoder = shards.batch_encoder

    def counting_encoder(tok):
        encode = real_encoder(tok)
        return lambda docs: (encoded_docs.__setitem__(0, encoded_docs[0] + len(docs)), encode(docs))[1]

    monkeypatch.setattr(shards, "batch_encoder", counting_encoder)
    resumed = prepare(f, cache, shard_tokens=30_000, workers=0)
    assert resumed.metadata()["shards_resumed"] == 3 and not partial.exists()
    assert encoded_docs[0] < (resumed.train_documents + resumed.val_documents) * 0.8  # kept shards not encoded
    assert resumed.key == whole.key and _shard_files(resumed) == _shard_files(whole)


def test_a_pool_of_workers_writes_the_same_shards(tmp_path: Path) -> None:
    f = write(tmp_path / "c.txt", make_text(1000, seed=32))
    alone = prepare(f, tmp_path / "a", shard_tokens=30_000, workers=0)
    pooled = prepare(f, tmp_path / "b", shard_tokens=30_000, workers=2)
    assert pooled.metadata()["workers"] == 2 and _shard_files(pooled) == _shard_files(alone)


def test_a_corrupt_shard_is_refused_in_one_line(tmp_path: Path, cache: Path) -> None:
    p = prepare(write(tmp_path / "c.txt", make_text(1000, seed=33)), cache, shard_tokens=30_000, workers=0)
    _shuffle(p.directory / "train-00001.bin")
    with pytest.raises(UserError) as err:
        load_prepared(p.directory)
    assert "\n" not in str(err.value) and "train-00001.bin changed after it was prepared" in str(err.value)


def test_sampler_resumes_exactly_across_shard_boundaries(tmp_path: Path) -> None:
    """The shards read as one array: the same windows as the concatenated tokens, from any cursor."""
    from oneday.data.shards import ShardedTokens
    from oneday.data.windows import WindowSampler

    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 5000, size=n).astype(np.uint16) for n in (1003, 517, 2049)]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"train-{i:05d}.bin")
        part.tofile(paths[-1])
    sharded = ShardedTokens(paths, [len(x) for x in parts], "uint16")
    flat = np.concatenate(parts)
    assert len(sharded) == len(flat) and np.array_equal(np.asarray(sharded), flat)
    one = WindowSampler(sharded, seq_len=64, seed=3)
    ref = WindowSampler(flat, seq_len=64, seed=3)
    run = [one.batch(c, 4) for c in range(0, 3 * one.windows_per_epoch, 4)]  # three epochs: every boundary
    assert all(np.array_equal(b, ref.batch(c, 4)) for b, c in zip(run, range(0, 3 * one.windows_per_epoch, 4),
                                                                    strict=True))
    resumed = WindowSampler(sharded, seq_len=64, seed=3)  # a fresh sampler at a checkpoint's cursor
    assert np.array_equal(resumed.batch(36, 4), run[9])


def test_a_slice_of_the_shards_reads_only_the_shards_it_spans(tmp_path: Path) -> None:
    """The probe reads the first 2^20 training tokens: a slice must not map (or copy) a 100M-token corpus."""
    from oneday.data.shards import ShardedTokens

    parts = [np.arange(n, dtype=np.uint16) + 1000 * i for i, n in enumerate((300, 200, 400))]
    paths = [tmp_path / f"train-{i:05d}.bin" for i in range(3)]
    for part, path in zip(parts, paths[:2], strict=False):
        part.tofile(path)  # the third shard's file is missing: reading it would fail
    sharded = ShardedTokens(paths, [len(x) for x in parts], "uint16")
    flat = np.concatenate(parts)
    assert np.array_equal(sharded[:250], flat[:250])
    assert np.array_equal(sharded[250:480], flat[250:480])  # across a boundary
    assert np.array_equal(sharded[10:480:7], flat[10:480:7])
    assert sharded[490:490].size == 0 and sharded[:250].dtype == np.uint16
    assert 2 not in sharded._maps


def test_a_capped_corpus_is_estimated_from_its_sample(tmp_path: Path, cache: Path) -> None:
    """--max-tokens on a larger corpus: the plan's reasons estimate the whole from the prepared sample."""
    import re

    from oneday.data.plan_data import capped_corpus_note

    f = write(tmp_path / "c.txt", make_text(2500, seed=34))
    capped = prepare(f, cache, max_tokens=90_000)
    whole = prepare(f, cache)
    assert capped_corpus_note(whole, planned_tokens=1e6) is None
    note = capped_corpus_note(capped, planned_tokens=1e6)
    assert note is not None and note.startswith("--max-tokens 90,000 took the first")
    estimate = int(re.search(r"~([\d,]+) tokens", note)[1].replace(",", ""))
    assert estimate == pytest.approx(whole.train_tokens + whole.val_tokens, rel=0.1)
    assert "prepare more" in note


def test_the_standard_error_reaches_metrics_and_mlflow(tmp_path: Path) -> None:
    """`val_loss_se` is recorded wherever val_loss is: metrics.jsonl and the tracker (`val/loss_se`)."""
    from oneday.runner.records import EvalRecord
    from oneday.tracking.recorder import RunRecorder, read_metrics

    sent: list = []

    class Tracker:
        def log_metrics(self, metrics, *, step, timestamp=None):
            sent.append(metrics)

    path = tmp_path / "metrics.jsonl"
    recorder = RunRecorder(path, tracker=Tracker())
    recorder.on_eval(EvalRecord(step=5, tokens=640, val_loss=5.5, val_bpb=2.0, train_elapsed=1.0, final=False,
                                val_loss_se=0.025))
    assert [r["val_loss_se"] for r in read_metrics(path) if r["kind"] == "eval"] == [0.025]
    assert sent[-1]["val/loss_se"] == 0.025

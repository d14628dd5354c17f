"""The tokenizer of a prepared corpus: a byte-level BPE trained on it, or an existing one (a folder or a hub name).

`resolve_tokenizer` says which tokenizer and gives its identity for the cache key (the files' hashes, or the
training settings); `train_tokenizer` trains a byte-level BPE (GPT-2 pre-tokenization, `<|endoftext|>` as the
only special token) on evenly spaced batches of at most `TOKENIZER_SAMPLE_CHARS` (200M characters) of the
corpus: the merges of an 8k-64k vocabulary are settled long before that, while training time and memory keep
growing with the text. `batch_encoder` encodes batches of documents through the Rust backend.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from oneday.data.documents import ReadStats
from oneday.data.sources import Source, hub_offline_reason
from oneday.errors import UserError, first_line
from oneday.progress import Progress, Task

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
SPECIAL_TOKENS = (EOT,)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens
MAX_VOCAB_SIZE = 2**32  # the most ids a token file holds (uint32); a given tokenizer may be this large
# The most tokens oneday trains a BPE to. The Rust trainer reserves memory for the whole vocabulary it is asked for
# when it starts merging (measured: ~71 bytes a token; 10^9 asked for a 70.9 GB allocation, and the failed
# allocation aborted the process, which Python cannot catch); 2^20 reserves ~75 MB. It is also 4x the largest
# vocabulary of current language models (256k): the embedding of a larger one would outweigh any model of a day.
MAX_TRAINED_VOCAB_SIZE = 2**20
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_SAMPLE_CHARS = 200_000_000
BPE_MIN_FREQUENCY = 2
BATCH_CHARS = 2 << 20
CAPPED_BYTES_PER_TOKEN = 6  # --max-tokens: bytes read to train the tokenizer per token taken (BPE text: ~3.5-4.5)
# Files of a tokenizer directory that do not decide the tokenizer and may be huge (model weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt"})
_MAX_TOKENIZER_FILE_BYTES = 256 << 20
_RUST_IO_ERROR = re.compile(r"\(os error (?P<errno>\d+)\)")


def check_vocab_size(vocab_size: int, *, training: bool) -> None:
    """Refuse a vocabulary size no tokenizer can have, or (`training`) one that oneday does not train a BPE to."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special token)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size:,} is too large: token files hold at most 2**32 ids")
    if training and vocab_size > MAX_TRAINED_VOCAB_SIZE:
        raise UserError(f"vocab size {vocab_size:,} is too large: oneday trains a BPE of at most "
                        f"{MAX_TRAINED_VOCAB_SIZE:,} tokens (2**20: the trainer reserves memory for every token "
                        "asked for)")


def check_vocab_fits_corpus(vocab_size: int, source: Source) -> None:
    """Refuse a vocabulary larger than the corpus can give a BPE trained on it, before any training.

    The bound is the corpus's size in bytes, known without reading it: each merge joins two adjacent symbols of
    a distinct pre-tokenized word into one, so a word of n bytes takes at most n - 1 merges and all merges number
    fewer than the corpus's bytes; the vocabulary is 256 bytes + the special tokens + the merges. It is loose (a
    real corpus stops merging far sooner, and the tokenizer then says so), but it never refuses a vocabulary the
    corpus could fill, and it needs no pass over the data. Only where the bytes on disk are at least the text's:
    not for a hub dataset (size unknown) or parquet files (compressed).
    """
    if source.total_bytes is None or any(f.kind == "parquet" for f in source.files):
        return
    most = MIN_VOCAB_SIZE + source.total_bytes
    if vocab_size > most:
        raise UserError(f"vocab size {vocab_size:,} is more than {source.description} can give: a byte-level BPE "
                        f"trained on its {source.total_bytes:,} bytes has at most {most:,} tokens "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special + at most one merge per byte)")


@dataclass
class TokenizerRef:
    origin: str  # "trained", "dir" or "hub"
    name: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    loaded: Any = None


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def resolve_tokenizer(tokenizer: str | None, vocab_size: int) -> TokenizerRef:
    """What tokenizer to use and its identity for the cache key (files hashed, or training settings)."""
    if tokenizer is None:
        return TokenizerRef("trained", identity={
            "train": "byte-level-bpe", "vocab_size": vocab_size, "min_frequency": BPE_MIN_FREQUENCY,
            "sample_chars": TOKENIZER_SAMPLE_CHARS, "special_tokens": list(SPECIAL_TOKENS),
            "tokenizers": package_version("tokenizers"),
        })
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return TokenizerRef("dir", name=str(path), identity={"dir": _hash_tokenizer_dir(path)})
    if path.exists():
        raise UserError(f"tokenizer {tokenizer} is a file; give the directory that holds it "
                        "(tokenizer.json, tokenizer_config.json)")
    if tokenizer.startswith(("/", ".", "~")) or tokenizer.count("/") > 1:
        raise UserError(f"tokenizer directory not found: {tokenizer}")
    reason = hub_offline_reason()
    tok = auto_tokenizer(tokenizer, local_files_only=reason is not None, offline_reason=reason)
    digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() \
        if getattr(tok, "backend_tokenizer", None) is not None else repr(sorted(tok.get_vocab().items()))
    return TokenizerRef("hub", name=tokenizer, identity={"hub": tokenizer, "sha256": digest}, loaded=tok)


def _hash_tokenizer_dir(path: Path) -> list[dict[str, str]]:
    """Hash the top-level files of a tokenizer directory (weights skipped: a model directory also works).

    Refuses a directory without tokenizer files at once, before anything is hashed or loaded (passing a
    data directory by mistake must not hash gigabytes).
    """
    import xxhash

    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.name in _TOKENIZER_FILES or p.suffix == ".model" for p in files):
        raise UserError(f"{path} is not a tokenizer directory (no {', '.join(sorted(_TOKENIZER_FILES))})")
    entries = []
    for f in files:
        if f.suffix in _WEIGHT_SUFFIXES or f.stat().st_size > _MAX_TOKENIZER_FILE_BYTES:
            continue
        entries.append({"path": f.name, "xxh3_128": xxhash.xxh3_128(f.read_bytes()).hexdigest()})
    return entries


def auto_tokenizer(name: str, *, local_files_only: bool = False, offline_reason: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except Exception as exc:  # OSError, ValueError, hub errors: all mean "cannot load this tokenizer"
        log.debug("data: loading tokenizer %s failed", name, exc_info=True)
        if offline_reason:
            raise UserError(f"tokenizer {name!r} is not a local directory and not in the Hugging Face cache, "
                            f"and the hub is not available ({offline_reason})") from None
        raise UserError(f"cannot load tokenizer {name!r}: {first_line(exc)}") from None


def eot_id_of(tok: Any, name: str) -> int:
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    if EOT in tok.get_vocab():
        return int(tok.convert_tokens_to_ids(EOT))
    raise UserError(f"tokenizer {name} has no end-of-text token (no eos token and no {EOT})")


def _training_texts(source: Source, *, work_dir: Path, task: Task, max_tokens: int | None = None) -> Iterator[str]:
    """Documents for tokenizer training: evenly spaced batches, at most TOKENIZER_SAMPLE_CHARS in all.

    With `max_tokens`, only the part of the corpus the cap takes is read: the first
    `max_tokens × CAPPED_BYTES_PER_TOKEN` bytes (an upper bound of a byte-level BPE's bytes per token on text).
    """
    total = source.total_bytes
    limit = min(max_tokens * CAPPED_BYTES_PER_TOKEN, TOKENIZER_SAMPLE_CHARS) if max_tokens is not None else None
    stride = max(1, math.ceil(total / TOKENIZER_SAMPLE_CHARS)) if total and limit is None else 1
    taken = 0
    batch_chars = BATCH_CHARS if limit is None else min(BATCH_CHARS, max(1 << 16, limit // 8))
    batches = source.iter_batches(batch_chars=batch_chars, work_dir=work_dir, stats=ReadStats(), quiet=True)
    for i, (docs, nbytes) in enumerate(batches):
        task.advance(nbytes)
        if i % stride:
            continue
        for doc in docs:
            yield doc
            taken += len(doc)
            if limit is not None and taken >= limit:  # the head of the corpus that the cap takes
                return
        if taken >= TOKENIZER_SAMPLE_CHARS:
            log.info("data: tokenizer trained on a %d-character sample of the corpus", taken)
            break


def train_tokenizer(source: Source, *, vocab_size: int, work_dir: Path, progress: Progress,
                    max_tokens: int | None = None) -> Any:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, `<|endoftext|>` special) on the corpus.

    Returned wrapped as a transformers `PreTrainedTokenizerFast` (eos = bos = unk = pad = `<|endoftext|>`;
    unk is never produced by a byte-level model) so `save_pretrained` writes files that
    `AutoTokenizer.from_pretrained` loads. The wrapper comes from `transformers.tokenization_utils_tokenizers`,
    which does not import torch.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    failure: list[BaseException] = []
    seen = [0]

    def texts(task: Task) -> Iterator[str]:
        # Exceptions raised inside an iterator consumed by Rust come back re-wrapped; keep the original.
        try:
            for doc in _training_texts(source, work_dir=work_dir, task=task, max_tokens=max_tokens):
                seen[0] += 1
                yield doc
        except BaseException as exc:
            failure.append(exc)
            raise

    with progress.task(f"training tokenizer (vocab {vocab_size:,})", total=source.total_bytes, unit="B") as task:
        try:
            bpe.train_from_iterator(texts(task), trainer)
        except BaseException:
            if failure:
                raise failure[0] from None
            raise
    if failure:
        raise failure[0]
    if seen[0] == 0:
        raise UserError(f"no text in {source.description}")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, unk_token=EOT,
                                  pad_token=EOT, clean_up_tokenization_spaces=False)
    if len(tok) < vocab_size:
        log.info("data: the tokenizer has %d tokens, fewer than the %d asked for (no pair in the text "
                 "occurs %d times to merge further)", len(tok), vocab_size, BPE_MIN_FREQUENCY)
    return tok


def save_tokenizer(tok: Any, directory: Path) -> None:
    """`tok.save_pretrained(directory)`, with a failure to write raised as the OSError it is.

    The Rust backend writes tokenizer.json and reports an I/O failure as a bare `Exception` whose message ends in
    "(os error N)"; made an OSError again, a full or read-only disk is told apart from a bug by its errno.
    """
    try:
        tok.save_pretrained(str(directory))
    except OSError:
        raise
    except Exception as exc:
        rust_io = _RUST_IO_ERROR.search(str(exc))
        if rust_io is None:
            raise
        code = int(rust_io["errno"])
        raise OSError(code, os.strerror(code), str(directory)) from exc


def batch_encoder(tok: Any) -> Callable[[list[str]], list[list[int]]]:
    """A function from documents to token ids without special tokens, truncation or padding.

    Fast tokenizers encode through a copy of their Rust backend with `encode_special_tokens` on, so a
    document containing the literal text `<|endoftext|>` is tokenized as text, never as a separator.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        log.warning("data: the tokenizer is not a fast (Rust) tokenizer; tokenizing will be slow")
        return lambda docs: tok(docs, add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    enc = Tokenizer.from_str(backend.to_str())
    enc.no_truncation()
    enc.no_padding()
    enc.encode_special_tokens = True
    encode = getattr(enc, "encode_batch_fast", enc.encode_batch)
    return lambda docs: [e.ids for e in encode(docs, add_special_tokens=False)]


__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOT",
    "TokenizerRef",
    "auto_tokenizer",
    "batch_encoder",
    "check_vocab_fits_corpus",
    "check_vocab_size",
    "eot_id_of",
    "resolve_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
]

"""A run's data: the splits of `RunConfig.data` as token arrays (or images),
the streams that batch them, and the text codec for prompts and samples."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import data as _data
from ._run_config import RunConfig

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """The data a run asks for is missing, empty, too small or inconsistent
    with the model (a user error; the CLI reports it as one line)."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """The splits of a run's data and its text codec (None for images)."""

    splits: dict[str, Any]
    encode: Callable[[str], np.ndarray] | None
    decode: Callable[[Any], str] | None


def load_run_data(run: RunConfig, *, splits: tuple[str, ...] = SPLITS) -> RunData:
    """Load and split `run.data` (only the named `splits` are tokenized).

    Bytes: `tvq_eqx.data.load_splits` (90/5/5, or the enwik8 split).
    SentencePiece documents and images: whole items split 90/5/5
    (`tvq_eqx.data.split_items`). Every problem with the data (missing path,
    empty or too small, a tokenizer larger than `n_vocab`) is a `DataError`
    (a `FileNotFoundError` for a missing path).
    """
    d = run.data
    if d.path is not None and not Path(d.path).exists():
        raise FileNotFoundError(f"data path {d.path!r} does not exist")
    try:
        return _load(run, splits)
    except (DataError, FileNotFoundError):
        raise
    except ValueError as e:
        raise DataError(str(e)) from e


def _load(run: RunConfig, wanted: tuple[str, ...]) -> RunData:
    d = run.data
    if d.kind == "bytes":
        return RunData(
            _data.load_splits(d.path), _data.encode_bytes, _data.decode_bytes
        )
    if d.kind == "sentencepiece":
        if d.path is None or d.tokenizer is None:
            raise DataError(
                "data kind 'sentencepiece' needs a data path (a folder of "
                "documents) and a tokenizer file"
            )
        tok = _data.SentencePieceTokenizer.load(d.tokenizer)
        if tok.vocab_size > run.model.n_vocab:
            raise DataError(
                f"tokenizer {d.tokenizer!r} has {tok.vocab_size} pieces but "
                f"n_vocab={run.model.n_vocab}; set n_vocab to {tok.vocab_size}"
            )
        parts = _data.split_items(_data.load_documents(d.path), what="documents")
        out = {}
        invalid = 0  # documents with bytes that are not UTF-8 (replaced)
        for name, docs in parts.items():
            if name not in wanted:
                continue
            enc = []
            for x in docs:
                raw = x.tobytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    invalid += 1
                    text = raw.decode("utf-8", "replace")
                enc.append(np.asarray(tok.encode(text), np.int32))
            out[name] = _data.pack_documents(enc)[0]
        if invalid:
            import warnings

            warnings.warn(
                f"{invalid} document(s) under {d.path!r} hold bytes that are not "
                "UTF-8; they were replaced by U+FFFD before tokenizing",
                UserWarning,
                stacklevel=2,
            )
        return RunData(
            out,
            lambda s: np.asarray(tok.encode(s), np.int32),
            lambda toks: tok.decode([int(t) for t in np.asarray(toks).reshape(-1)]),
        )
    if d.kind == "images":
        if d.path is None:
            raise DataError("data kind 'images' needs a data path (a folder of images)")
        return RunData(
            dict(_data.split_items(_data.load_images(d.path), what="images")),
            None,
            None,
        )
    raise DataError(f"unknown data kind {d.kind!r}")  # pragma: no cover


def make_stream(
    run: RunConfig, tokens: Any, *, train: bool, batch_size: int | None = None
) -> _data.AbstractStream:
    """The stream of `run`'s batches over one split: shuffled and repeating
    for training, in order and once for evaluation."""
    b = run.data.batch_size if batch_size is None else batch_size
    cls = _data.ImageStream if run.data.kind == "images" else _data.TokenStream
    try:
        return cls(
            tokens,
            batch_size=b,
            seq_len=run.data.seq_len,
            seed=run.seed,
            shuffle=train,
            repeat=train,
        )
    except ValueError as e:
        raise DataError(str(e)) from e

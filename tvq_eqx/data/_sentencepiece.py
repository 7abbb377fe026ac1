"""Optional sentencepiece tokenizer for word-level corpora."""

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jaxtyping import Int32, Integer

from ._bytes import TEXT_SUFFIXES, load_documents
from ._stream import _check_int

PAD_ID = 0
"""Pad id of models trained here, the same as the streams' default `pad_id`."""


def _import_sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError(
            "SentencePieceTokenizer needs the optional `sentencepiece` package, "
            "which the `sentencepiece` extra installs: "
            "`pip install 'tvq-eqx[sentencepiece]'` (or `pip install sentencepiece`)"
        ) from e
    return sentencepiece


class SentencePieceTokenizer:
    """A thin wrapper around a `sentencepiece` model.

    Build one with `SentencePieceTokenizer.train(...)` or
    `SentencePieceTokenizer.load(model_file)`. Models trained here use
    `pad=0, unk=1, bos=2, eos=3`, so padding matches the default `pad_id=0` of
    `TokenStream`.

    Raises `ImportError` naming the `sentencepiece` extra
    (`pip install 'tvq-eqx[sentencepiece]'`) when the package is missing.
    """

    def __init__(self, model_proto: bytes):
        """Wrap a serialized model (the bytes of a `.model` file)."""
        spm = _import_sentencepiece()
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._proto)

    @classmethod
    def load(cls, model_file: str | os.PathLike[str]) -> "SentencePieceTokenizer":
        """Load a `.model` file."""
        _import_sentencepiece()
        path = Path(model_file)
        if path.is_dir():
            raise ValueError(
                f"sentencepiece model {str(path)!r} is a folder; give the .model file"
            )
        if not path.exists():
            raise FileNotFoundError(f"sentencepiece model {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"sentencepiece model {str(path)!r} is not a regular file")
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError, ValueError) as e:
            first = (
                str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            )
            raise ValueError(
                f"sentencepiece model {str(path)!r} cannot be loaded ({first})"
            ) from None

    @classmethod
    def train(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        vocab_size: int,
        model_type: Literal["unigram", "bpe", "word", "char"] = "unigram",
        character_coverage: float = 1.0,
        max_sentences: int = 1_000_000,
        suffixes: tuple[str, ...] = TEXT_SUFFIXES,
    ) -> "SentencePieceTokenizer":
        """Train a model on the lines of a text corpus.

        **Arguments:**

        - `path`: as for `load_documents`: `None` (bundled corpus), a file or a
          folder of text files, read as UTF-8 (invalid bytes replaced).
        - `vocab_size`: number of pieces, special ids included.
        - `model_type`: sentencepiece algorithm.
        - `character_coverage`: fraction of characters covered by the
          vocabulary (1.0 for small alphabets such as English).
        - `max_sentences`: at most this many lines are used.
        - `suffixes`: file suffixes read from a folder.

        **Returns:**

        The trained tokenizer; `save(model_file)` writes it out.
        """
        spm = _import_sentencepiece()
        vocab_size = _check_int("vocab_size", vocab_size, minimum=5)
        docs = load_documents(path, suffixes=suffixes)

        def lines() -> Iterator[str]:
            for doc in docs:
                text = doc.tobytes().decode("utf-8", errors="replace")
                for line in text.splitlines():
                    if line.strip():
                        yield line

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            minloglevel=2,
        )
        return cls(model.getvalue())

    def save(self, model_file: str | os.PathLike[str]) -> None:
        """Write the model to `model_file` (load it back with `load`)."""
        Path(model_file).write_bytes(self._proto)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def pad_id(self) -> int:
        """Pad id of the model (-1 if it has none)."""
        return int(self._sp.pad_id())

    def encode(self, text: str) -> Int32[np.ndarray, " n"]:
        """Token ids of `text`."""
        return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

    def decode(self, ids: Integer[np.ndarray, " n"] | list[int]) -> str:
        """Text of token ids (special ids such as padding are dropped)."""
        return str(self._sp.DecodeIds([int(i) for i in ids]))

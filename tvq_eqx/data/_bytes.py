"""Byte-level corpora: the bundled Shakespeare text, files, folders, enwik8."""

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from jaxtyping import Int32, UInt8

from ._files import find_files

TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".rst")
"""File suffixes that `load_documents` reads from a folder (case-insensitive)."""

ENWIK8_SIZE = 100_000_000
"""Size in bytes of the enwik8 benchmark file."""

_ENWIK8_TRAIN = 90_000_000
_ENWIK8_VALIDATION = 5_000_000

_CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.txt"


def bundled_corpus_path() -> Path:
    """Path of the bundled corpus (four Shakespeare plays, ~0.5 MB of ASCII).

    See `corpus/ATTRIBUTION.md` next to it for the source.
    """
    if not _CORPUS.is_file():
        raise FileNotFoundError(
            f"bundled corpus {str(_CORPUS)!r} is missing; reinstall tvq-eqx"
        )
    return _CORPUS


def load_documents(
    path: str | os.PathLike[str] | None = None,
    *,
    suffixes: tuple[str, ...] = TEXT_SUFFIXES,
) -> list[UInt8[np.ndarray, " _"]]:
    """Read one or more documents as raw bytes.

    **Arguments:**

    - `path`: `None` for the bundled corpus (one document); a file (one
      document); or a folder, searched recursively for files whose suffix is in
      `suffixes` (hidden files and folders skipped), one document per non-empty
      file, sorted by relative path so the order does not depend on the
      filesystem.
    - `suffixes`: file suffixes read from a folder, compared case-insensitively.

    **Returns:**

    A list of 1-D `uint8` arrays, one per document, none empty.

    Raises `FileNotFoundError` for a missing path and `ValueError` for an empty
    file or a folder without non-empty matching files.
    """
    resolved = bundled_corpus_path() if path is None else Path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"data path {str(resolved)!r} does not exist")
    check_regular(resolved, "data path")
    if resolved.is_dir():
        files = find_files(resolved, suffixes)
        docs = [np.fromfile(f, dtype=np.uint8) for f in files]
        docs = [d for d in docs if d.size > 0]
        if not docs:
            raise ValueError(
                f"folder {str(resolved)!r} contains no non-empty files with "
                f"suffix in {suffixes}"
            )
        return docs
    data = np.fromfile(resolved, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"data file {str(resolved)!r} is empty")
    return [data]


def check_regular(path: Path, what: str) -> None:
    """`ValueError` naming `path` unless it is a regular file or a folder: a
    FIFO would block the reader forever, a device (`/dev/zero`) never ends,
    a socket cannot be read."""
    import stat

    mode = path.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise ValueError(f"{what} {str(path)!r} is {kind}; give a file or a folder")


def load_bytes(
    path: str | os.PathLike[str] | None = None,
    *,
    suffixes: tuple[str, ...] = TEXT_SUFFIXES,
    separator: bytes = b"\n",
) -> UInt8[np.ndarray, " _"]:
    """Read a byte corpus into one flat array.

    **Arguments:**

    - `path`: as for `load_documents`: `None` (bundled corpus), a file, or a
      folder of text files.
    - `suffixes`: file suffixes read from a folder.
    - `separator`: bytes put between consecutive documents of a folder (not
      after the last one), so that one file's last word is not glued to the
      next file's first.

    **Returns:**

    A 1-D `uint8` array. A single file is returned exactly as stored.
    """
    docs = load_documents(path, suffixes=suffixes)
    if len(docs) == 1:
        return docs[0]
    sep = np.frombuffer(separator, dtype=np.uint8)
    pieces: list[np.ndarray] = []
    for i, doc in enumerate(docs):
        if i > 0 and sep.size:
            pieces.append(sep)
        pieces.append(doc)
    return np.concatenate(pieces)


def split_bytes(
    data: UInt8[np.ndarray, " _"],
    *,
    enwik8: bool | None = None,
) -> dict[str, UInt8[np.ndarray, " _"]]:
    """Split a byte array into contiguous train / validation / test parts.

    With `enwik8` the standard split of the enwik8 benchmark is used: the first
    90,000,000 bytes train, the next 5,000,000 validation, the last 5,000,000
    test. Otherwise the split is 90% / 5% / 5%, contiguous and in that order,
    with validation and test of equal size `len(data) // 20`.

    **Arguments:**

    - `data`: 1-D `uint8` array.
    - `enwik8`: `True` demands the enwik8 split (and exactly `ENWIK8_SIZE`
      bytes); `False` always uses the ratio split; `None` uses the enwik8 split
      when `len(data) == ENWIK8_SIZE`.

    **Returns:**

    `dict(train=..., validation=..., test=...)` of views into `data` that
    partition it in order.
    """
    if data.ndim != 1:
        raise ValueError(f"expected 1-D data, got shape {data.shape}")
    n = int(data.shape[0])
    if enwik8 is None:
        enwik8 = n == ENWIK8_SIZE
    if enwik8:
        if n != ENWIK8_SIZE:
            raise ValueError(
                f"enwik8 must have exactly {ENWIK8_SIZE:,} bytes, got {n:,} "
                "(truncated download?)"
            )
        a, b = _ENWIK8_TRAIN, _ENWIK8_TRAIN + _ENWIK8_VALIDATION
    else:
        n_eval = n // 20
        if n_eval < 2:
            raise ValueError(
                f"data too small to split: {n} bytes gives validation/test "
                "splits of fewer than 2 bytes (need at least 40 bytes)"
            )
        a, b = n - 2 * n_eval, n - n_eval
    return {"train": data[:a], "validation": data[a:b], "test": data[b:]}


def load_splits(
    path: str | os.PathLike[str] | None = None,
    *,
    suffixes: tuple[str, ...] = TEXT_SUFFIXES,
) -> dict[str, UInt8[np.ndarray, " _"]]:
    """`load_bytes` followed by `split_bytes`.

    A file named `enwik8`, or of exactly `ENWIK8_SIZE` bytes, gets the standard
    enwik8 split (and a file named `enwik8` of any other size is an error);
    everything else the contiguous 90/5/5 split.
    """
    data = load_bytes(path, suffixes=suffixes)
    named_enwik8 = path is not None and Path(path).name == "enwik8"
    try:
        return split_bytes(data, enwik8=True if named_enwik8 else None)
    except ValueError as e:
        raise ValueError(f"cannot split {str(path)!r}: {e}") from None


def encode_bytes(text: str) -> Int32[np.ndarray, " n"]:
    """UTF-8 bytes of `text` as int32 token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode_bytes(tokens: Iterable[int] | np.ndarray) -> str:
    """The inverse of `encode_bytes`; invalid UTF-8 becomes U+FFFD."""
    return bytes(int(t) for t in np.asarray(tokens).reshape(-1)).decode(
        "utf-8", "replace"
    )

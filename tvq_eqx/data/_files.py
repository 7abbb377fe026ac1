"""Deterministic file discovery and the whole-item split shared by the text
and image loaders."""

from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable


def find_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `folder` (recursively) whose suffix is in `suffixes`.

    Suffixes compare case-insensitively; hidden files and anything inside a
    hidden folder are skipped. Sorted by relative POSIX path, so the order is
    the same on every filesystem.
    """
    wanted = {s.lower() for s in suffixes}
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if (
            p.suffix.lower() in wanted
            and not any(part.startswith(".") for part in rel.parts)
            and p.is_file()
        ):
            found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


@runtime_checkable  # the tests' beartype checks the bound at run time
class Sliceable(Protocol):
    """A list of documents or an array of images: `len` and slicing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> Any: ...


S = TypeVar("S", bound=Sliceable)


def split_items(items: S, *, what: str = "items") -> dict[str, S]:
    """Split whole items (documents, images) into contiguous train /
    validation / test parts, 90% / 5% / 5% in that order: validation and test
    hold `max(1, n // 20)` items each.

    Raises `ValueError` (naming `what`) for fewer than 3 items.
    """
    n = len(items)
    if n < 3:
        raise ValueError(f"need >= 3 {what} to split train/validation/test; got {n}")
    n_eval = max(1, n // 20)
    return dict(
        train=items[: n - 2 * n_eval],
        validation=items[n - 2 * n_eval : n - n_eval],
        test=items[n - n_eval :],
    )

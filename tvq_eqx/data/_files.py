"""Deterministic file discovery shared by the text and image loaders."""

from pathlib import Path


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

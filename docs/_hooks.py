"""mkdocs hooks (mkdocs.yml `hooks:`): publish a few files that live outside
docs/ and make the guides' links to them resolve.

The guides link to `../benchmarks/results/...` and
`../pallas_kernels/vq_attention/README.md`, relative to docs/ so that they
work when reading the repository. mkdocs only serves files under docs/, so
these files are added to the site under their repository path and the `../`
is dropped from links that point at them.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ["benchmarks/results", "pallas_kernels/vq_attention/README.md"]
SUFFIXES = {".md", ".png", ".svg"}
_LINK = re.compile(
    r"\]\(\.\./((?:" + "|".join(re.escape(p) for p in PUBLISHED) + r")[^)\s]*)\)"
)


def on_files(files, config):
    for entry in PUBLISHED:
        path = ROOT / entry
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if f.suffix in SUFFIXES:
                uri = f.relative_to(ROOT).as_posix()
                files.append(File.generated(config, uri, abs_src_path=str(f)))
    return files


def on_page_markdown(markdown, page, config, files):
    # Only pages at the top of docs/ use `../` to reach the repository root.
    if "/" in page.file.src_uri:
        return markdown
    return _LINK.sub(r"](\1)", markdown)

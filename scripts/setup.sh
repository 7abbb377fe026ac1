#!/usr/bin/env bash
# Create .venv (Python >= 3.12 when available, so jax >= 0.11 is used, the
# generation GPU machines run) and install tvq-eqx in editable mode with what
# the demo, the tests and CI's checks need: the test extra (which includes the
# cli, images, sentencepiece and tracker extras), aot, docs (mkdocs) and dev (ruff,
# pyright).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  py=""
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python" python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ]; then
      if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        py="$cand"; break
      fi
    fi
  done
  [ -n "$py" ] || { echo "setup.sh: need Python >= 3.11" >&2; exit 1; }
  "$py" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
.venv/bin/pip install -q -e ".[test,aot,docs,dev]"
# libtpu (the TPU compile gate's compiler; pyproject's aot-tpu extra) goes to
# .venv/libtpu, outside site-packages: see benchmarks/_libtpu.py.
libtpu_req=$(.venv/bin/python - <<'PY'
import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["aot-tpu"]
print(extra[0])
PY
)
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  want=$(echo ${libtpu_req%%;*})
  have=""
  for info in .venv/libtpu/libtpu-*.dist-info; do
    if [ -d "$info" ]; then
      have="libtpu==$(basename "$info" .dist-info | sed 's/^libtpu-//')"
    fi
  done
  if [ "$have" != "$want" ]; then
    rm -rf .venv/libtpu
    .venv/bin/pip install -q --no-deps --target .venv/libtpu "$want"
  fi
fi

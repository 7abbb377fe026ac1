#!/usr/bin/env bash
# Create .venv (Python >= 3.12 when available, so jax >= 0.11 is used, the
# generation GPU machines run) and install tvq-eqx in editable mode with what
# the demo, the tests and CI's checks need: the test extra (which includes the
# cli, images and sentencepiece extras), aot, docs (mkdocs) and dev (ruff,
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

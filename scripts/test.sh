#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, spread over the CPU cores
# (pytest-xdist; pass `-n 0` to run in one process, e.g. with --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto "$@"

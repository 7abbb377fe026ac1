#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, spread over the CPU cores
# (pytest-xdist; pass `-n 0` to run in one process, e.g. with --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# A test whose worker process crashes (a segfault in a compiler, not a test
# failure) runs once more; failures are never rerun ('(?!)' matches nothing).
# Not with --pdb, which the rerun plugin refuses.
rerun=(--reruns 1 --only-rerun '(?!)')
for arg in "$@"; do [[ "$arg" == --pdb ]] && rerun=(); done
exec .venv/bin/python -m pytest -q -n auto "${rerun[@]}" "$@"

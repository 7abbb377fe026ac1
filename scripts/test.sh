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
# --dist worksteal: each worker starts on a contiguous half of the tests (so a
# module's fixtures mostly build once) and an idle worker takes half of what
# the other has left (no long tail of queued tests behind one slow test).
exec .venv/bin/python -m pytest -q -n auto --dist worksteal "${rerun[@]}" "$@"

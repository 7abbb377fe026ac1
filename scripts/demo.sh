#!/usr/bin/env bash
# Set up (idempotent; the library and its cli extra only, see setup.sh),
# train the tiny preset on the bundled corpus, report validation bits per byte
# and print a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
exec .venv/bin/python -m tvq_eqx train --preset tiny "$@"

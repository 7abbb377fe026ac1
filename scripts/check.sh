#!/usr/bin/env bash
# Set up (idempotent) and run the static checks CI runs besides the tests:
# ruff lint, ruff format, pyright (basic, on the library) and the docs site
# build (mkdocs --strict). Runs all of them, then fails if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
bin=.venv/bin
failed=()
step() {
  echo "== $*"
  "$@" || failed+=("$*")
}
step "$bin/ruff" check .
step "$bin/ruff" format --check .
# pyright reads [tool.pyright] in pyproject.toml (what to check, basic mode);
# --pythonpath points it at the venv that has jax & co.
step "$bin/pyright" --pythonpath "$bin/python"
NO_MKDOCS_2_WARNING=1 step "$bin/mkdocs" build --strict --quiet
if [ ${#failed[@]} -gt 0 ]; then
  printf 'check.sh: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "check.sh: all checks passed"

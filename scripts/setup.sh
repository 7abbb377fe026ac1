#!/usr/bin/env bash
# Create .venv (Python >= 3.12 when available, so jax >= 0.11 is used, the
# generation GPU machines run) and install tvq-eqx in editable mode.
#
#   scripts/setup.sh        everything the tests and CI's checks need: the test
#                           extra (which includes the cli, images,
#                           sentencepiece, weights and tracker extras), aot,
#                           docs (mkdocs), dev (ruff, pyright) and libtpu
#                           beside the venv
#   scripts/setup.sh demo   only what the demo needs (the library and the cli
#                           extra): a newcomer's first command does not wait
#                           for triton, mkdocs, pyright and libtpu
#   scripts/setup.sh floors .venv-floors: the test extra with every library
#                           dependency (and the cli, images, sentencepiece,
#                           weights extras) pinned to its pyproject floor, the
#                           oldest versions we test (scripts/test_floors.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-full}
venv=.venv
case "$profile" in
  full) extras="test,aot,docs,dev" ;;
  demo) extras="cli" ;;
  floors) extras="test"; venv=.venv-floors ;;
  *) echo "setup.sh: unknown profile '$profile' (expected: full, demo or floors)" >&2; exit 2 ;;
esac
if [ ! -x $venv/bin/python ]; then
  py=""
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python" python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ]; then
      if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        py="$cand"; break
      fi
    fi
  done
  [ -n "$py" ] || { echo "setup.sh: need Python >= 3.11" >&2; exit 1; }
  "$py" -m venv $venv
  $venv/bin/pip install -q --upgrade pip
fi
constraints=()
if [ "$profile" = floors ]; then
  # `name>=X` becomes `name==X` for the library's dependencies and the extras
  # the library's features use; the test tools (pytest & co.) stay free.
  $venv/bin/python - > $venv/floors.txt <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + [
    r for extra in ("cli", "images", "sentencepiece", "weights") for r in extras[extra]
]:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)>=([^,;]+)(?:,.*)?", req).groups()
    print(f"{name.split('[')[0]}=={floor}")
# pyparsing 3.3 deprecates names matplotlib < 3.11 calls: a warning for users,
# an error under the suite's filterwarnings=error. The floors get the
# pyparsing of their time.
print("pyparsing<3.3")
PY
  constraints=(-c $venv/floors.txt)
fi
$venv/bin/pip install -q "${constraints[@]}" -e ".[$extras]"
[ "$profile" = full ] || exit 0
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

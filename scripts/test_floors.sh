#!/usr/bin/env bash
# The dependency floors, tested: set up .venv-floors (scripts/setup.sh
# floors: every library dependency and feature extra at its pyproject `>=`
# version) and run a fast subset of the suite that touches each dependency:
# the model and ops (jax, equinox, jaxtyping), the optimizer and train steps
# (optax, incl. optax.tree), context parallelism (jax.shard_map, jax.set_mesh),
# checkpoints, sampling and the CLI (tyro, tqdm, matplotlib). Extra arguments
# go to pytest. CI runs it after the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh floors
.venv-floors/bin/python -c 'import jax, equinox, optax, jaxtyping; print("floors:", *(f"{m.__name__} {m.__version__}" for m in (jax, equinox, optax, jaxtyping)))'
exec .venv-floors/bin/python -m pytest -q -n auto --dist worksteal -m "not slow" \
  tests/test_model.py tests/test_loss.py tests/test_train.py tests/test_sampling.py \
  tests/test_context_parallel.py tests/test_checkpoint.py tests/test_cli.py \
  tests/test_weights.py "$@"

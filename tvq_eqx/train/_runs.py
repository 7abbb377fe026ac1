"""Run folders: a fresh train state for a `RunConfig`, and the config and
state of a run folder's newest checkpoint (`RUN_DIR/checkpoints`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from ..nn import Transformer
from ._checkpoint import CheckpointError, load_checkpoint, read_meta
from ._optimizer import optimizer_from_config
from ._run_config import RunConfig
from ._steps import TrainState, init_train_state


def checkpoints_of(run_dir: str | os.PathLike) -> Path:
    """The checkpoint folder of a run folder."""
    return Path(run_dir) / "checkpoints"


def new_train_state(run: RunConfig) -> TrainState:
    """Parameters from key `run.seed`, optimizer state for
    `optimizer_from_config(run.optimizer, run.steps)`, dropout key
    `run.seed + 1`."""
    model = Transformer(run.model, key=jax.random.key(run.seed))
    return init_train_state(
        model,
        optimizer_from_config(run.optimizer, run.steps),
        run.data.batch_size,
        key=jax.random.key(run.seed + 1),
    )


def load_run(
    run_dir: str | os.PathLike,
) -> tuple[RunConfig, TrainState, dict[str, Any]]:
    """`(run config, train state, checkpoint meta)` of the newest checkpoint in
    `run_dir` (`CheckpointError` when there is none or it is corrupt)."""
    ckpt = checkpoints_of(run_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints in {run_dir} (expected {ckpt})")
    meta = read_meta(ckpt)
    try:
        run = RunConfig.from_dict(meta["run"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{meta['path']}: bad run config in meta.json: {e}"
        ) from None
    like = eqx.filter_eval_shape(new_train_state, run)
    ts, meta = load_checkpoint(meta["path"], like)
    return run, ts, meta

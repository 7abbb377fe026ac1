"""Experiment trackers as `fit` callbacks: TensorBoard (tensorboardX),
Weights & Biases and trackio. Each logs the run's settings once and the
numbers of every record the JSONL log gets (that log stays the source of
truth), under `train/NAME` and `validation/NAME` at the record's update.
Each library is an extra, imported when a tracker is made."""

from __future__ import annotations

import abc
import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import jax

from ._fit import Callback, FitResult
from ._run_config import RunConfig

TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "trackio")


def _import(module: str, extra: str) -> ModuleType:
    """`module`, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the {extra} tracker needs the {module} package: "
            f"pip install 'tvq-eqx[{extra}]'"
        ) from e


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a `fit` record as tracker scalars: `SPLIT/NAME` for
    every int or float field but `step` (`mfu` when unknown, None, is left
    out), in the record's order."""
    split = record.get("split", "train")
    out = {}
    for name, value in record.items():
        if name in ("split", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[f"{split}/{name}"] = float(value)
    return out


class Tracker(Callback, abc.ABC):
    """What the trackers share: the library is started at the first record
    (after the first update, so that a run failing at its first step leaves
    nothing behind, as the run folder), gets the run's settings then, every
    training and validation record's numbers (`tracker_scalars`) at the
    record's update, and is closed at the end of `fit` (or by `close()`, for
    a run that ended in an exception). Only the first process of a
    multi-process run logs."""

    def __init__(self) -> None:
        self.run: RunConfig | None = None
        self.started = False
        self.closed = False

    # The library's side: each tracker (TensorBoard, W&B, trackio) writes
    # these; Tracker itself cannot be instantiated.
    @abc.abstractmethod
    def _open(self, config: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def _log(self, scalars: dict[str, float], step: int) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def on_start(self, *, run: RunConfig, start_step: int, stop_step: int) -> None:
        self.run = run

    def _record(self, record: dict[str, Any]) -> None:
        if jax.process_index() != 0 or self.closed:
            return
        if not self.started:
            self.started = True
            self._open({} if self.run is None else self.run.to_dict())
        scalars = tracker_scalars(record)
        if scalars:
            self._log(scalars, int(record["step"]))

    def on_log(self, record: dict[str, Any]) -> None:
        self._record(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        self._record(record)

    def on_end(self, result: FitResult) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the library's run (idempotent)."""
        if self.started and not self.closed:
            self._close()
        self.closed = True


class TensorBoardTracker(Tracker):
    """TensorBoard event files in `log_dir` (`tensorboard --logdir DIR`),
    written by tensorboardX (no TensorFlow or PyTorch). TensorBoard's
    scalars are float32: each is the JSONL log's number rounded to float32.
    The run's settings are a text summary `run_config` (JSON) at update 0."""

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__()
        self._tbx = _import("tensorboardX", "tensorboard")
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def _open(self, config: dict[str, Any]) -> None:
        self.writer = self._tbx.SummaryWriter(str(self.log_dir))
        text = "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"
        self.writer.add_text("run_config", text, 0)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def _close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run: `wandb.init(project=..., name=..., dir=...,
    config=<the run's settings>, **init_kwargs)`, then `run.log(scalars,
    step=update)`. `mode="offline"` (or `$WANDB_MODE=offline`) writes the
    run under `dir/wandb/` for a later `wandb sync`, without an account."""

    def __init__(
        self,
        *,
        project: str = "tvq-eqx",
        name: str | None = None,
        dir: str | os.PathLike | None = None,
        mode: str | None = None,
        **init_kwargs: Any,
    ):
        super().__init__()
        self._wandb = _import("wandb", "wandb")
        self.init_kwargs = dict(
            project=project,
            name=name,
            dir=None if dir is None else str(dir),
            mode=mode,
            **init_kwargs,
        )
        self.wandb_run: Any = None

    def _open(self, config: dict[str, Any]) -> None:
        if self.init_kwargs["dir"] is not None:
            Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.wandb_run = self._wandb.init(config=config, **self.init_kwargs)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        self.wandb_run.log(scalars, step=step)

    def _close(self) -> None:
        self.wandb_run.finish()


class TrackioTracker(Tracker):
    """A trackio run (a local SQLite database under `$TRACKIO_DIR`, default
    `~/.cache/huggingface/trackio`; `trackio show --project PROJECT` opens
    the dashboard): `trackio.init(project=..., name=..., config=<the run's
    settings>, **init_kwargs)` with its CPU/GPU system logging off unless
    asked for, then `log(scalars, step=update)`."""

    def __init__(
        self, *, project: str = "tvq-eqx", name: str | None = None, **init_kwargs: Any
    ):
        super().__init__()
        self._trackio = _import("trackio", "trackio")
        self.init_kwargs = dict(
            project=project,
            name=name,
            auto_log_cpu=False,
            auto_log_gpu=False,
            embed=False,
            **init_kwargs,
        )
        self.trackio_run: Any = None

    def _open(self, config: dict[str, Any]) -> None:
        self.trackio_run = self._trackio.init(config=config, **self.init_kwargs)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio_run.log(scalars, step=step)

    def _close(self) -> None:
        self.trackio_run.finish()


def make_tracker(
    name: str, run_dir: str | os.PathLike, *, run_name: str | None = None
) -> Tracker:
    """The tracker the command line's `--tracker NAME` makes for the run
    folder `run_dir`: `tensorboard` (event files in `run_dir/tensorboard`),
    `wandb` (project `tvq-eqx`, files under `run_dir/wandb`; `$WANDB_MODE`
    chooses online or offline), `trackio` (project `tvq-eqx`, under
    `$TRACKIO_DIR`); each run named `run_name` (default: the folder's
    name)."""
    run_dir = Path(run_dir)
    run_name = run_dir.name if run_name is None else run_name
    if name == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    if name == "wandb":
        return WandbTracker(name=run_name, dir=run_dir)
    if name == "trackio":
        return TrackioTracker(name=run_name)
    raise ValueError(f"tracker must be one of {', '.join(TRACKERS)}; got {name!r}")

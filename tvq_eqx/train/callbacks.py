"""`fit` callbacks (public: the command line uses them, and so can a user's
own loop): the JSONL metrics log, the run-folder writer, the tqdm progress
bar, the PNG learning curves, the experiment trackers (TensorBoard, Weights &
Biases, trackio) and the `jax.profiler` trace of chosen updates. tqdm and
matplotlib (the `[cli]` extra) and each tracker's library (its own extra) are
imported only when these are used.

    from tvq_eqx import train
    from tvq_eqx.train.callbacks import JSONLLogger, ProgressBar, TensorBoardTracker

    log = JSONLLogger(run_dir / "metrics.jsonl")
    train.fit(..., callbacks=[log, ProgressBar(unit_name="bits per byte"),
                              TensorBoardTracker(run_dir / "tensorboard")])
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from ._fit import Callback, FitResult
from ._run_config import RunConfig
from ._trackers import TRACKERS as TRACKERS
from ._trackers import TensorBoardTracker as TensorBoardTracker
from ._trackers import Tracker as Tracker
from ._trackers import TrackioTracker as TrackioTracker
from ._trackers import WandbTracker as WandbTracker
from ._trackers import make_tracker as make_tracker
from ._trackers import tracker_scalars as tracker_scalars
from .runs import start_run_dir


def writes_files() -> bool:
    """Whether this process writes the run folder: the first one of a
    multi-process (`--distributed`) run; every process sees the same records."""
    return jax.process_index() == 0


class JSONLLogger(Callback):
    """Appends every train / validation record to `path`, one JSON object per
    line. On resume (`resume_step`), entries after that step are dropped first;
    with `append=True` (an evaluation adding to a run's log) nothing is;
    otherwise an existing file is replaced. The file is touched only at the
    first record (a run that fails before it leaves the old log as it was).
    Only the first process of a multi-process run writes."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        append: bool = False,
    ):
        self.path = Path(path)
        self.resume_step = resume_step
        self._prepared = append

    def _prepare(self) -> None:
        self._prepared = True
        if self.resume_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= self.resume_step:
                        kept.append(line)
                except ValueError:
                    continue
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        elif self.resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: Mapping[str, Any]) -> None:
        if not writes_files():
            return
        if not self._prepared:
            self._prepare()
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")

    def on_log(self, record: dict[str, Any]) -> None:
        self.write(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        self.write(record)

    def on_checkpoint(self, step: int, path: Path) -> None:
        # The log is durable whenever a checkpoint is (power loss included):
        # what a resume keeps of it is on disk.
        if writes_files() and self.path.is_file():
            with open(self.path, "a") as f:
                os.fsync(f.fileno())


class RunFolderWriter(Callback):
    """Creates the run folder and writes its `run.json` after the first
    completed update (or before the first record or checkpoint), so a run
    that fails at its first step (a setting that fails only when the model
    runs, out of memory) writes nothing. Put it first in the callbacks."""

    def __init__(
        self, run_dir: str | os.PathLike, run: RunConfig, run_id: str | None = None
    ):
        self.run_dir, self.run, self.run_id = Path(run_dir), run, run_id
        self.written = False

    def _write(self) -> None:
        if not self.written:
            self.written = True
            if writes_files():
                start_run_dir(self.run_dir, self.run, run_id=self.run_id)

    def on_step(self, step, metrics, train_state) -> None:
        self._write()

    def on_eval_start(self, step: int) -> None:
        self._write()


class ProgressBar(Callback):
    """A tqdm bar over optimizer updates on stderr, with loss, bits per token
    and throughput; validation results printed above it."""

    def __init__(self, *, unit_name: str, disable: bool = False):
        self.unit_name = unit_name
        self.disable = disable
        self.bar: Any = None

    def on_start(self, *, run: RunConfig, start_step: int, stop_step: int) -> None:
        from tqdm import tqdm

        self.upb = run.updates_per_batch
        self.bar = tqdm(
            total=stop_step,
            initial=start_step,
            desc="train",
            unit="upd",
            disable=self.disable,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def on_step(self, step, metrics, train_state) -> None:
        self.bar.update(self.upb)

    def on_log(self, record: dict[str, Any]) -> None:
        mfu = record.get("mfu")
        self.bar.set_postfix(
            loss=f"{record['lm_loss']:.3f}",
            bpt=f"{record['bits_per_token']:.3f}",
            tok_s=f"{record['tokens_per_s']:,.0f}",
            # Unknown peak (an unlisted device): "?" rather than a guess.
            mfu="?" if mfu is None else f"{mfu:.1%}",
            refresh=False,
        )

    def on_eval_start(self, step: int) -> None:
        self.bar.set_description(f"eval@{step}")

    def on_eval(self, record: dict[str, Any]) -> None:
        self.bar.set_description("train")
        self.bar.write(
            f"step {record['step']}: validation {self.unit_name} "
            f"{record['bits_per_token']:.4f}"
        )

    def on_end(self, result: FitResult) -> None:
        self.bar.close()


class ProfileTrace(Callback):
    """A `jax.profiler` trace of updates `first..last` (1-based, whole
    batches: a batch of several updates is traced whole) into `log_dir`
    (`plugins/profile/<time>/*.xplane.pb`; TensorBoard's profile plugin,
    Perfetto or XProf read it). The trace starts before the batch holding
    update `first`, once the work before it is done, and stops after the
    batch holding `last` once its results are ready, so it covers exactly
    that work (and an evaluation or checkpoint falling inside). A run that
    ends earlier stops it at the end of `fit`; one that raised, at
    `close()`."""

    def __init__(self, log_dir: str | os.PathLike, first: int, last: int):
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise ValueError(f"first must be an update number >= 1; got {first!r}")
        if isinstance(last, bool) or not isinstance(last, int) or last < first:
            raise ValueError(f"last must be an int >= first={first}; got {last!r}")
        self.log_dir, self.first, self.last = Path(log_dir), first, last
        self.active = False
        self.done = False
        self.traced: list[int] = []  # the updates whose batches ran traced

    def _starts_after(self, step: int) -> bool:
        """Whether the trace starts before the next batch (updates step+1
        .. step+upb): it holds one of first..last."""
        return (
            not (self.done or self.active)
            and step + 1 <= self.last
            and step + self.upb >= self.first
        )

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.log_dir))
        self.active = True

    def _stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True

    def on_start(self, *, run: RunConfig, start_step: int, stop_step: int) -> None:
        self.upb = run.updates_per_batch
        if self._starts_after(start_step):
            self._start()

    def on_step(self, step, metrics, train_state) -> None:
        if self.active:
            self.traced.extend(range(step - self.upb + 1, step + 1))
        stop = self.active and step >= self.last
        start = self._starts_after(step)
        if stop or start:
            # The batch's work is finished before the trace stops or starts,
            # so it holds exactly the traced batches' work (the loop waits
            # only here, not at the other batches).
            jax.block_until_ready((metrics, train_state))
        if stop:
            self._stop()
        if start:
            self._start()

    def on_end(self, result: FitResult) -> None:
        self._stop()

    def close(self) -> None:
        """Stop the trace if it runs (a `fit` that raised; idempotent)."""
        self._stop()


def plot_curves(
    metrics_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    unit: str = "bits per byte",
) -> Path | None:
    """PNG of training and validation bits per token against optimizer
    updates from a JSONL log; None when the log holds neither (or in a
    process that does not write the run folder)."""
    if not writes_files():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    train, val = [], []
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "train":
            train.append((r["step"], r["bits_per_token"]))
        elif r.get("split") == "validation":
            val.append((r["step"], r["bits_per_token"]))
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=False), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer update")
    ax.set_ylabel(unit)
    ax.set_title("Transformer-VQ training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path

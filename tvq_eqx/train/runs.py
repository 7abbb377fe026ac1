"""Run folders (`RUN_DIR/run.json`, `RUN_DIR/checkpoints/`): a fresh train
state for a `RunConfig`, loading a run's newest intact (or a chosen)
checkpoint, and the policy of when a folder may be trained into: a fresh run
never writes into a folder that holds checkpoints, a resumed one may change
only `steps` (to extend the run), and one training process per folder
(`RunLock`, `RunFolderGuard`).

Public as a module: this is the command line's policy for run folders,
reusable by a user's own script; `tvq_eqx.train` itself re-exports only what
any loop needs (`load_run`, `new_train_state`, `for_mesh`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh

from ..nn import Transformer
from ._checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointWarning,
    _fsync_dir,
    _read_pointer,
    checkpoint_candidates,
    checkpoint_name,
    checkpoint_step,
    has_checkpoints,
    list_checkpoints,
    load_checkpoint,
    read_meta,
)
from ._fit import Callback
from ._optimizer import optimizer_from_config
from ._run_config import RunConfig
from ._steps import DATA_AXIS, SEQ_AXIS, TrainState, has_seq_axis, init_train_state


class RunDirError(ValueError):
    """A run folder cannot be used as asked: it is a file, a fresh run would
    overwrite its checkpoints, or a resume asks for other settings (a user
    error; the CLI reports it as one line)."""


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


def for_mesh(
    run: RunConfig, train_state: TrainState | None, mesh: Mesh | None
) -> tuple[RunConfig, TrainState | None]:
    """`run` and `train_state` (None: none yet) with the model's context
    parallelism set for `mesh`: attention split over its `"seq"` axis (batch
    over `"data"`) when it has one of size > 1, else off. The axes are
    run-time settings in the (static) model config, which every model-shaped
    part of the state (the optimizer's moments too) carries: the state is
    rebuilt around the same arrays."""
    if has_seq_axis(mesh):
        axes = dict(seq_axis=SEQ_AXIS, batch_axis=DATA_AXIS)
    else:
        axes = dict(seq_axis=None, batch_axis=None)
    if all(getattr(run.model, k) == v for k, v in axes.items()):
        return run, train_state
    run = run.replace(model=run.model.replace(**axes))
    if train_state is None:
        return run, None
    like = eqx.filter_eval_shape(new_train_state, run)
    leaves = jax.tree.leaves(train_state)
    shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(like)]
    if [(x.shape, x.dtype) for x in leaves] != shapes:
        raise ValueError("the train state does not match its run config")
    return run, jax.tree.unflatten(jax.tree.structure(like), leaves)


def _check_not_a_file(run_dir: Path) -> None:
    """`RunDirError` when `run_dir` or a folder above it is a file."""
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == run_dir else f"lies under the file {p}"
                raise RunDirError(f"run folder {run_dir} {what}, not a folder")
            return


def _load_one(path: Path) -> tuple[RunConfig, TrainState, dict[str, Any]]:
    meta = read_meta(path)
    try:
        run = RunConfig.from_dict(meta["run"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad run config in meta.json: {e}") from None
    like = eqx.filter_eval_shape(new_train_state, run)
    ts, meta = load_checkpoint(path, like)
    return run, ts, meta


def load_run(
    run_dir: str | os.PathLike, *, step: int | None = None
) -> tuple[RunConfig, TrainState, dict[str, Any]]:
    """`(run config, train state, checkpoint meta)` of a run folder's
    checkpoint of update `step`, or by default of its newest intact one.

    Default order: the checkpoint `LATEST` names, then the others newest
    first (found by scanning, so a lost `LATEST` loses nothing). A corrupt or
    incomplete one is skipped with a `CheckpointWarning` naming it and why,
    as is a missing or wrong `LATEST`. `CheckpointError` when there is no
    checkpoint, none is intact, or checkpoint `step` is missing or corrupt
    (a chosen checkpoint has no fallback).
    """
    run_dir = Path(run_dir)
    try:
        _check_not_a_file(run_dir)
    except RunDirError as e:
        raise CheckpointError(str(e)) from None
    ckpt = checkpoints_of(run_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints in {run_dir} (expected {ckpt})")
    folder_run, folder_id = read_run_json(run_dir)
    if step is not None:
        path = ckpt / checkpoint_name(step)
        if not path.is_dir():
            have = [checkpoint_step(p) for p in list_checkpoints(ckpt)]
            raise CheckpointError(
                f"no checkpoint of update {step} in {ckpt} (complete ones: "
                f"{', '.join(map(str, have)) or 'none'})"
            )
        reason = foreign_reason(read_meta(path), folder_run, folder_id)
        if reason is not None:
            raise CheckpointError(f"{path} is not this run's checkpoint: {reason}")
        return _load_one(path)
    candidates = checkpoint_candidates(ckpt)
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {ckpt}")
    notes: list[str] = []
    pointer = ckpt / LATEST
    name = _read_pointer(pointer) if pointer.is_file() else None
    if not pointer.is_file():
        notes.append(f"{pointer} is missing; checkpoints found by scanning")
    elif name is None:
        notes.append(f"{pointer} is unreadable; checkpoints found by scanning")
    elif (ckpt / name) not in candidates:
        notes.append(f"{pointer} names {name!r}, which does not exist")
    skipped: list[str] = []
    for path in candidates:
        try:
            reason = foreign_reason(read_meta(path), folder_run, folder_id)
            if reason is not None:
                raise CheckpointError(f"not this run's checkpoint: {reason}")
            out = _load_one(path)
        except CheckpointError as e:
            skipped.append(f"{path.name} ({e})")
            continue
        for note in notes:
            warnings.warn(f"{note}; using {path.name}", CheckpointWarning, 2)
        for s in skipped:
            warnings.warn(
                f"skipped checkpoint {s}; using {path.name}", CheckpointWarning, 2
            )
        return out
    raise CheckpointError(f"no intact checkpoint in {ckpt}: " + "; ".join(skipped))


def default_run_dir(preset: str, *, resume: bool, root: str = "runs") -> Path:
    """`ROOT/PRESET`; when that already holds a checkpoint and this is not a
    resume, the first free `ROOT/PRESET-2`, `-3`, ... (so re-running the demo
    never overwrites, and never fails)."""
    base = Path(root) / preset
    if resume:
        return base
    candidate, i = base, 1
    while has_checkpoints(checkpoints_of(candidate)) or (
        candidate.exists() and not candidate.is_dir()
    ):
        i += 1
        candidate = base.with_name(f"{preset}-{i}")
    return candidate


def check_new_run_dir(run_dir: str | os.PathLike) -> None:
    """`RunDirError` unless a fresh run may write into `run_dir`: it must
    not be a file (nor lie under one) and must hold no checkpoint, complete or
    not (`LATEST` lost or not). Writes nothing."""
    run_dir = Path(run_dir)
    _check_not_a_file(run_dir)
    ckpt = checkpoints_of(run_dir)
    if ckpt.exists() and not ckpt.is_dir():
        raise RunDirError(f"{ckpt} is a file, not a folder")
    if has_checkpoints(ckpt):
        raise RunDirError(
            f"{ckpt} already holds checkpoints; continue the run with --resume "
            "or choose another --run-dir (nothing was written)"
        )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where nested dicts `a` and `b` differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


# Settings a resume may change: the length, the safety nets, which change
# nothing while training stays finite and unpreempted, and the gradient
# accumulation, which changes only the memory (the update is the whole
# batch's; e.g. resume on a device with less memory).
RESUME_MAY_CHANGE = (
    "steps",
    "on_nonfinite",
    "max_skipped",
    "save_every_minutes",
    "grad_accum",
)


def check_resume(saved: RunConfig, run: RunConfig, meta: dict[str, Any]) -> None:
    """`RunDirError` unless `run` may continue checkpoint `meta` of a run
    with settings `saved`: every field equal except `steps` (which may move:
    extend a finished run, shorten an unfinished one, but not below the
    checkpoint's update), the safety nets `on_nonfinite`, `max_skipped`,
    `save_every_minutes`, and `grad_accum`. The new `steps` defines the learning-rate schedule
    from the checkpoint on (docs/training.md, "Resuming")."""
    bad = [
        k
        for k in _differences(run.to_dict(), saved.to_dict())
        if k not in RESUME_MAY_CHANGE
    ]
    if bad:
        raise RunDirError(
            f"--resume: flags {bad} differ from the checkpoint's run config "
            f"({meta['path']}); resume with the same settings (only --steps and "
            "the safety nets --on-nonfinite, --max-skipped, --save-every-minutes "
            "and --grad-accum may change) or use a new --run-dir"
        )
    done = int(meta["step"])
    if run.steps < done:
        raise RunDirError(
            f"--steps {run.steps} is below the checkpoint's update {done} "
            f"({meta['path']}); give --steps >= {done}"
        )


def is_finished(run: RunConfig, meta: dict[str, Any]) -> bool:
    """Whether checkpoint `meta` ends `run`: all `run.steps` updates and the
    final evaluation done (nothing left to do)."""
    completed = meta.get("completed", "validation" in meta)
    return int(meta["step"]) >= run.steps and bool(completed)


def start_run_dir(
    run_dir: str | os.PathLike, run: RunConfig, *, run_id: str | None = None
) -> Path:
    """Create `run_dir` and write its `run.json` (the run's settings, and
    its `run_id` when given: `RunConfig.from_dict` takes the file without
    it), durably (fsynced); the caller has checked the folder
    (`check_new_run_dir` or a resume)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    tmp = path.with_name(".run.json.tmp")
    content = run.to_dict()
    if run_id is not None:
        content["run_id"] = run_id
    with open(tmp, "w") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(run_dir)
    return path


def new_run_id() -> str:
    """A fresh run id (12 hex digits), stored in `run.json` and every
    checkpoint's meta: loading refuses another run's checkpoint by it."""
    import uuid

    return uuid.uuid4().hex[:12]


def read_run_json(run_dir: str | os.PathLike) -> tuple[dict | None, str | None]:
    """`(run settings, run id)` from `RUN_DIR/run.json`; None for what it
    does not hold (a missing or unreadable file: nothing to compare with)."""
    try:
        content = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(content, dict):
        return None, None
    run_id = content.pop("run_id", None)
    return content, run_id if isinstance(run_id, str) else None


def foreign_reason(
    meta: dict[str, Any], folder_run: dict | None, folder_id: str | None
) -> str | None:
    """Why checkpoint `meta` does not belong to the run folder whose
    `run.json` holds `folder_run` / `folder_id` (None: it belongs): another
    run id, or another configuration (any setting but those a resume may
    change)."""
    theirs = meta.get("run_id")
    if folder_id is not None and theirs is not None and theirs != folder_id:
        return (
            f"it belongs to another run (run_id {theirs}; this folder's is {folder_id})"
        )
    if folder_run is not None and isinstance(meta.get("run"), dict):
        try:  # both in today's layout (older files may hold the flat one)
            mine = RunConfig.from_dict(folder_run).to_dict()
            ckpt = RunConfig.from_dict(meta["run"]).to_dict()
        except (KeyError, TypeError, ValueError):
            return None  # unreadable settings: _load_one names the problem
        differ = [k for k in _differences(ckpt, mine) if k not in RESUME_MAY_CHANGE]
        if differ:
            return f"its settings differ from run.json's: {differ}"
    return None


LOCK_NAME = ".lock"


class RunLock:
    """The exclusive right of one process to train into a run folder.

    An advisory `flock` on `RUN_DIR/.lock`, which holds the owner's pid: a
    second `train` on the folder is refused naming that pid. The kernel drops
    the lock when its process ends, however it ends (SIGKILL, a crash), so a
    lock left by a killed run is never stale: the next run takes it over.
    Use as a context manager; `acquire` creates the folder.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> RunLock:
        import fcntl

        _check_not_a_file(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.run_dir} is in use by another training process (pid "
                f"{holder}); wait for it to end, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoints_seen(run_dir: str | os.PathLike) -> list:
    """The checkpoints of `run_dir` as a resume sees them when it loads one
    (`RunFolderGuard` compares them again under the lock)."""
    return checkpoint_candidates(checkpoints_of(run_dir))


class RunFolderGuard(Callback):
    """One training process per run folder, as a `fit` callback.

    The folder is locked (`RunLock`, by the first process only) now if it
    exists, else at the first completed update (a fresh run writes nothing
    before it). Under the lock, what was checked before it is checked again,
    since another run may have written in between: a fresh run's folder must
    still hold no checkpoints, a resumed run's checkpoints must be those it
    saw when it loaded (`seen`, from `checkpoints_seen`). Release with
    `release()` or as a context manager."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        resumed_from: dict[str, Any] | None = None,
        seen: list | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.resumed_from = resumed_from
        self.seen = [] if seen is None else seen
        self._lock: RunLock | None = None
        if self.run_dir.is_dir():
            self.acquire()

    def acquire(self) -> None:
        if self._lock is not None or jax.process_index() != 0:
            return
        self._lock = RunLock(self.run_dir).acquire()
        ckpt_dir = checkpoints_of(self.run_dir)
        if self.resumed_from is None:
            check_new_run_dir(self.run_dir)
        elif checkpoints_seen(self.run_dir) != self.seen:
            raise RunDirError(
                f"{ckpt_dir} changed while this run loaded "
                f"{self.resumed_from['path']} (another process wrote to it); "
                "resume again"
            )

    def on_step(self, step, metrics, train_state) -> None:
        self.acquire()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunFolderGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

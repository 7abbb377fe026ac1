"""Atomic checkpoints of a `TrainState` with Equinox serialisation.

Layout of a checkpoint directory:

```
run/checkpoints/
    LATEST                  name of the newest complete checkpoint
    step_00000400/
        state.eqx           eqx.tree_serialise_leaves(TrainState)
        meta.json           step, data position, configs, leaf signature,
                            sha256 of state.eqx, format version
```

A checkpoint is written into a hidden temporary folder, flushed to disk,
then renamed into place (an atomic operation on POSIX file systems), and only
then is `LATEST` replaced (write-to-temp + `os.replace`, also atomic). A crash
at any point leaves the previous checkpoint and `LATEST` intact; the stale
temporary folder is ignored and cleaned up by the next save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ..nn import LayerStack, TransformerState, VectorQuantizer, stack_layers

# 2: the official-parity parameter layout (norm biases, output-head bias,
# absolute-PE scale) and semantics (RMS q/k norm, codebook init, ...), one
# subtree per layer (`Transformer.layers` a tuple).
# 3: the same model with its layers stacked (`Transformer.layers` a
# `LayerStack`, every layer array with a leading layer axis). Format 2 loads:
# its per-layer arrays are stacked (`unstack_layers` gives its layout).
# 4: format 3 plus `VectorQuantizer.ema_tally` (one scalar per quantizer and
# layer). Formats 2 and 3 load, their tallies set to 1.
# 5: format 4 with the attention state stored stacked (`TransformerState.stacked`,
# one state per unit position with a leading layer axis) instead of one state
# per unit. Formats 2 to 4 load: their per-unit states are stacked
# (`per_unit_state` gives their layout).
FORMAT_VERSION = 5
_UNROLLED_FORMAT = 2
_NO_TALLY_FORMATS = (2, 3)
_PER_UNIT_STATE_FORMATS = (2, 3, 4)
LATEST = "LATEST"
_STATE = "state.eqx"
_META = "meta.json"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what loads it."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, incomplete) or `LATEST` was missing
    or wrong, and another checkpoint was loaded instead."""


def _signature(tree: Any) -> list[str]:
    """`"shape:dtype"` of every array leaf (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(tree)
    return [
        f"{tuple(x.shape)}:{np.dtype(x.dtype)}" for x in leaves if hasattr(x, "dtype")
    ]


def _is_stack(x) -> bool:
    return isinstance(x, LayerStack)


def unstack_layers(tree: Any) -> Any:
    """`tree` in the unrolled layout of checkpoint format 2: every
    `LayerStack` (in the model, in optimizer moments shaped like it)
    replaced by a tuple of its layers (array leaves sliced, ShapeDtypeStructs
    too). Its leaves are in the order format 2 serialised them."""
    return jax.tree.map(
        lambda x: tuple(x) if _is_stack(x) else x, tree, is_leaf=_is_stack
    )


def restack_layers(like: Any, unrolled: Any) -> Any:
    """Inverse of `unstack_layers`: `unrolled` (the layout of `unstack_layers(like)`)
    with each tuple of layers where `like` has a `LayerStack` stacked back."""
    return jax.tree.map(
        lambda s, u: stack_layers(u) if _is_stack(s) else u,
        like,
        unrolled,
        is_leaf=_is_stack,
    )


class _PerUnitState(eqx.Module):
    """A `TransformerState` in the layout of checkpoint formats 2 to 4 (the
    class's fields then): one state per attention unit in call order, then
    the position; its leaves serialise in that order."""

    units: tuple
    position: Any


def _is_state(x) -> bool:
    return isinstance(x, (TransformerState, _PerUnitState))


def per_unit_state(tree: Any) -> Any:
    """`tree` with every `TransformerState` in the per-unit layout of
    checkpoint formats 2 to 4 (`state.units()`, ShapeDtypeStructs too)."""
    return jax.tree.map(
        lambda x: (
            _PerUnitState(x.units(), x.position)
            if isinstance(x, TransformerState)
            else x
        ),
        tree,
        is_leaf=_is_state,
    )


def _stack_state(tree: Any) -> Any:
    """Inverse of `per_unit_state` (on arrays)."""
    return jax.tree.map(
        lambda x: (
            TransformerState.from_units(x.units, x.position)
            if isinstance(x, _PerUnitState)
            else x
        ),
        tree,
        is_leaf=_is_state,
    )


def _is_quantizer(x) -> bool:
    return isinstance(x, VectorQuantizer)


def _map_quantizers(fn, tree: Any) -> Any:
    return jax.tree.map(
        lambda x: fn(x) if _is_quantizer(x) else x, tree, is_leaf=_is_quantizer
    )


def without_tally(tree: Any) -> Any:
    """`tree` with every quantizer's `ema_tally` array set to None: the
    layout of checkpoint formats 2 and 3, written before the tally existed."""

    def drop(q):
        if not hasattr(q.ema_tally, "shape"):  # masked in an optimizer state
            return q
        return eqx.tree_at(lambda q: q.ema_tally, q, None)

    return _map_quantizers(drop, tree)


def _with_unit_tally(tree: Any) -> Any:
    """Inverse of `without_tally`: each missing tally set to 1 (whole, as
    after no EMA step), shaped as the quantizer's leading (layer) axes."""

    def fill(q):
        if q.ema_tally is not None or not hasattr(q.codebook_count, "shape"):
            return q
        ones = np.ones(q.codebook_count.shape[:-2], np.float32)
        return eqx.tree_at(lambda q: q.ema_tally, q, ones, is_leaf=lambda x: x is None)

    return _map_quantizers(fill, tree)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _to_host(tree: Any) -> Any:
    """Arrays as host numpy (gathered across processes when sharded over hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        dyn, static = eqx.partition(tree, eqx.is_array)
        dyn = multihost_utils.process_allgather(dyn, tiled=True)
        return eqx.combine(dyn, static)
    return jax.device_get(tree)


def _read_pointer(pointer: Path) -> str | None:
    """The checkpoint name `LATEST` holds; None when it is missing or
    unreadable (bytes that are not UTF-8, a folder in its place): then the
    checkpoints are found by scanning."""
    try:
        return pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and (p / _META).is_file() and (p / _STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The update number of checkpoint folder `path` (`step_00000400` -> 400)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (step_NNNNNNNN)")
    return int(m.group(1))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `LATEST` names; without `LATEST` (lost, or never
    written), the newest complete checkpoint found by scanning; None if there
    is none.

    Raises `CheckpointError` if `LATEST` exists but names a missing checkpoint.
    """
    d = Path(directory)
    pointer = d / LATEST
    name = _read_pointer(pointer) if pointer.is_file() else None
    if name is None:
        complete = list_checkpoints(d)
        return complete[-1] if complete else None
    path = d / name
    if (
        not _NAME.match(name)
        or not (path / _META).is_file()
        or not (path / _STATE).is_file()
    ):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a complete checkpoint in {d}"
        )
    return path


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds any checkpoint, complete or not (a `LATEST`
    file or a `step_*` folder): a folder a fresh run must not write into."""
    d = Path(directory)
    if not d.is_dir():
        return False
    return (d / LATEST).exists() or any(_NAME.match(p.name) for p in d.iterdir())


def checkpoint_candidates(directory: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder of `directory` (complete or not), in the order
    to try them: the one `LATEST` names first (when it exists), then the
    others newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = sorted(
        (p for p in d.iterdir() if _NAME.match(p.name) and p.is_dir()),
        key=checkpoint_step,
        reverse=True,
    )
    name = _read_pointer(d / LATEST)
    if name:
        named = d / name
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def save_checkpoint(
    directory: str | os.PathLike,
    train_state: Any,
    *,
    step: int,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write `train_state` (any PyTree, normally a `TrainState`) as checkpoint
    `step`, atomically, and point `LATEST` at it; keep the newest `keep`.

    `meta` (JSON-serialisable: configs, data position, ...) is stored in
    `meta.json` next to the arrays. Only process 0 writes (all processes must
    call it when arrays are sharded across hosts).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    host = _to_host(train_state)
    if jax.process_index() != 0:
        return Path(directory) / checkpoint_name(step)
    return write_checkpoint(directory, host, step=step, meta=meta, keep=keep)


def write_checkpoint(
    directory: str | os.PathLike,
    host: Any,
    *,
    step: int,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """The file part of `save_checkpoint`, on a train state already copied
    to the host (numpy arrays): safe to run in another thread."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    tmp = d / f".tmp-{name}-{os.getpid()}"
    try:
        _write_checkpoint_files(tmp, host, step, meta)
    except Exception as e:
        # Disk full, no permission, ...: one line naming the folder and the
        # cause; the partial folder goes, nothing earlier is touched.
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error_in(e)
        if cause is None:
            raise
        errno = f" (errno {cause.errno})" if cause.errno else ""
        raise CheckpointError(
            f"cannot write checkpoint {d / name}: {cause.strerror or cause}"
            f"{errno}; earlier checkpoints are unchanged"
        ) from None
    _fsync_dir(tmp)
    final = d / name
    if final.exists():  # re-saving the same step: swap the old one out first
        trash = d / f".tmp-old-{name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(d)
    _write_atomic(d / LATEST, name + "\n")
    for old in list_checkpoints(d)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


class AsyncCheckpointer:
    """Checkpoints whose files are written in a background thread: `save`
    copies the train state to the host (the only stall: the next step may
    reuse, donate, the device buffers) and returns; the files, the fsyncs,
    `LATEST` and the rotation happen while training goes on. One write at a
    time: a new `save` first waits for the previous one.

    `wait()` blocks until the write in flight is done and returns its
    `(step, path)` (None if none was in flight); a write's error (disk
    full, ...) is raised there, in the training thread.
    """

    def __init__(self) -> None:
        import threading

        self._threading = threading
        self._thread: Any = None
        self._pending: tuple[int, Path] | None = None
        self._error: BaseException | None = None

    def save(
        self,
        directory: str | os.PathLike,
        train_state: Any,
        *,
        step: int,
        meta: dict[str, Any] | None = None,
        keep: int = 3,
    ) -> tuple[int, Path] | None:
        """Start checkpoint `step`; returns what `wait()` returned for the
        previous one."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1; got {keep}")
        done = self.wait()
        # Own copies: on CPU a host array may alias the device buffer, which
        # the next (donating) step overwrites while the thread still writes.
        host = jax.tree.map(
            lambda x: np.array(x, copy=True) if isinstance(x, np.ndarray) else x,
            _to_host(train_state),
        )
        path = Path(directory) / checkpoint_name(step)
        if jax.process_index() != 0:
            self._pending = (step, path)
            return done

        def run() -> None:
            try:
                write_checkpoint(directory, host, step=step, meta=meta, keep=keep)
            except BaseException as e:  # surfaced by wait()
                self._error = e

        self._pending = (step, path)
        self._thread = self._threading.Thread(
            target=run, name=f"tvq-eqx-checkpoint-{step}", daemon=False
        )
        self._thread.start()
        return done

    def wait(self) -> tuple[int, Path] | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        done, self._pending = self._pending, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return done


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """`meta.json` of checkpoint folder `path` (or of `LATEST` when `path` is
    a checkpoints directory)."""
    p = Path(path)
    if _NAME.match(p.name) and p.is_dir() and not (p / _META).is_file():
        raise CheckpointError(f"{p} is incomplete (no {_META})")
    if not (p / _META).is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"no checkpoint found in {p}")
        p = latest
    try:
        meta = json.loads((p / _META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {p / _META}: {e}") from None
    _check_meta_types(meta, p / _META)
    if meta.get("format_version") == 1:
        raise CheckpointError(
            f"{p} was written by an earlier tvq-eqx (checkpoint format 1), whose "
            "model differs from this one (no norm biases, no output bias or "
            "e_scale, centred q/k norm, fixed absolute-PE scale, per-token "
            "commit loss); its weights cannot be loaded into the current model. "
            "Retrain, or load it with the tvq-eqx version that wrote it."
        )
    if meta.get("format_version") not in (FORMAT_VERSION, *_PER_UNIT_STATE_FORMATS):
        raise CheckpointError(
            f"{p} has checkpoint format {meta.get('format_version')!r}; this "
            f"tvq-eqx reads formats {_UNROLLED_FORMAT} (layers unrolled), 3 (no "
            "codebook tally), 4 (attention state per unit; all converted on "
            f"load) and {FORMAT_VERSION}"
        )
    meta["path"] = str(p)
    return meta


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e` (itself, or in its cause/context chain:
    equinox wraps the writer's error in a TreePathError), else None."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _write_checkpoint_files(tmp: Path, host: Any, step: int, meta) -> None:
    """The arrays and meta.json of one checkpoint into the fresh folder
    `tmp`, each fsynced, then the folder."""
    tmp.mkdir()
    state_path = tmp / _STATE
    with open(state_path, "wb") as f:
        eqx.tree_serialise_leaves(f, host)
        f.flush()
        os.fsync(f.fileno())
    full_meta = dict(
        format_version=FORMAT_VERSION,
        step=int(step),
        sha256=_sha256(state_path),
        signature=_signature(host),
        **(meta or {}),
    )
    with open(tmp / _META, "w") as f:
        json.dump(full_meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _check_meta_types(meta: Any, where: Path) -> None:
    """`CheckpointError` (so loading falls back to an older checkpoint)
    unless `meta` is an object whose known fields have their types: `step` a
    non-negative int, `format_version` an int, `sha256` a string,
    `signature` a list of strings, `run` an object, `completed` /
    `interrupted` booleans, `batch_index` a non-negative int, `run_id` a
    string."""

    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: field {field!r} must be {want}; got {meta.get(field)!r}"
        )

    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{where} must hold a JSON object; got {type(meta).__name__}"
        )

    def is_count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63

    if not is_count(meta.get("step")):
        raise bad("step", "an int >= 0")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad("format_version", "an int")
    optional = dict(
        sha256=(lambda x: isinstance(x, str), "a string"),
        signature=(
            lambda x: isinstance(x, list) and all(isinstance(y, str) for y in x),
            "a list of strings",
        ),
        run=(lambda x: isinstance(x, dict), "an object"),
        completed=(lambda x: isinstance(x, bool), "true or false"),
        interrupted=(lambda x: isinstance(x, bool), "true or false"),
        batch_index=(is_count, "an int >= 0"),
        run_id=(lambda x: isinstance(x, str), "a string"),
    )
    for field, (ok, want) in optional.items():
        if field in meta and not ok(meta[field]):
            raise bad(field, want)


def load_checkpoint(path: str | os.PathLike, like: Any) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint into the structure of `like` (a `TrainState` built
    from the same configs, e.g. `eqx.filter_eval_shape` of the initialiser).

    `path` is a checkpoint folder, or a checkpoints directory (its `LATEST`).
    Verifies the format version, the SHA-256 of the arrays and every leaf's
    shape and dtype; raises `CheckpointError` with one clear line otherwise.
    A format-2 checkpoint (layers unrolled, one subtree per layer) is read in
    that layout and its layers stacked into `like`'s; formats 2 to 4 hold one
    attention state per unit, stacked into `TransformerState.stacked`.

    **Returns:** `(train_state, meta)`.
    """
    meta = read_meta(path)
    p = Path(meta["path"])
    state_path = p / _STATE
    if not state_path.is_file():
        raise CheckpointError(f"{p} is incomplete (no {_STATE})")
    if _sha256(state_path) != meta.get("sha256"):
        raise CheckpointError(
            f"{state_path} is corrupt (SHA-256 does not match meta.json)"
        )
    version = meta["format_version"]
    unrolled = version == _UNROLLED_FORMAT
    no_tally = version in _NO_TALLY_FORMATS
    per_unit = version in _PER_UNIT_STATE_FORMATS
    on_disk = unstack_layers(like) if unrolled else like
    if no_tally:
        on_disk = without_tally(on_disk)
    if per_unit:
        on_disk = per_unit_state(on_disk)
    layout = (
        f"checkpoint format {_UNROLLED_FORMAT} (layers unrolled, converted to the "
        "stacked layout)"
        if unrolled
        else f"checkpoint format {version} (layers stacked)"
    )
    want = _signature(on_disk)
    got = meta.get("signature")
    if got != want:
        n_diff = (
            sum(a != b for a, b in zip(got, want, strict=False))
            if isinstance(got, list)
            else "?"
        )
        raise CheckpointError(
            f"{p} does not match the model/optimizer being loaded: "
            f"{len(got) if isinstance(got, list) else '?'} arrays on disk vs "
            f"{len(want)} expected, {n_diff} with different shape/dtype ({layout}); "
            "an Adafactor state saved before Adafactor kept one state per layer "
            "(train.per_layer) cannot be converted either"
        )
    try:
        with open(state_path, "rb") as f:
            tree = eqx.tree_deserialise_leaves(f, on_disk)
        if per_unit:
            tree = _stack_state(tree)
        if unrolled:
            tree = restack_layers(without_tally(like), tree)
        if no_tally:
            tree = _with_unit_tally(tree)
    except Exception as e:
        raise CheckpointError(
            f"cannot load {state_path} ({layout}): {type(e).__name__}: {e}"
        ) from None
    return tree, meta

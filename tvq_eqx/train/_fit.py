"""`fit`: the training loop (carried attention state, periodic evaluation,
checkpoints, metrics callbacks, interrupt handling), used by the command line
and the benchmarks."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ..data import AbstractStream
from ..nn import Transformer
from ._checkpoint import AsyncCheckpointer
from ._codebook import prepare_codebooks
from ._flops import device_peak_flops, model_flops
from ._optimizer import lr_schedule, optimizer_from_config
from ._run_config import RunConfig
from ._steps import TrainState, _mesh_context, evaluate, make_train_step

FitStatus = Literal["completed", "stopped", "interrupted", "diverged"]


class StopTraining(Exception):
    """Raise from a callback to end `fit` after the current batch (no final
    evaluation or checkpoint; `FitResult.status == "stopped"`)."""


class Callback:
    """Hooks `fit` calls; subclass and override the ones you need.

    `on_step` runs after every batch with its metrics still on the device
    (reading them waits for the step); `on_log` gets the float metrics every
    `run.log_every` updates; `on_eval` each validation result; raise
    `StopTraining` from any hook to end the run early.
    """

    def on_start(self, *, run: RunConfig, start_step: int, stop_step: int) -> None:
        """Before the first batch (`start_step` > 0 when resuming)."""

    def on_step(
        self, step: int, metrics: Mapping[str, Any], train_state: TrainState
    ) -> None:
        """After each batch; `step` counts optimizer updates done."""

    def on_log(self, record: dict[str, Any]) -> None:
        """Training metrics (floats), `split="train"`."""

    def on_eval_start(self, step: int) -> None:
        """Before a validation pass."""

    def on_eval(self, record: dict[str, Any]) -> None:
        """A validation result, `split="validation"`."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint was written."""

    def on_end(self, result: FitResult) -> None:
        """After the loop (not called when an exception escapes `fit`)."""


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    - `train_state`: the state after the last completed batch.
    - `status`: `"completed"` (all `run.steps`, final evaluation and
      checkpoint done), `"stopped"` (`stop_at` reached or `StopTraining`
      raised), `"interrupted"` (SIGINT, SIGTERM or SIGHUP; a checkpoint of
      the last completed step was written when `checkpoint_dir` was given)
      or `"diverged"` (a non-finite loss, gradient norm or parameter, or too
      many skipped updates: nothing after the last finite state was saved;
      `message` says where).
    - `step`: optimizer updates done.
    - `history`: every `on_log` / `on_eval` record, in order.
    - `validation`: the last validation result (None if none ran).
    - `checkpoint`: the last checkpoint written (None if none).
    - `wall_s`: seconds in the loop.
    - `signal`: the signal number that interrupted the run (None otherwise).
    - `message`: for `"diverged"`, which updates went non-finite.
    - `skipped_updates`: updates not applied (`run.on_nonfinite="skip"`).
    """

    train_state: TrainState
    status: FitStatus
    step: int
    history: list[dict[str, Any]]
    validation: dict[str, float] | None
    checkpoint: Path | None
    wall_s: float
    signal: int | None = None
    message: str = ""
    skipped_updates: int = 0


def evaluate_stream(
    model: Transformer,
    stream: AbstractStream,
    run: RunConfig,
    *,
    mesh: Mesh | None = None,
    max_batches: int | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, float]:
    """`evaluate` over the first `max_batches` (default `run.eval_batches`;
    0 = all) windows of `stream`, the carried state emptied per
    `run.resets_state`, packed documents masked per `run.doc_masking`."""
    limit = run.eval_batches if max_batches is None else max_batches
    n = stream.num_batches if limit == 0 else min(limit, stream.num_batches)
    return evaluate(
        model,
        (stream.batch(i) for i in range(n)),
        segment_len=run.update_len,
        mesh=mesh,
        resets=[run.resets_state(i) for i in range(n)],
        progress=progress,
        doc_masking=run.doc_masking,
    )


# Signals that end a run gracefully: Ctrl-C, a scheduler's notice before it
# kills (SIGTERM), a closed terminal (SIGHUP).
STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP")
    if hasattr(signal, name)
)


class _StopSignals:
    """The first SIGINT, SIGTERM or SIGHUP sets `raised` (the signal number):
    the loop ends after the current batch and checkpoints it; the previous
    handlers are back for a second signal."""

    def __init__(self, enabled: bool):
        self.raised: int | None = None
        self._previous: dict[int, Any] = {}
        self._enabled = (
            enabled and threading.current_thread() is threading.main_thread()
        )

    def __enter__(self):
        if self._enabled:
            for sig in STOP_SIGNALS:
                previous = signal.signal(sig, self._handle)
                # None: a handler installed outside Python; restore the default.
                if previous is None:
                    previous = (
                        signal.default_int_handler
                        if sig == signal.SIGINT
                        else signal.SIG_DFL
                    )
                self._previous[sig] = previous
        return self

    def _handle(self, signum, frame):
        self.raised = signum
        self._restore()

    def _restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def __exit__(self, *exc):
        if self._enabled:
            self._restore()
        return False


def _all_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (one sync)."""
    leaves = [
        x for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)) if x.size
    ]
    if not leaves:
        return True
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


def _is_alive(tree: Any) -> bool:
    """False when any array of `tree` was donated (deleted)."""
    return not any(
        x.is_deleted() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    )


def fit(
    train_state: TrainState,
    run: RunConfig,
    train_stream: AbstractStream,
    *,
    eval_stream: AbstractStream | None = None,
    optimizer: optax.GradientTransformation | None = None,
    mesh: Mesh | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    stop_at: int | None = None,
    callbacks: Sequence[Callback] = (),
    train_resets: Callable[[int], bool] | None = None,
    handle_sigint: bool = True,
    peak_flops: float | Literal["auto"] | None = "auto",
) -> FitResult:
    """Train `train_state` for `run.steps` optimizer updates on
    `train_stream`, continuing from `train_state.step` (resume).

    Batch `i` of `train_stream` (global index `step / updates_per_batch`)
    gives `run.updates_per_batch` updates with the attention state carried
    from batch `i - 1`; the state is emptied when `run.resets_state(window)`
    (window = index within the epoch) says so, or `train_resets(window)` when
    given. So a run stopped at update `s` and resumed from its checkpoint
    computes exactly what the uninterrupted run computes. With
    `run.doc_masking`, the batches' `doc_starts` reach `loss_fn` in training
    and evaluation (attention stays inside each packed document).

    - Evaluation on `eval_stream` (`evaluate_stream`) every `run.eval_every`
      updates and at the end.
    - Checkpoints in `checkpoint_dir` every `run.save_every` updates, at the
      end (meta `completed=True` and the final validation), at `stop_at`, and on
      interrupt; `run.keep` are kept. Meta: `run` (`run.to_dict()`),
      `batch_index`, and `checkpoint_meta`.
    - `stop_at`: end after this many updates (rounded down to a whole batch)
      with a checkpoint, status `"stopped"`.
    - SIGINT (Ctrl-C), SIGTERM (a scheduler's notice) or SIGHUP (with
      `handle_sigint` in the main thread): the current batch completes, a
      checkpoint of it is written, and `fit` returns with status
      `"interrupted"` and the signal's number; a second signal acts at once.
      A `KeyboardInterrupt` raised inside the loop (e.g. by a callback)
      writes the checkpoint of the last completed batch too, then propagates.
    - `run.save_every_minutes`: a checkpoint also once that much time passed
      since the last one.
    - Non-finite training (`run.on_nonfinite`): every batch's loss and
      gradient norm are checked (one sync per batch), and the parameters
      before every checkpoint; "stop" ends the run with status `"diverged"`
      before anything non-finite is saved, "skip" leaves such updates out
      (in the step) and ends the run once more than `run.max_skipped` were.
    - `callbacks`: `Callback` hooks for metrics, progress, plots.
    - Training records (`on_log`) carry `tokens_per_s`, `model_flops_per_s`
      (`model_flops` of the run's batches per second) and `mfu` (that over
      `peak_flops`, the FLOP/s of all devices together; `"auto"`:
      `device_peak_flops` of the mesh's devices, or all; None or an unknown
      device: `mfu` is None), and
      `lr` (the learning rate of the batch's last update) when the optimizer
      is the run's own.

    `optimizer` defaults to `optimizer_from_config(run.optimizer, run.steps)`
    (it must be the one `train_state.opt_state` was built with).
    """
    schedule = None
    if optimizer is None:
        optimizer = optimizer_from_config(run.optimizer, run.steps)
        o = run.optimizer
        schedule = lr_schedule(
            o.learning_rate, o.warmup_steps, run.steps, o.final_lr_ratio
        )
    if peak_flops == "auto":
        devices = None if mesh is None else list(mesh.devices.flat)
        peak_flops = device_peak_flops(run.model.dtype, devices)[0]
    elif peak_flops is not None and (
        isinstance(peak_flops, bool)
        or not isinstance(peak_flops, (int, float))
        or not peak_flops > 0
    ):
        raise ValueError(
            f'peak_flops must be a positive number, "auto" or None; got {peak_flops!r}'
        )
    upb = run.updates_per_batch
    start_step = int(train_state.step)
    start_batch, stop_batch = _batch_span(start_step, run, stop_at)
    resets = run.resets_state if train_resets is None else train_resets
    skip = run.on_nonfinite == "skip"
    step_fn = make_train_step(
        optimizer,
        update_len=run.update_len,
        mesh=mesh,
        doc_masking=run.doc_masking,
        skip_nonfinite=skip,
        grad_accum=run.grad_accum,
    )
    loop = _Loop(
        train_state,
        run,
        eval_stream=eval_stream,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir,
        checkpoint_meta=checkpoint_meta,
        callbacks=callbacks,
        schedule=schedule,
        peak_flops=peak_flops,
    )
    loop.start(start_step, stop_batch * upb)
    step = start_step
    status: FitStatus = "completed"
    with _StopSignals(handle_sigint) as stop_signal:
        try:
            for batch_index in range(start_batch, stop_batch):
                _, window = train_stream.epoch_and_window(batch_index)
                batch, reset = train_stream.batch(batch_index), resets(window)
                # Codebook init / dead-code restart (off by default): between
                # updates, outside the compiled step (see _codebook.py).
                loop.ts, cb_metrics = _prepare_codebooks(
                    loop.ts, batch, reset, run, mesh
                )
                loop.ts, metrics = step_fn(loop.ts, batch, reset=reset)
                metrics = {**metrics, **cb_metrics}
                previous, step = step, (batch_index + 1) * upb
                ended = loop.after_batch(
                    metrics, previous, step, batch_index + 1 == stop_batch, stop_signal
                )
                if ended is not None:
                    status = ended
                    break
        except StopTraining:
            status = "stopped"
        except KeyboardInterrupt:
            # The last completed batch is saved unless its buffers were
            # donated to a step that did not finish.
            if loop.ckpt_dir is not None and step > start_step and _is_alive(loop.ts):
                loop.save(step, dict(interrupted=True))
            loop.finished(loop.saver.wait())
            raise
        except BaseException:
            loop.finished(loop.saver.wait())  # the write in flight completes first
            raise
    status = loop.wrap_up(
        status, step, resumed_at=start_step, cut_short=stop_batch < run.total_batches
    )
    loop.finished(loop.saver.wait())
    result = FitResult(
        train_state=loop.ts,
        status=status,
        step=step,
        history=loop.history,
        validation=loop.validation,
        checkpoint=loop.checkpoint,
        wall_s=time.perf_counter() - loop.t_start,
        signal=stop_signal.raised,
        message=loop.message,
        skipped_updates=loop.skipped,
    )
    loop.emit("on_end", result)
    return result


def _prepare_codebooks(ts, batch, reset, run: RunConfig, mesh: Mesh | None):
    if not run.codebook.active:
        return ts, {}
    with _mesh_context(mesh):
        return prepare_codebooks(
            ts,
            batch,
            run.codebook,
            update_len=run.update_len,
            reset=bool(reset),
            doc_masking=run.doc_masking,
        )


def _batch_span(start_step: int, run: RunConfig, stop_at: int | None):
    """The batches `fit` runs, `(first, end)`, resuming at `start_step`
    updates and ending at `stop_at` (rounded down to a whole batch)."""
    upb = run.updates_per_batch
    if start_step % upb != 0:
        raise ValueError(
            f"train_state.step={start_step} is not a whole number of batches "
            f"({upb} updates each)"
        )
    if start_step > run.steps:
        raise ValueError(
            f"train_state.step={start_step} is past run.steps={run.steps}; "
            "extend the run with a larger steps"
        )
    start_batch = start_step // upb
    stop_batch = run.total_batches
    if stop_at is not None:
        stop_batch = min(stop_batch, max(start_batch, stop_at // upb))
    return start_batch, stop_batch


def _divergence(
    metrics: Mapping[str, Any], run: RunConfig, skipped: int, previous: int, step: int
) -> tuple[int, str | None]:
    """`run.on_nonfinite` after the batch of updates `previous + 1 .. step`:
    the updates skipped so far, and why the run diverged (None: it did not).
    One sync per batch."""
    if run.on_nonfinite == "skip":
        skipped += int(metrics["skipped_updates"])
        if skipped > run.max_skipped:
            return skipped, (
                f"{skipped} updates skipped for a non-finite loss or gradient by "
                f"update {step} (max_skipped={run.max_skipped})"
            )
        return skipped, None
    if not bool(jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])):
        span = (
            f"update {step}"
            if step - previous == 1
            else f"updates {previous + 1}-{step}"
        )
        return skipped, f"non-finite loss or gradient norm in {span}"
    return skipped, None


class _Loop:
    """What `fit`'s steps share: the train state, the records so far, the
    callbacks and the checkpoints (written in a background thread; the loop
    stalls only for the device-to-host copy)."""

    def __init__(
        self,
        train_state: TrainState,
        run: RunConfig,
        *,
        eval_stream: AbstractStream | None,
        mesh: Mesh | None,
        checkpoint_dir: str | os.PathLike | None,
        checkpoint_meta: Mapping[str, Any] | None,
        callbacks: Sequence[Callback],
        schedule: optax.Schedule | None = None,
        peak_flops: float | None = None,
    ):
        self.ts = train_state
        self.run = run
        self.eval_stream = eval_stream
        self.mesh = mesh
        self.ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_meta = checkpoint_meta
        self.callbacks = callbacks
        self.history: list[dict[str, Any]] = []
        self.validation: dict[str, float] | None = None
        self.checkpoint: Path | None = None  # the last one written
        self.saved_at = time.monotonic()
        self.message = ""
        self.saver = AsyncCheckpointer()
        self.skipped = 0  # updates left out for a non-finite loss or gradient
        self.tokens_since_log = 0
        self.schedule = schedule
        self.peak_flops = peak_flops
        d = run.data
        self.flops_per_token = model_flops(
            run.model, d.batch_size, d.seq_len, update_len=run.update_len
        ) / (d.batch_size * d.seq_len)

    def start(self, start_step: int, stop_step: int) -> None:
        """`on_start`, then the clock of `wall_s` and the tokens per second."""
        for cb in self.callbacks:
            cb.on_start(run=self.run, start_step=start_step, stop_step=stop_step)
        self.t_start = self.logged_at = time.perf_counter()

    def emit(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def finished(self, done: tuple[int, Path] | None) -> None:
        """`on_checkpoint` once a write is complete (at the next checkpoint
        or the end of `fit`)."""
        if done is not None:
            self.checkpoint = done[1]
            self.emit("on_checkpoint", *done)

    def checkpoint_due(self, step: int) -> bool:
        """Every `run.save_every` updates, or `run.save_every_minutes` after
        the last checkpoint."""
        run, minutes = self.run, self.run.save_every_minutes
        due = run.save_every and step % run.save_every < run.updates_per_batch
        late = minutes and time.monotonic() - self.saved_at >= 60 * minutes
        return bool(due or late)

    def save(self, step: int, extra: Mapping[str, Any] | None = None) -> bool:
        """Checkpoint the train state unless it holds a non-finite parameter
        (then the run has diverged: False)."""
        if self.ckpt_dir is None:
            return True
        if not _all_finite(self.ts.model):
            self.message = f"a non-finite parameter after update {step}; not saved"
            return False
        self.saved_at = time.monotonic()
        meta = dict(
            run=self.run.to_dict(), batch_index=step // self.run.updates_per_batch
        )
        meta.update(self.checkpoint_meta or {})
        meta.update(extra or {})
        done = self.saver.save(
            self.ckpt_dir, self.ts, step=step, meta=meta, keep=self.run.keep
        )
        self.finished(done)
        return True

    def validate(self, step: int) -> None:
        if self.eval_stream is None:
            return
        self.emit("on_eval_start", step)
        val = evaluate_stream(self.ts.model, self.eval_stream, self.run, mesh=self.mesh)
        self.validation = val
        record = dict(split="validation", step=step, **val)
        self.history.append(record)
        self.emit("on_eval", record)

    def after_batch(
        self,
        metrics: Mapping[str, Any],
        previous: int,
        step: int,
        last: bool,
        stop_signal: _StopSignals,
    ) -> FitStatus | None:
        """After the batch of updates `previous + 1 .. step`: the divergence
        check, `on_step`, the training log, the validation and checkpoint
        when due; the status the loop ends with (None: it goes on)."""
        run, upb = self.run, self.run.updates_per_batch
        self.tokens_since_log += run.data.batch_size * run.data.seq_len
        self.skipped, why = _divergence(metrics, run, self.skipped, previous, step)
        if why is not None:
            self.message = why
            return "diverged"
        self.emit("on_step", step, metrics, self.ts)
        if step % run.log_every < upb or last:
            self.log_train(step, metrics)
        if stop_signal.raised is not None:
            return "interrupted"
        if run.eval_every and step % run.eval_every < upb and not last:
            self.validate(step)
        if self.checkpoint_due(step) and not last and not self.save(step):
            return "diverged"
        return None

    def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        """The `on_log` record: the metrics as floats (this waits for the
        step), the tokens and model FLOPs per second since the last record,
        their fraction of the peak (`mfu`, None when the peak is unknown) and
        the learning rate."""
        m = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        tokens_per_s = self.tokens_since_log / max(now - self.logged_at, 1e-9)
        flops_per_s = tokens_per_s * self.flops_per_token
        record: dict[str, Any] = dict(
            split="train",
            step=step,
            tokens_per_s=tokens_per_s,
            model_flops_per_s=flops_per_s,
            mfu=None if self.peak_flops is None else flops_per_s / self.peak_flops,
            elapsed_s=now - self.t_start,
            **m,
        )
        if self.schedule is not None:
            # Update `step` (1-based) ran at the schedule's count step - 1.
            record["lr"] = float(jnp.asarray(self.schedule(step - 1)))
        self.logged_at, self.tokens_since_log = now, 0
        self.history.append(record)
        self.emit("on_log", record)

    def wrap_up(
        self, status: FitStatus, step: int, *, resumed_at: int, cut_short: bool
    ) -> FitStatus:
        """The checkpoint (and, for a completed run, the final validation)
        after the loop ended with `status`; the final status."""
        if status == "interrupted":
            if step > resumed_at and not self.save(step, dict(interrupted=True)):
                return "diverged"
        elif status == "completed" and cut_short:  # at stop_at
            return "stopped" if self.save(step) else "diverged"
        elif status == "completed":
            self.validate(step)
            # `completed`: nothing is left to do; a resume of this checkpoint
            # with the same `steps` has no work (the CLI says so, writes nothing).
            final: dict[str, Any] = dict(completed=True)
            if self.validation is not None:
                final["validation"] = self.validation
            if not self.save(step, final):
                return "diverged"
        return status

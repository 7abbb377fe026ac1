"""`python -m tvq_eqx` / `tvq-eqx`: train, eval, sample, bench.

```
tvq-eqx train  [--preset tiny] [--config run.toml] [--run-dir DIR] [--resume [--checkpoint STEP]] [--FIELD VALUE ...]
tvq-eqx eval   --run-dir DIR [--checkpoint STEP] [--split validation|test] [--eval-batches N]
tvq-eqx sample --run-dir DIR [--checkpoint STEP] [--prompt TEXT] [--sample-len N] [--temperature T] [--top-p P]
tvq-eqx bench  [--preset tiny] [--bench-steps N] [--FIELD VALUE ...]
```

The flags of `train` and `bench` are the fields of `tvq_eqx.train.RunConfig`
(`--steps`, `--model.d-model`, `--data.path`, `--optimizer.learning-rate`, ...),
parsed by tyro; `--help` lists each with its type, default (the preset's, or
the config file's) and description. Settings are layered: preset, then the
TOML file of `--config`, then the flags.

This module is glue: the loop is `tvq_eqx.train.fit`, the data
`tvq_eqx.train.load_run_data`, the checkpoints `tvq_eqx.train.load_run`, the
log / progress bar / curves `tvq_eqx.train.callbacks`.

Errors: bad input (usage, config values, data, checkpoints, missing files)
ends with one `tvq-eqx: error: ...` line on stderr and exit code 2, before
anything is written; anything else is a bug or a resource problem (out of
memory) and keeps its traceback (`TVQ_EQX_DEBUG=1` shows tracebacks for all).
Ctrl-C during training checkpoints the last completed step and exits 130;
`--resume` continues from it. Loading a run falls back from a corrupt newest
checkpoint to the newest intact one (a warning line names the skipped one);
a fresh `train` never writes into a folder with checkpoints. The run-folder
policy lives in `tvq_eqx.train._runs`. See docs/training.md.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

try:
    import tyro
except ImportError:  # pragma: no cover (the [cli] extra)
    tyro = None

from . import train
from ._config import ImplementationName
from .train import CheckpointError, DataError, RunConfig, RunDirError
from .train._run_config import check_doc_masking, mem_len_follows

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


# Training stopped on a non-finite loss, gradient or parameter.
EXIT_DIVERGED = 1


def _signal_name(signum: int | None) -> str:
    import signal

    try:
        return signal.Signals(signum).name if signum else "KeyboardInterrupt"
    except ValueError:
        return f"signal {signum}"


# Expected errors: one line, exit 2. Everything else keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    DataError,
    CheckpointError,
    RunDirError,
    FileNotFoundError,
)

PresetName = Literal["tiny", "enwik8", "pg19", "imagenet64"]


def _tyro():
    if tyro is None:
        raise UsageError("the command line needs tyro: pip install 'tvq-eqx[cli]'")
    return tyro


# ----------------------------------------------------------------------------
# Commands as dataclasses (their fields are the flags).

# The RunConfig field of train / bench: its flags carry no "run." prefix
# (`--steps`, `--model.d-model`).
if TYPE_CHECKING:  # the checker sees the type; tyro's marker is for run time
    _RunFlags = RunConfig
else:
    _RunFlags = (
        Annotated[RunConfig, tyro.conf.arg(name="")] if tyro is not None else RunConfig
    )


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """Train a model: tqdm progress, JSONL log, PNG curves, checkpoints; at the
    end validation bits per token and a sample."""

    run: _RunFlags
    """The run's settings (preset, then --config, then these flags)."""
    preset: PresetName = "tiny"
    """Named starting configuration."""
    config: str | None = None
    """TOML file of RunConfig fields ([model], [model.pallas.block_sizes], [data], [optimizer] tables) applied on top of the preset."""
    run_dir: str | None = None
    """Output folder (None = runs/PRESET, or runs/PRESET-N if that holds a checkpoint)."""
    resume: bool = False
    """Continue the run folder's newest intact checkpoint (flags must match its settings; --steps may change, e.g. to extend a finished run)."""
    checkpoint: int | None = None
    """With --resume: continue from the checkpoint of this update instead of the newest intact one."""
    stop_at: int | None = None
    """Stop (and checkpoint) after this many updates; --resume continues."""
    mesh: str | None = None
    """Device mesh, e.g. data=2,seq=2: the batch split over 2 devices and each update segment over 2 (context parallelism; sizes multiply to the device count). None = the batch over all devices."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host)."""
    progress: bool = True
    """Show progress bars on stderr."""


@dataclasses.dataclass(frozen=True)
class EvalCommand:
    """Bits per token of a trained run on a data split, with the carried state."""

    run_dir: str
    """Run folder holding checkpoints/."""
    checkpoint: int | None = None
    """The checkpoint of this update (None = the newest intact one)."""
    split: Literal["validation", "test"] = "validation"
    """Data split to evaluate."""
    eval_batches: int | None = None
    """Batches to evaluate (0 = the whole split; None = the run's)."""
    batch_size: int | None = None
    """Rows per batch (None = the run's)."""
    implementation: ImplementationName | None = None
    """VQ-attention implementation (None = the run's)."""
    block_len: int | None = None
    """Evaluate at another block length (same weights; None = the run's)."""
    data: str | None = None
    """Data path (None = the run's)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host)."""
    progress: bool = True
    """Show a progress bar on stderr."""


@dataclasses.dataclass(frozen=True)
class SampleCommand:
    """Generate text from a trained run."""

    run_dir: str
    """Run folder holding checkpoints/."""
    checkpoint: int | None = None
    """The checkpoint of this update (None = the newest intact one)."""
    prompt: str | None = None
    """Text to continue (None = a newline, or token 0 for non-byte data)."""
    sample_len: int | None = None
    """Tokens to generate, printed as they come in chunks (memory stays bounded; at most 2**32; Ctrl-C stops, keeping what was printed; None = the run's)."""
    temperature: float | None = None
    """Softmax temperature, <= 0 = greedy (None = the run's)."""
    top_p: float | None = None
    """Nucleus mass in (0, 1] (None = the run's)."""
    seed: int | None = None
    """Sampling seed (None = the run's)."""
    data: str | None = None
    """Data path, for the sentencepiece tokenizer's run (None = the run's)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host)."""


@dataclasses.dataclass(frozen=True)
class BenchCommand:
    """Train-step and sampling throughput of a configuration on random tokens."""

    run: _RunFlags
    """The run's settings (preset, then --config, then these flags)."""
    preset: PresetName = "tiny"
    """Named starting configuration."""
    config: str | None = None
    """TOML file of RunConfig fields applied on top of the preset."""
    bench_steps: int = 5
    """Timed train steps (after one compiling step; >= 1)."""
    sample_tokens: int = 64
    """Tokens sampled for the per-token latency (0 = skip)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host)."""


_COMMANDS = dict(
    train=TrainCommand, eval=EvalCommand, sample=SampleCommand, bench=BenchCommand
)


def _one_line(text: str) -> str:
    """tyro's boxed error message as one line: the box's text up to its first
    rule, borders stripped, wrapped lines joined."""
    parts = []
    for raw in text.splitlines():
        if raw.strip().startswith(("╭", "╰")):
            continue
        line = raw.strip().strip("│").strip()
        if line and set(line) <= {"─"}:  # the rule under the message
            if parts:
                break
            continue
        if line:
            parts.append(line)
    msg = " ".join(parts) or "invalid arguments"
    return re.sub(r"\s+", " ", msg)


def _parse(cls: type, argv: list[str], *, default: Any, prog: str) -> Any:
    """`tyro.cli(cls)` with one-line usage errors (`UsageError`)."""
    tyro = _tyro()
    err = io.StringIO()
    # Wide, so that tyro does not wrap the message we turn into one line.
    old_columns = os.environ.get("COLUMNS")
    help_requested = any(a in ("-h", "--help") for a in argv)
    try:
        if not help_requested:
            os.environ["COLUMNS"] = "1000"
        with contextlib.redirect_stderr(err):
            # Optional nested settings (`model.pallas`, its `block_sizes`) are
            # flags of their defaults, not subcommands; tile sizes come from
            # a config file's [model.pallas.block_sizes] table.
            return tyro.cli(
                cls,
                args=argv,
                default=default,
                prog=prog,
                config=(tyro.conf.AvoidSubcommands,),
            )
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_one_line(err.getvalue()) + f" (see {prog} --help)") from None
    except ValueError as e:  # a config's own validation, raised past tyro
        raise UsageError(str(e)) from None
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
        sys.stderr.write(err.getvalue() if help_requested else "")


# ----------------------------------------------------------------------------
# Settings: preset -> config file -> flags


def _read_config_file(path: str) -> dict[str, Any]:
    """A TOML file of RunConfig fields; the string "None" stands for None
    (TOML has no null)."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise FileNotFoundError(f"--config: {path!r} is a folder, not a file")
        raise FileNotFoundError(f"--config: no such file {path!r}")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: not valid TOML: {e}") from None

    def none(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: none(v) for k, v in x.items()}
        return None if x == "None" else x

    return none(raw)


def _pre_parse(argv: list[str]) -> dict[str, Any]:
    """--preset, --config, --resume, --run-dir before the full parse (they
    choose the defaults the full parse shows and starts from)."""
    out: dict[str, Any] = dict(
        preset="tiny", config=None, resume=False, run_dir=None, checkpoint=None
    )
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        key, _, value = a.partition("=")
        name = key[2:].replace("-", "_") if key.startswith("--") else None
        if name == "resume":
            out["resume"] = True
        elif name == "no_resume":
            out["resume"] = False
        elif name in ("preset", "config", "run_dir", "checkpoint"):
            if not value:
                if i + 1 >= len(argv):
                    continue  # tyro reports the missing value
                value = argv[i + 1]
                next(it, None)
            out[name] = value
    if out["checkpoint"] is not None:
        out["checkpoint"] = _checkpoint_step(out["checkpoint"])
    if out["preset"] not in train.PRESETS:
        raise UsageError(
            f"--preset: invalid choice {out['preset']!r} (choose from "
            f"{', '.join(sorted(train.PRESETS))})"
        )
    return out


def _checkpoint_step(value: Any) -> int:
    """The update number `--checkpoint` names (an int >= 0)."""
    try:
        step = int(value)
    except (TypeError, ValueError):
        step = -1
    if step < 0:
        raise UsageError(
            f"--checkpoint: expected an update number (an int >= 0); got {value!r}"
        )
    return step


def _load_run(run_dir: str | Path, step: int | None):
    """`train.load_run`, its warnings (a skipped corrupt checkpoint, a lost
    LATEST) printed as `tvq-eqx: warning: ...` lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", train.CheckpointWarning)
        out = train.load_run(
            run_dir, step=None if step is None else _checkpoint_step(step)
        )
    for w in caught:
        if issubclass(w.category, train.CheckpointWarning):
            sys.stderr.write(f"tvq-eqx: warning: {w.message}\n")
        else:  # not ours: as if not caught
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _check_at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}; got {value}")


def _with_config_file(run: RunConfig, path: str | None) -> RunConfig:
    """`run` with the fields of TOML file `path` (if any) applied."""
    if path is None:
        return run
    try:
        return run.updated(_read_config_file(path))
    except ValueError as e:
        raise UsageError(f"--config {path}: {e}") from None


def _base_run(pre: dict[str, Any]) -> RunConfig:
    return _with_config_file(train.PRESETS[pre["preset"]], pre["config"])


def _follow_mem_len(run: RunConfig, base: RunConfig, argv: list[str]) -> RunConfig:
    """`mem_len` moved with a new `--model.block-len` (the rule:
    `train._run_config.mem_len_follows`); tyro built the model config field
    by field, so the rule is applied here."""
    given = any(a.split("=")[0] == "--model.mem-len" for a in argv)
    changed = run.model.block_len != base.model.block_len
    if mem_len_follows(base.model, block_len_changed=changed, mem_len_given=given):
        return run.replace(model=dict(mem_len=run.model.block_len))
    return run


def _parse_run_command(cls, argv: list[str], *, prog: str, base: RunConfig, **fields):
    default = cls(run=base, **fields)
    args = _parse(cls, argv, default=default, prog=prog)
    try:
        run = _follow_mem_len(args.run, base, argv)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return dataclasses.replace(args, run=run)


# ----------------------------------------------------------------------------
# Commands


def _init_distributed() -> None:
    """`jax.distributed.initialize()`; a missing coordinator setting is a
    usage error (one line), a failure to connect keeps its traceback."""
    import jax

    # Explicit settings from the environment (jax reads only the coordinator
    # address there); unset, jax detects SLURM / Cloud TPU / MPI itself.
    explicit: dict[str, Any] = {}
    for var, name in (
        ("JAX_NUM_PROCESSES", "num_processes"),
        ("JAX_PROCESS_ID", "process_id"),
    ):
        value = os.environ.get(var)
        if value is not None:
            if not value.strip().isdigit():
                raise UsageError(f"--distributed: {var}={value!r} is not an integer")
            explicit[name] = int(value)
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        explicit["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    # Cross-process collectives on CPU (a local multi-process run) need gloo
    # (ignored by GPU and TPU backends). Set only for an explicit multi-process
    # run, and undone if it does not start: it is process-wide.
    previous = jax.config.jax_cpu_collectives_implementation
    if explicit.get("num_processes", 1) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**explicit)
    except ValueError as e:
        jax.config.update("jax_cpu_collectives_implementation", previous)
        raise UsageError(
            f"--distributed: {e} (run under SLURM / Cloud TPU, or set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        ) from None


def _mesh_from_flag(spec: str, run: RunConfig):
    """The (data, seq) mesh of `--mesh data=D,seq=S`, checked against the
    devices and the run's batch and update segments."""
    import jax

    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("data", "seq") or name in sizes or not value.strip().isdigit():
            raise UsageError(
                f"--mesh {spec!r}: expected data=N,seq=M (each axis once, "
                "positive integers)"
            )
        sizes[name] = int(value)
    data, seq = sizes.get("data", 1), sizes.get("seq", 1)
    if data < 1 or seq < 1 or data * seq != jax.device_count():
        raise UsageError(
            f"--mesh {spec!r}: data x seq = {data * seq} must equal the "
            f"{jax.device_count()} devices"
        )
    if run.data.batch_size % data:
        raise UsageError(
            f"--mesh {spec!r}: batch_size={run.data.batch_size} must be a "
            f"multiple of data={data}"
        )
    chunk, rest = divmod(run.update_len, seq)
    m = run.model
    mem_len = m.block_len if m.mem_len is None else m.mem_len
    if rest or chunk % m.block_len or chunk < mem_len:
        raise UsageError(
            f"--mesh {spec!r}: each device's part of an update segment "
            f"(update_len={run.update_len} / seq={seq}) must be whole, a "
            f"multiple of block_len={m.block_len} and at least mem_len={mem_len}"
        )
    if seq > 1 and m.attention != "vq":
        raise UsageError(
            f"--mesh {spec!r}: seq > 1 (context parallelism) needs "
            f"--model.attention vq; got {m.attention!r}"
        )
    return train.make_mesh(seq=seq)


def _mesh_or_none(batch_size: int):
    import jax

    if jax.device_count() <= 1:
        return None
    if batch_size % jax.device_count() != 0:
        raise UsageError(
            f"batch_size={batch_size} must be a multiple of the "
            f"{jax.device_count()} devices"
        )
    return train.make_mesh()


def _check_doc_masking(doc_masking: bool, model_config) -> None:
    """A run with `--doc-masking` needs a model that masks documents here
    (the implementation resolved on this machine): else a usage error."""
    if doc_masking:
        try:
            check_doc_masking(model_config)
        except ValueError as e:
            raise UsageError(f"--doc-masking: {e}") from None


def _unit(run: RunConfig) -> str:
    return "bits per byte" if run.model.n_vocab == 256 else "bits per token"


def _printer(decode, run: RunConfig):
    """Generated text to stdout as it comes (`sampling.TokenPrinter`)."""
    from .sampling import TokenPrinter

    return TokenPrinter(decode, byte_level=run.data.kind == "bytes")


def _print_sample(model, prompt, printer, *, steps, temperature,
                  top_p, seed) -> None:  # fmt: skip
    """Generate `steps` tokens after `prompt` and print them as they come
    (`sampling.sample_iter`: memory bounded by one chunk, Ctrl-C stops
    between two chunks with what was printed kept)."""
    import jax
    import numpy as np

    from . import sampling

    try:
        chunks = sampling.sample_iter(
            model,
            np.asarray(prompt, np.int32),
            steps=steps,
            key=jax.random.key(seed),
            temperature=max(temperature, 0.0),  # the run's "<= 0 = greedy"
            top_p=top_p,
        )
    except ValueError as e:  # what the sampler rejects (a length past 2**32)
        raise UsageError(str(e)) from None
    try:
        for chunk in chunks:
            printer.write(chunk)
    finally:
        printer.close()


def _finish_outputs(run_dir: Path, run) -> None:
    """What a complete run writes after its last checkpoint (the curves
    plot), written now if a kill cut it short."""
    from .train.callbacks import plot_curves

    metrics, png = run_dir / "metrics.jsonl", run_dir / "curves.png"
    if metrics.is_file() and not png.exists():
        plot_curves(metrics, png, unit=_unit(run))
        print(f"wrote the missing {png}", flush=True)


def cmd_train(argv: list[str]) -> int:
    locks: list = []  # the run folder's lock, held until the command returns
    try:
        return _cmd_train(argv, locks)
    finally:
        for lock in locks:
            lock.release()


def _cmd_train(argv: list[str], locks: list) -> int:
    import equinox as eqx
    import jax

    from .train.callbacks import (
        JSONLLogger,
        ProgressBar,
        RunFolderWriter,
        plot_curves,
    )

    prog = "tvq-eqx train"
    pre = _pre_parse(argv)
    help_requested = any(a in ("-h", "--help") for a in argv)
    run_dir = (
        Path(pre["run_dir"])
        if pre["run_dir"]
        else train.default_run_dir(pre["preset"], resume=pre["resume"])
    )
    ckpt_dir = train.checkpoints_of(run_dir)
    ts = meta = saved = None
    seen: list = []
    if pre["resume"] and not help_requested:
        try:
            saved, ts, meta = _load_run(run_dir, pre["checkpoint"])
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
        seen = train.checkpoint_candidates(ckpt_dir)
        # The checkpoint's settings are the defaults; --config and flags may
        # only repeat them (or change --steps).
        base = _with_config_file(saved, pre["config"])
    else:
        if pre["checkpoint"] is not None and not help_requested:
            raise UsageError(
                "--checkpoint needs --resume (it names the checkpoint to continue)"
            )
        base = _base_run(pre)
    args = _parse_run_command(
        TrainCommand, argv, prog=prog, base=base, preset=pre["preset"]
    )
    run = args.run
    if args.stop_at is not None:
        _check_at_least("--stop-at", args.stop_at, 1)
    if saved is not None:
        assert meta is not None and ts is not None  # loaded together with saved
        train.check_resume(saved, run, meta)
        if train.is_finished(run, meta):
            print(
                f"{run_dir}: the run is complete ({meta['step']} of {run.steps} "
                f"updates, final validation done; {meta['path']}); nothing to do "
                "(a larger --steps extends it)",
                flush=True,
            )
            _finish_outputs(run_dir, run)
            return 0
        if args.stop_at is not None and args.stop_at <= int(ts.step):
            raise UsageError(
                f"--stop-at {args.stop_at} is not after the checkpoint's update "
                f"{int(ts.step)}"
            )
    else:
        train.check_new_run_dir(run_dir)
    if args.distributed:
        _init_distributed()

    # Everything that can fail on bad input happens before anything is written.
    data = train.load_run_data(run)
    train_stream = train.make_stream(run, data.splits["train"], train=True)
    val_stream = train.make_stream(run, data.splits["validation"], train=False)
    if args.mesh is not None:
        mesh = _mesh_from_flag(args.mesh, run)
    else:
        mesh = _mesh_or_none(run.data.batch_size)
    # Context parallelism is a run-time setting of the model config.
    run, ts = train.for_mesh(run, ts, mesh)
    _check_doc_masking(run.doc_masking, run.model)
    if ts is None:
        ts = train.new_train_state(run)
    if mesh is not None:
        ts = train.shard_train_state(ts, mesh)

    # One training process per run folder (process 0 writes it). A new
    # folder is locked when the first update creates it (nothing is written
    # before); an existing one now. Under the lock, what was checked before it
    # is checked again: another run may have written in between.
    def lock_and_recheck() -> None:
        if locks or jax.process_index() != 0:
            return
        locks.append(train.RunLock(run_dir).acquire())
        if meta is None:
            train.check_new_run_dir(run_dir)
        elif train.checkpoint_candidates(ckpt_dir) != seen:
            raise train.RunDirError(
                f"{ckpt_dir} changed while this run loaded {meta['path']} "
                "(another process wrote to it); resume again"
            )

    if run_dir.is_dir():
        lock_and_recheck()

    class LockOnFirstStep(train.Callback):
        def on_step(self, step, metrics, train_state):
            lock_and_recheck()

    # The run's id: kept by a resume (a fresh one for checkpoints older than
    # run ids), in run.json and every checkpoint (loading refuses others).
    run_id = (meta or {}).get("run_id") or train.new_run_id()
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(ts.model, eqx.is_array)))
    start = int(ts.step)
    unit = _unit(run)
    print(
        f"tvq-eqx train: preset={args.preset} params={n_params:,} "
        f"devices={jax.device_count()} batch={run.data.batch_size}x{run.data.seq_len} "
        f"updates={run.steps} (from {start}) run_dir={run_dir}",
        flush=True,
    )
    metrics_path = run_dir / "metrics.jsonl"
    result = train.fit(
        ts,
        run,
        train_stream,
        eval_stream=val_stream,
        mesh=mesh,
        checkpoint_dir=ckpt_dir,
        checkpoint_meta=dict(preset=args.preset, run_id=run_id),
        stop_at=args.stop_at,
        callbacks=[
            LockOnFirstStep(),
            RunFolderWriter(run_dir, run, run_id),  # run.json after update 1
            JSONLLogger(metrics_path, resume_step=start if args.resume else None),
            ProgressBar(unit_name=unit, disable=not args.progress),
        ],
    )
    if result.status == "interrupted":
        where = result.checkpoint or "no new checkpoint (no update completed)"
        name = _signal_name(result.signal)
        sys.stderr.write(
            f"tvq-eqx: interrupted at update {result.step} ({name}); checkpoint: "
            f"{where}; continue with --resume\n"
        )
        # The shell's convention: 128 + the signal's number (130 for Ctrl-C).
        return 128 + result.signal if result.signal else EXIT_INTERRUPTED
    if result.status == "diverged":
        kept = train.latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        sys.stderr.write(
            f"tvq-eqx: training diverged: {result.message}; nothing non-finite "
            f"was saved; last finite checkpoint: {kept or 'none'} (resume it with "
            "--resume --on-nonfinite skip, or lower the learning rate in a new "
            "--run-dir)\n"
        )
        return EXIT_DIVERGED
    if result.status == "stopped":
        print(
            f"stopped at update {result.step} (--stop-at); resume with --resume",
            flush=True,
        )
        return 0
    val = result.validation
    assert val is not None  # "completed" ran the final evaluation on val_stream
    png = plot_curves(metrics_path, run_dir / "curves.png", unit=unit)
    print(
        f"validation {unit}: {val['bits_per_token']:.4f} "
        f"(perplexity {val['perplexity']:.3f} over {int(val['token_count']):,} tokens)"
    )
    print(
        f"train wall time: {result.wall_s:.1f} s; checkpoint: {ckpt_dir}; curves: {png}"
    )
    if run.sample_len > 0 and data.encode is not None and data.decode is not None:
        import numpy as np

        valid = data.splits["validation"]
        prompt = np.asarray(valid[: min(len(valid), run.model.block_len)], np.int32)
        print("sample (prompt from validation text, then generated):")
        print("-" * 60)
        print(data.decode(prompt) + "\u2502", end="", flush=True)
        _print_sample(
            # Sampling runs on one device, whatever the training mesh.
            result.train_state.model.with_config(seq_axis=None, batch_axis=None),
            prompt,
            _printer(data.decode, run),
            steps=run.sample_len,
            temperature=run.temperature,
            top_p=run.top_p,
            seed=run.seed,
        )
        print("-" * 60)
    return 0


def cmd_eval(argv: list[str]) -> int:
    import jax

    args = _parse(EvalCommand, argv, default=None, prog="tvq-eqx eval")
    if args.eval_batches is not None:
        _check_at_least("--eval-batches", args.eval_batches, 0)
    if args.batch_size is not None:
        _check_at_least("--batch-size", args.batch_size, 1)
    if args.distributed:
        _init_distributed()
    run, ts, meta = _load_run(args.run_dir, args.checkpoint)
    try:
        run = run.replace(
            eval_batches=run.eval_batches
            if args.eval_batches is None
            else args.eval_batches,
            data=dict(
                batch_size=run.data.batch_size
                if args.batch_size is None
                else args.batch_size,
                path=args.data if args.data is not None else run.data.path,
            ),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    changes = {
        k: v
        for k, v in dict(
            implementation=args.implementation, block_len=args.block_len
        ).items()
        if v is not None
    }
    try:
        model = ts.model.with_config(**changes) if changes else ts.model
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_doc_masking(run.doc_masking, model.config)
    data = train.load_run_data(run, splits=("train", args.split))
    stream = train.make_stream(run, data.splits[args.split], train=False)
    mesh = _mesh_or_none(run.data.batch_size)
    t0 = time.perf_counter()
    progress = None
    if args.progress:
        from tqdm import tqdm

        progress = lambda it: tqdm(it, desc=f"eval {args.split}", file=sys.stderr)
    res: dict[str, Any] = dict(
        train.evaluate_stream(model, stream, run, mesh=mesh, progress=progress)
    )
    res["wall_s"] = time.perf_counter() - t0
    res.update(
        split=args.split,
        step=meta["step"],
        checkpoint=meta["path"],
        devices=jax.device_count(),
    )
    print(
        f"{args.split} {_unit(run)}: {res['bits_per_token']:.4f} "
        f"(perplexity {res['perplexity']:.3f}, {int(res['token_count']):,} tokens, "
        f"{res['wall_s']:.1f} s)"
    )
    from .train.callbacks import JSONLLogger

    log = JSONLLogger(Path(args.run_dir) / "metrics.jsonl", append=True)
    log.on_eval(dict(res, split=f"eval_{args.split}"))
    return 0


def cmd_sample(argv: list[str]) -> int:
    import numpy as np

    from . import data as data_lib

    args = _parse(SampleCommand, argv, default=None, prog="tvq-eqx sample")
    if args.temperature is not None and not math.isfinite(args.temperature):
        raise UsageError(
            f"--temperature must be a finite number (<= 0 = greedy); got {args.temperature}"
        )
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.sample_len is not None:
        _check_at_least("--sample-len", args.sample_len, 0)
    if args.seed is not None:
        _check_at_least("--seed", args.seed, 0)
    if args.distributed:
        _init_distributed()
    run, ts, meta = _load_run(args.run_dir, args.checkpoint)
    given = dict(
        sample_len=args.sample_len,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        run = run.replace(**{k: v for k, v in given.items() if v is not None})
        if args.data is not None:
            run = run.replace(data=dict(path=args.data))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if run.data.kind == "bytes":
        encode, decode = data_lib.encode_bytes, data_lib.decode_bytes
    else:
        loaded = train.load_run_data(run, splits=("validation",))
        encode, decode = loaded.encode, loaded.decode
    if args.prompt is not None:
        if encode is None:
            raise UsageError("--prompt needs a text dataset")
        prompt = encode(args.prompt)
        if prompt.size == 0:
            raise UsageError("--prompt must not be empty")
    elif run.data.kind == "bytes":
        prompt = data_lib.encode_bytes("\n")
    else:
        prompt = np.zeros(1, np.int32)
    t0 = time.perf_counter()
    printer = _printer(decode, run)
    sys.stdout.write(decode(prompt) if decode else "")
    try:
        _print_sample(
            ts.model,
            prompt,
            printer,
            steps=run.sample_len,
            temperature=run.temperature,
            top_p=run.top_p,
            seed=run.seed,
        )
    except KeyboardInterrupt:
        sys.stderr.write(
            f"tvq-eqx: interrupted after {printer.count} of {run.sample_len} "
            "tokens (those are printed above)\n"
        )
        return EXIT_INTERRUPTED
    dt = time.perf_counter() - t0
    print(
        f"[{printer.count} tokens in {dt:.2f} s incl. compile; step {meta['step']}]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(argv: list[str]) -> int:
    import jax
    import numpy as np

    from .sampling import sample

    pre = _pre_parse(argv)
    args = _parse_run_command(
        BenchCommand, argv, prog="tvq-eqx bench", base=_base_run(pre),
        preset=pre["preset"],
    )  # fmt: skip
    _check_at_least("--bench-steps", args.bench_steps, 1)
    _check_at_least("--sample-tokens", args.sample_tokens, 0)
    if args.distributed:
        _init_distributed()
    run = args.run
    _check_doc_masking(run.doc_masking, run.model)
    b, t = run.data.batch_size, run.data.seq_len
    mesh = _mesh_or_none(b)
    optimizer = train.optimizer_from_config(run.optimizer, run.steps)
    ts = train.new_train_state(run)
    if mesh is not None:
        ts = train.shard_train_state(ts, mesh)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, run.model.n_vocab, (b, t + 1), dtype=np.int32)
    batch = dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=np.ones((b, t), np.float32),
        # With --doc-masking: a document every block_len tokens.
        doc_starts=np.arange(t)[None, :].repeat(b, 0) % run.model.block_len == 0,
    )
    step_fn = train.make_train_step(
        optimizer, update_len=run.update_len, mesh=mesh, doc_masking=run.doc_masking
    )
    t0 = time.perf_counter()
    ts, m = step_fn(ts, batch, reset=True)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        ts, m = step_fn(ts, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.bench_steps
    res: dict[str, Any] = dict(
        preset=args.preset,
        device=str(jax.devices()[0].platform),
        devices=jax.device_count(),
        compile_s=compile_s,
        step_s=dt,
        train_tokens_per_s=b * t / dt,
    )
    if args.sample_tokens > 0:
        prompt = toks[:1, :1]
        out = sample(ts.model, prompt, steps=args.sample_tokens, key=jax.random.key(0))
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        out = sample(ts.model, prompt, steps=args.sample_tokens, key=jax.random.key(1))
        jax.block_until_ready(out)
        res["sample_ms_per_token"] = (
            1e3 * (time.perf_counter() - t0) / args.sample_tokens
        )
    print(json.dumps(res, indent=2))
    return 0


_RUNNERS = dict(train=cmd_train, eval=cmd_eval, sample=cmd_sample, bench=cmd_bench)

_USAGE = """\
usage: tvq-eqx {train,eval,sample,bench} [OPTIONS]

Transformer-VQ: train, evaluate, sample, bench.

commands:
  train    train a model (progress bar, JSONL log, PNG curves, checkpoints)
  eval     bits per token of a trained run on a data split
  sample   generate text from a trained run
  bench    train-step and sampling throughput of a configuration

`tvq-eqx COMMAND --help` lists a command's flags with types and defaults.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m tvq_eqx` and the `tvq-eqx` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(_USAGE)
        return 0
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    try:
        if command is None:
            raise UsageError(
                f"missing command (choose from {', '.join(_RUNNERS)}; see tvq-eqx --help)"
            )
        if command not in _RUNNERS:
            raise UsageError(
                f"invalid choice {command!r} (choose from {', '.join(_RUNNERS)})"
            )
        return _RUNNERS[command](rest)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        sys.stderr.write("tvq-eqx: interrupted\n")
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        if os.environ.get("TVQ_EQX_DEBUG"):
            raise
        text = str(e).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        sys.stderr.write(f"tvq-eqx: error: {msg}\n")
        return EXIT_USAGE

"""`python -m tvq_eqx` / `tvq-eqx`: train, eval, sample, bench.

```
tvq-eqx train  [--preset tiny] [--config run.toml] [--run-dir DIR] [--resume [--checkpoint STEP]] [--FIELD VALUE ...]
tvq-eqx eval   --run-dir DIR [--checkpoint STEP] [--split validation|test] [--eval-batches N]
tvq-eqx sample --run-dir DIR [--checkpoint STEP] [--prompt TEXT] [--sample-len N] [--temperature T] [--top-p P] [--prefill-chunk C]
tvq-eqx bench  [--preset tiny] [--bench-steps N] [--FIELD VALUE ...]
tvq-eqx export --run-dir DIR --out MODEL.safetensors [--checkpoint STEP]
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
policy lives in `tvq_eqx.train.runs`. See docs/training.md.
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
from .train import CheckpointError, DataError, RunConfig, runs
from .train.runs import RunDirError

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


# `--tracker` repeats (`--tracker tensorboard --tracker wandb`); each value
# may also be a comma list.
if TYPE_CHECKING or tyro is None:
    _TrackerFlags = tuple[str, ...]
else:
    _TrackerFlags = Annotated[tuple[str, ...], tyro.conf.UseAppendAction]


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """Train a model: tqdm progress, JSONL log, PNG curves, checkpoints; at the
    end validation bits per token and a sample."""

    run: _RunFlags
    """The run's settings (preset, then --config, then these flags)."""
    preset: PresetName = "tiny"
    """Named starting configuration."""
    config: str | None = None
    """TOML file of RunConfig fields ([model], [model.pallas.block_sizes], [data], [optimizer], [codebook] tables) applied on top of the preset."""
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
    tracker: _TrackerFlags = ()
    """Experiment trackers besides the JSONL log: tensorboard (RUN_DIR/tensorboard), wandb (project tvq-eqx, RUN_DIR/wandb; WANDB_MODE=offline works without an account), trackio (project tvq-eqx, under TRACKIO_DIR); repeat the flag or give a comma list. Each needs its extra: pip install 'tvq-eqx[NAME]'."""
    profile_steps: str | None = None
    """Write a jax.profiler trace of updates A to B (A:B, or A for one) into RUN_DIR/profile."""
    peak_flops: float | None = None
    """Peak FLOP/s per device (per process on a CPU) for the logged MFU (None = the data sheet of a known GPU/TPU, TVQ_PEAK_FLOPS, or a matmul measured on a CPU; unknown devices log mfu null)."""


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
    prefill_chunk: int | None = None
    """Prompt tokens per model call while reading the prompt, a multiple of the block length; the tokens do not depend on it (None = the sampler's default "auto": tvq_eqx.sampling.PREFILL_CHUNK, 2048, rounded down to whole blocks)."""
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


@dataclasses.dataclass(frozen=True)
class ExportCommand:
    """Write a trained run's model as safetensors with its config (tvq_eqx.save_model)."""

    run_dir: str
    """Run folder holding checkpoints/."""
    out: str
    """The .safetensors file to write (tvq_eqx.load_model reads it)."""
    checkpoint: int | None = None
    """The checkpoint of this update (None = the newest intact one)."""


_COMMANDS = dict(
    train=TrainCommand,
    eval=EvalCommand,
    sample=SampleCommand,
    bench=BenchCommand,
    export=ExportCommand,
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
    """`mem_len` moved with a new `--model.block-len` as `RunConfig.updated`
    moves it (the rule's one home); tyro built the model config field by
    field, past that rule."""
    given = any(a.split("=")[0] == "--model.mem-len" for a in argv)
    if given or run.model.block_len == base.model.block_len:
        return run
    moved = base.updated(dict(model=dict(block_len=run.model.block_len)))
    return run.replace(model=dict(mem_len=moved.model.mem_len))


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
    """`train.init_distributed`, its bad settings a usage error."""
    try:
        train.init_distributed()
    except ValueError as e:
        raise UsageError(f"--distributed: {e}") from None


def _mesh(spec: str | None, run: RunConfig):
    """`train.mesh_for_run` for `--mesh data=D,seq=S` (None: the batch over
    every device), its refusals usage errors naming the flag."""
    sizes: dict[str, int] = {}
    for part in [] if spec is None else spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("data", "seq") or name in sizes or not value.strip().isdigit():
            raise UsageError(
                f"--mesh {spec!r}: expected data=N,seq=M (each axis once, "
                "positive integers)"
            )
        sizes[name] = int(value)
    try:
        return train.mesh_for_run(run, **sizes)
    except ValueError as e:
        flag = "--batch-size" if spec is None else f"--mesh {spec!r}"
        raise UsageError(f"{flag}: {e}") from None


def _unit(run: RunConfig) -> str:
    return "bits per byte" if run.model.n_vocab == 256 else "bits per token"


def _printer(decode, run: RunConfig):
    """Generated text to stdout as it comes (`sampling.TokenPrinter`)."""
    from .sampling import TokenPrinter

    return TokenPrinter(decode, byte_level=run.data.kind == "bytes")


def _print_sample(model, prompt, printer, *, steps, temperature,
                  top_p, seed, prefill_chunk=None) -> None:  # fmt: skip
    """Generate `steps` tokens after `prompt` and print them as they come
    (`sampling.sample_iter`: memory bounded by one chunk, Ctrl-C stops
    between two chunks with what was printed kept)."""
    import jax
    import numpy as np

    from . import sampling

    chunking = {} if prefill_chunk is None else dict(prefill_chunk=prefill_chunk)
    try:
        chunks = sampling.sample_iter(
            model,
            np.asarray(prompt, np.int32),
            steps=steps,
            key=jax.random.key(seed),
            temperature=max(temperature, 0.0),  # the run's "<= 0 = greedy"
            top_p=top_p,
            **chunking,
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


@dataclasses.dataclass
class _TrainSetup:
    """What `train` resolved before anything runs: the parsed command, the
    run's settings, its folder, and with `--resume` the loaded checkpoint
    (`ts`, `meta`) and the checkpoints seen when it was loaded."""

    args: TrainCommand
    run: RunConfig
    run_dir: Path
    ts: Any = None
    meta: dict[str, Any] | None = None
    seen: list = dataclasses.field(default_factory=list)


def _train_setup(argv: list[str]) -> _TrainSetup:
    """Settings layered (preset or checkpoint, --config, flags) and checked
    against the run folder: a fresh run's folder must hold no checkpoints, a
    resumed run may change only --steps."""
    pre = _pre_parse(argv)
    help_requested = any(a in ("-h", "--help") for a in argv)
    run_dir = (
        Path(pre["run_dir"])
        if pre["run_dir"]
        else runs.default_run_dir(pre["preset"], resume=pre["resume"])
    )
    saved = ts = meta = None
    seen: list = []
    if pre["resume"] and not help_requested:
        try:
            saved, ts, meta = _load_run(run_dir, pre["checkpoint"])
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from None
        seen = runs.checkpoints_seen(run_dir)
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
        TrainCommand, argv, prog="tvq-eqx train", base=base, preset=pre["preset"]
    )
    if args.stop_at is not None:
        _check_at_least("--stop-at", args.stop_at, 1)
    if saved is None:
        runs.check_new_run_dir(run_dir)
    else:
        assert meta is not None and ts is not None  # loaded together with saved
        runs.check_resume(saved, args.run, meta)
    return _TrainSetup(args, args.run, run_dir, ts, meta, seen)


def _nothing_to_do(setup: _TrainSetup) -> bool:
    """A resumed run that is already complete says so (and writes its curves
    if a kill cut them short); a --stop-at before the checkpoint is refused."""
    if setup.meta is None:
        return False
    meta, stop_at, step = setup.meta, setup.args.stop_at, int(setup.ts.step)
    if runs.is_finished(setup.run, meta):
        print(
            f"{setup.run_dir}: the run is complete ({meta['step']} of "
            f"{setup.run.steps} updates, final validation done; {meta['path']}); "
            "nothing to do (a larger --steps extends it)",
            flush=True,
        )
        _finish_outputs(setup.run_dir, setup.run)
        return True
    if stop_at is not None and stop_at <= step:
        raise UsageError(
            f"--stop-at {stop_at} is not after the checkpoint's update {step}"
        )
    return False


def cmd_train(argv: list[str]) -> int:
    import equinox as eqx
    import jax

    from .train.callbacks import JSONLLogger, ProgressBar, RunFolderWriter

    setup = _train_setup(argv)
    if _nothing_to_do(setup):
        return 0
    args, run, run_dir, ts = setup.args, setup.run, setup.run_dir, setup.ts
    if args.distributed:
        _init_distributed()
    # Everything that can fail on bad input happens before anything is written.
    data = train.load_run_data(run)
    train_stream = train.make_stream(run, data.splits["train"], train=True)
    val_stream = train.make_stream(run, data.splits["validation"], train=False)
    mesh = _mesh(args.mesh, run)
    # Context parallelism is a run-time setting of the model config.
    run, ts = train.for_mesh(run, ts, mesh)
    if ts is None:
        ts = train.new_train_state(run)
    if mesh is not None:
        ts = train.shard_train_state(ts, mesh)
    # The run's id: kept by a resume (a fresh one for checkpoints older than
    # run ids), in run.json and every checkpoint (loading refuses others).
    run_id = (setup.meta or {}).get("run_id") or runs.new_run_id()
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(ts.model, eqx.is_array)))
    start = int(ts.step)
    print(
        f"tvq-eqx train: preset={args.preset} params={n_params:,} "
        f"devices={jax.device_count()} batch={run.data.batch_size}x{run.data.seq_len} "
        f"updates={run.steps} (from {start}) run_dir={run_dir}",
        flush=True,
    )
    ckpt_dir = runs.checkpoints_of(run_dir)
    guard = runs.RunFolderGuard(run_dir, resumed_from=setup.meta, seen=setup.seen)
    extra = _train_extras(args, run, run_dir, mesh)
    try:
        with guard:
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
                    guard,  # locks a fresh folder at its first update
                    RunFolderWriter(run_dir, run, run_id),  # run.json after update 1
                    JSONLLogger(
                        run_dir / "metrics.jsonl",
                        resume_step=start if args.resume else None,
                    ),
                    ProgressBar(unit_name=_unit(run), disable=not args.progress),
                    *extra.callbacks,
                ],
                peak_flops=extra.peak_flops,
            )
    finally:
        # After a run that raised: the trackers flush what they logged, the
        # profiler trace stops (both idempotent).
        for cb in extra.callbacks:
            cb.close()
    if result.status != "completed":
        return _report_stop(result, ckpt_dir)
    _report_completed(result, run, run_dir, data)
    return 0


@dataclasses.dataclass
class _TrainExtras:
    """The trackers and profiler of `--tracker` / `--profile-steps` and the
    peak FLOP/s of `--peak-flops` (None: unknown)."""

    callbacks: list
    peak_flops: float | None


def _profile_span(spec: str, steps: int) -> tuple[int, int]:
    """`--profile-steps A:B` (or `A`) as update numbers 1 <= A <= B."""
    first, sep, last = spec.partition(":")
    try:
        a = int(first)
        b = int(last) if sep else a
    except ValueError:
        a = b = -1
    if not 1 <= a <= b:
        raise UsageError(
            f"--profile-steps: expected A:B, updates 1 <= A <= B (or A); got {spec!r}"
        )
    if a > steps:
        raise UsageError(f"--profile-steps {spec}: update {a} is past --steps {steps}")
    return a, b


def _train_extras(args: TrainCommand, run: RunConfig, run_dir: Path, mesh):
    """The callbacks of `--tracker` and `--profile-steps` and the peak of
    `--peak-flops`, made before anything is written: a missing tracker
    library is a usage error naming its extra. Prints where the peak comes
    from."""
    from .train.callbacks import TRACKERS, ProfileTrace, make_tracker

    names = [n.strip() for value in args.tracker for n in value.split(",")]
    callbacks: list = []
    for name in dict.fromkeys(n for n in names if n):
        if name not in TRACKERS:
            raise UsageError(
                f"--tracker: invalid choice {name!r} (choose from {', '.join(TRACKERS)})"
            )
        try:
            callbacks.append(make_tracker(name, run_dir))
        except ImportError as e:
            raise UsageError(f"--tracker {name}: {e}") from None
    if args.profile_steps is not None:
        a, b = _profile_span(args.profile_steps, run.steps)
        callbacks.append(ProfileTrace(run_dir / "profile", a, b))
    devices = None if mesh is None else list(mesh.devices.flat)
    try:
        peak, source = train.device_peak_flops(
            run.model.dtype, devices, per_device=args.peak_flops
        )
    except ValueError as e:
        flag = "--peak-flops" if args.peak_flops is not None else "TVQ_PEAK_FLOPS"
        raise UsageError(f"{flag}: {e}") from None
    shown = "unknown" if peak is None else f"{peak:.3g} FLOP/s"
    print(f"peak for MFU: {shown} ({source})", flush=True)
    return _TrainExtras(callbacks, peak)


def _report_stop(result, ckpt_dir: Path) -> int:
    """The line and exit code of a run that did not complete."""
    if result.status == "interrupted":
        where = result.checkpoint or "no new checkpoint (no update completed)"
        sys.stderr.write(
            f"tvq-eqx: interrupted at update {result.step} "
            f"({_signal_name(result.signal)}); checkpoint: {where}; continue "
            "with --resume\n"
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
    assert result.status == "stopped", result.status
    print(
        f"stopped at update {result.step} (--stop-at); resume with --resume", flush=True
    )
    return 0


def _report_completed(result, run: RunConfig, run_dir: Path, data) -> None:
    """Validation, wall time, the curves plot and (for text) a sample."""
    import numpy as np

    from .train.callbacks import plot_curves

    val = result.validation
    assert val is not None  # "completed" ran the final evaluation
    unit = _unit(run)
    png = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", unit=unit)
    print(
        f"validation {unit}: {val['bits_per_token']:.4f} "
        f"(perplexity {val['perplexity']:.3f} over {int(val['token_count']):,} tokens)"
    )
    print(
        f"train wall time: {result.wall_s:.1f} s; checkpoint: "
        f"{runs.checkpoints_of(run_dir)}; curves: {png}"
    )
    if run.sample_len == 0 or data.encode is None or data.decode is None:
        return
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
    data = train.load_run_data(run, splits=("train", args.split))
    stream = train.make_stream(run, data.splits[args.split], train=False)
    mesh = _mesh(None, run)
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
    big_l = ts.model.config.block_len
    if args.prefill_chunk is not None and (
        args.prefill_chunk < 1 or args.prefill_chunk % big_l
    ):
        raise UsageError(
            "--prefill-chunk must be a positive multiple of the block length "
            f"({big_l}); got {args.prefill_chunk}"
        )
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
            prefill_chunk=args.prefill_chunk,
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
    pre = _pre_parse(argv)
    args = _parse_run_command(
        BenchCommand, argv, prog="tvq-eqx bench", base=_base_run(pre),
        preset=pre["preset"],
    )  # fmt: skip
    _check_at_least("--bench-steps", args.bench_steps, 1)
    _check_at_least("--sample-tokens", args.sample_tokens, 0)
    if args.distributed:
        _init_distributed()
    res = train.measure_throughput(
        args.run,
        steps=args.bench_steps,
        sample_tokens=args.sample_tokens,
        mesh=_mesh(None, args.run),
    )
    print(json.dumps(dict(preset=args.preset, **res), indent=2))
    return 0


def cmd_export(argv: list[str]) -> int:
    args = _parse(ExportCommand, argv, default=None, prog="tvq-eqx export")
    _, ts, meta = _load_run(args.run_dir, args.checkpoint)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the .safetensors file")
    train.save_model(out, ts.model)
    print(f"wrote {out} (update {meta['step']}, {meta['path']})")
    return 0


_RUNNERS = dict(
    train=cmd_train,
    eval=cmd_eval,
    sample=cmd_sample,
    bench=cmd_bench,
    export=cmd_export,
)

_USAGE = """\
usage: tvq-eqx {train,eval,sample,bench,export} [OPTIONS]

Transformer-VQ: train, evaluate, sample, bench, export.

commands:
  train    train a model (progress bar, JSONL log, PNG curves, checkpoints)
  eval     bits per token of a trained run on a data split
  sample   generate text from a trained run
  bench    train-step and sampling throughput of a configuration
  export   write a trained run's model as safetensors (tvq_eqx.load_model reads it)

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

"""`python -m tvq_eqx` / `tvq-eqx`: train, eval, sample, bench.

```
tvq-eqx train  --preset tiny [--data PATH] [--run-dir runs/tiny] [--resume] [--FIELD VALUE ...]
tvq-eqx eval   --run-dir runs/tiny [--split validation|test] [--eval-batches N]
tvq-eqx sample --run-dir runs/tiny [--prompt TEXT] [--sample-len N] [--temperature T] [--top-p P]
tvq-eqx bench  --preset tiny [--bench-steps N] [--FIELD VALUE ...]
```

Every field of `TransformerConfig` and `RunConfig` is a flag (`--d-model 256`,
`--grad-clip none`, `--dtype bfloat16`). Bad input (missing or empty data,
lengths that do not divide, unknown presets or flags, a corrupt or mismatched
checkpoint) ends with one `tvq-eqx: error: ...` line on stderr and exit code 2,
before anything is written. See docs/training.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
# Exceptions that mean bad input (reported as one line); anything else is a bug
# and keeps its traceback. TVQ_EQX_DEBUG=1 shows tracebacks for all.
_REPORTED: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IndexError,
    ImportError,
    RuntimeError,
)


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, no usage dump
        sys.stderr.write(f"tvq-eqx: error: {message}\n")
        raise SystemExit(EXIT_ERROR)


# ----------------------------------------------------------------------------
# Flags generated from the config dataclasses


def _config_fields():
    from ._config import TransformerConfig
    from .train._presets import RunConfig

    model = [f for f in dataclasses.fields(TransformerConfig)]
    run = [f for f in dataclasses.fields(RunConfig) if f.name != "model"]
    return model, run


def _parse_value(name: str, text: str, default: Any, annotation: str) -> Any:
    optional = "None" in str(annotation)
    if optional and text.lower() in ("none", "null", ""):
        return None
    kind = type(default) if default is not None else None
    ann = str(annotation)
    if ann.startswith("Literal["):
        allowed = ast.literal_eval("(" + ann[len("Literal[") : -1] + ",)")
        if text not in allowed:
            raise UsageError(
                f"--{name.replace('_', '-')} must be one of {allowed}; got {text!r}"
            )
        return text
    try:
        if kind is bool or ann == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int or ann.startswith("int"):
            return int(text)
        if kind is float or ann.startswith("float"):
            return float(text)
    except ValueError:
        raise UsageError(f"--{name.replace('_', '-')}: cannot parse {text!r}") from None
    return text


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    model, run = _config_fields()
    g = p.add_argument_group("model and run settings (override the preset)")
    for f in model + run:
        g.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            default=None,
            metavar="VALUE",
        )


def _overrides(args) -> dict[str, Any]:
    from .train._presets import PRESETS

    model, run = _config_fields()
    base = PRESETS["tiny"]
    out = {}
    for f in model + run:
        text = getattr(args, f"cfg_{f.name}", None)
        if text is None:
            continue
        default = (
            getattr(base.model, f.name, None) if f in model else getattr(base, f.name)
        )
        out[f.name] = _parse_value(f.name, text, default, f.type)
    return out


# ----------------------------------------------------------------------------
# Data


def _load_data(run, split: str | None = None):
    """Token arrays (or images) per split, and a decoder for samples."""
    import numpy as np

    from . import data

    kind = run.data_kind
    if kind == "sentencepiece" and (run.data is None or run.tokenizer is None):
        raise UsageError(
            "data_kind 'sentencepiece' needs --data FOLDER and --tokenizer FILE"
        )
    if kind == "images" and run.data is None:
        raise UsageError("data_kind 'images' needs --data FOLDER of images")
    if kind in ("bytes", "images") and run.model.n_vocab < 256:
        raise UsageError(f"byte data needs n_vocab >= 256; got {run.model.n_vocab}")
    if run.data is not None and not Path(run.data).exists():
        raise FileNotFoundError(f"data path {run.data!r} does not exist")
    if kind == "bytes":
        splits = data.load_splits(run.data)
        decode = lambda toks: bytes(int(t) for t in toks).decode("utf-8", "replace")
        encode = lambda s: np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)
        return splits, decode, encode
    if kind == "sentencepiece":
        tok = data.SentencePieceTokenizer.load(run.tokenizer)
        if tok.vocab_size > run.model.n_vocab:
            raise UsageError(
                f"tokenizer {run.tokenizer!r} has {tok.vocab_size} pieces but "
                f"n_vocab={run.model.n_vocab}; pass --n-vocab {tok.vocab_size}"
            )
        docs = data.load_documents(run.data)
        n = len(docs)
        if n < 3:
            raise ValueError(
                f"sentencepiece data needs >= 3 documents; {run.data!r} has {n}"
            )
        n_eval = max(1, n // 20)
        parts = dict(
            train=docs[: n - 2 * n_eval],
            validation=docs[n - 2 * n_eval : n - n_eval],
            test=docs[n - n_eval :],
        )
        splits = {}
        for name, ds in parts.items():
            if split is not None and name not in ("train", split):
                continue
            enc = [
                np.asarray(tok.encode(d.tobytes().decode("utf-8", "replace")), np.int32)
                for d in ds
            ]
            splits[name] = data.pack_documents(enc)[0]
        return (
            splits,
            lambda toks: tok.decode([int(t) for t in toks]),
            (lambda s: np.asarray(tok.encode(s), np.int32)),
        )
    if kind == "images":
        images = data.load_images(run.data)
        n = images.shape[0]
        if n < 3:
            raise ValueError(f"image data needs >= 3 images; {run.data!r} has {n}")
        n_eval = max(1, n // 20)
        splits = dict(
            train=images[: n - 2 * n_eval],
            validation=images[n - 2 * n_eval : n - n_eval],
            test=images[n - n_eval :],
        )
        return splits, None, None
    raise UsageError(f"unknown data kind {kind!r}")


def _stream(run, arr, *, train: bool, batch_size: int | None = None):
    from . import data

    b = run.batch_size if batch_size is None else batch_size
    if run.data_kind == "images":
        return data.ImageStream(
            arr,
            batch_size=b,
            seq_len=run.seq_len,
            seed=run.seed,
            shuffle=train,
            repeat=train,
        )
    return data.TokenStream(
        arr,
        batch_size=b,
        seq_len=run.seq_len,
        seed=run.seed,
        shuffle=train,
        repeat=train,
    )


def _evaluate_stream(run, model, stream, *, mesh, desc, no_progress, leave=True):
    """One pass over `stream` (or its first `eval_batches` windows) with the
    carried state, emptied per `run.context_len`; returns `evaluate`'s dict."""
    from tqdm import tqdm

    from .train import evaluate

    n = (
        stream.num_batches
        if run.eval_batches == 0
        else min(run.eval_batches, stream.num_batches)
    )
    return evaluate(
        model,
        (stream.batch(i) for i in range(n)),
        segment_len=run.update_len,
        mesh=mesh,
        resets=[run.resets_state(i) for i in range(n)],
        progress=lambda it: tqdm(
            it, total=n, desc=desc, leave=leave, disable=no_progress, file=sys.stderr
        ),
    )


# ----------------------------------------------------------------------------
# Checkpoint helpers


def _checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _like_train_state(run, optimizer):
    import equinox as eqx
    import jax

    from .nn import Transformer
    from .train import init_train_state

    def build():
        model = Transformer(run.model, key=jax.random.key(run.seed))
        return init_train_state(
            model, optimizer, run.batch_size, key=jax.random.key(run.seed + 1)
        )

    return eqx.filter_eval_shape(build)


def _load_run(run_dir: Path):
    """RunConfig and TrainState from the newest checkpoint of `run_dir`."""
    from .train import (
        CheckpointError,
        load_checkpoint,
        optimizer_from_config,
        read_meta,
    )
    from .train._presets import RunConfig

    ckpt = _checkpoint_dir(run_dir)
    if not ckpt.is_dir():
        raise CheckpointError(f"no checkpoints in {run_dir} (expected {ckpt})")
    meta = read_meta(ckpt)
    try:
        run = RunConfig.from_dict(meta["run"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{meta['path']}: bad run config in meta.json: {e}"
        ) from None
    optimizer = optimizer_from_config(run.optimizer_config())
    like = _like_train_state(run, optimizer)
    ts, meta = load_checkpoint(meta["path"], like)
    return run, ts, meta, optimizer


# ----------------------------------------------------------------------------
# Logging and plots


class _MetricsLog:
    def __init__(self, path: Path, *, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            # Drop entries written after the checkpoint we resume from.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _floats(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def plot_curves(
    metrics_path: Path, out_path: Path, *, unit: str = "bits per byte"
) -> Path | None:
    """PNG of training and validation bits per token against optimizer updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
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


# ----------------------------------------------------------------------------
# Commands


def _mesh_or_none(batch_size: int):
    import jax

    from .train import make_mesh

    if jax.device_count() <= 1:
        return None
    if batch_size % jax.device_count() != 0:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the {jax.device_count()} devices"
        )
    return make_mesh()


def _unit(run) -> str:
    return "bits per byte" if run.model.n_vocab == 256 else "bits per token"


def _do_sample(run, model, prompt_tokens, decode, *, steps, temperature, top_p, seed):
    import jax
    import numpy as np

    from .sampling import sample

    toks = sample(
        model,
        np.asarray(prompt_tokens, np.int32),
        steps=steps,
        key=jax.random.key(seed),
        temperature=temperature,
        top_p=top_p,
    )
    toks = np.asarray(toks)
    return decode(toks) if decode is not None else toks.tolist()


def _default_run_dir(preset: str, resume: bool) -> Path:
    """`runs/PRESET`; when that already holds a checkpoint and this is not a
    resume, the first free `runs/PRESET-2`, `-3`, ... (so re-running the demo
    never overwrites, and never fails)."""
    from .train import latest_checkpoint

    base = Path("runs") / preset
    if resume:
        return base
    candidate, i = base, 1
    while (
        _checkpoint_dir(candidate).is_dir()
        and latest_checkpoint(_checkpoint_dir(candidate)) is not None
    ):
        i += 1
        candidate = base.with_name(f"{preset}-{i}")
    return candidate


def cmd_train(args) -> int:
    import equinox as eqx
    import jax
    from tqdm import tqdm

    from .nn import Transformer
    from .train import (
        init_train_state,
        latest_checkpoint,
        make_train_step,
        optimizer_from_config,
        save_checkpoint,
        shard_train_state,
    )
    from .train._presets import PRESETS

    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else _default_run_dir(args.preset, args.resume)
    )
    overrides = _overrides(args)
    ckpt_dir = _checkpoint_dir(run_dir)
    existing = ckpt_dir.is_dir() and latest_checkpoint(ckpt_dir) is not None

    if args.resume:
        if not existing:
            raise UsageError(f"--resume: no checkpoint in {ckpt_dir}")
        run, ts, meta, optimizer = _load_run(run_dir)
        bad = {
            k: v
            for k, v in overrides.items()
            if (getattr(run.model, k) if hasattr(run.model, k) else getattr(run, k))
            != v
        }
        if bad:
            raise UsageError(
                f"--resume: flags {sorted(bad)} differ from the checkpoint's run config "
                f"({meta['path']}); resume with the same settings or use a new --run-dir"
            )
    else:
        if existing:
            raise UsageError(
                f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it "
                "or choose another --run-dir (nothing was overwritten)"
            )
        run = PRESETS[args.preset].replace(**overrides)

    # Everything that can fail on bad input happens before anything is written.
    splits, decode, encode = _load_data(run)
    train_stream = _stream(run, splits["train"], train=True)
    val_stream = _stream(run, splits["validation"], train=False)
    mesh = _mesh_or_none(run.batch_size)
    if not args.resume:
        optimizer = optimizer_from_config(run.optimizer_config())
        model = Transformer(run.model, key=jax.random.key(run.seed))
        ts = init_train_state(
            model, optimizer, run.batch_size, key=jax.random.key(run.seed + 1)
        )
    if mesh is not None:
        ts = shard_train_state(ts, mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(
        json.dumps(run.to_dict(), indent=2, sort_keys=True)
    )

    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(ts.model, eqx.is_array)))
    start_step = int(ts.step)
    upb = run.updates_per_batch
    start_batch = start_step // upb
    stop_batch = run.total_batches
    if args.stop_at is not None:
        stop_batch = min(stop_batch, max(start_batch, args.stop_at // upb))
    log = _MetricsLog(
        run_dir / "metrics.jsonl", resume_step=start_step if args.resume else None
    )
    unit = _unit(run)
    print(
        f"tvq-eqx train: preset={args.preset} params={n_params:,} devices={jax.device_count()} "
        f"batch={run.batch_size}x{run.seq_len} updates={run.steps} "
        f"(from {start_step}) run_dir={run_dir}",
        flush=True,
    )

    step_fn = make_train_step(optimizer, update_len=run.update_len, mesh=mesh)

    def run_eval(model, desc):
        return _evaluate_stream(
            run,
            model,
            val_stream,
            mesh=mesh,
            desc=desc,
            no_progress=args.no_progress,
            leave=False,
        )

    def save(step, extra=None):
        meta = dict(
            run=run.to_dict(),
            batch_index=step // upb,
            preset=args.preset,
            **(extra or {}),
        )
        save_checkpoint(ckpt_dir, ts, step=step, meta=meta, keep=run.keep)

    bar = tqdm(
        total=stop_batch * upb,
        initial=start_batch * upb,
        desc="train",
        unit="upd",
        disable=args.no_progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    t_start = time.perf_counter()
    t_last, tok_last = t_start, 0
    tokens_per_batch = run.batch_size * run.seq_len
    val = None
    for batch_index in range(start_batch, stop_batch):
        _, window = train_stream.epoch_and_window(batch_index)
        ts, metrics = step_fn(
            ts, train_stream.batch(batch_index), reset=run.resets_state(window)
        )
        step = (batch_index + 1) * upb
        tok_last += tokens_per_batch
        last = batch_index + 1 == stop_batch
        if step % run.log_every < upb or last:
            m = _floats(metrics)
            now = time.perf_counter()
            tps = tok_last / max(now - t_last, 1e-9)
            t_last, tok_last = now, 0
            log.write(
                dict(
                    split="train",
                    step=step,
                    tokens_per_s=tps,
                    elapsed_s=now - t_start,
                    **m,
                )
            )
            bar.set_postfix(
                loss=f"{m['lm_loss']:.3f}",
                bpb=f"{m['bits_per_token']:.3f}",
                tok_s=f"{tps:,.0f}",
                refresh=False,
            )
        bar.update(upb)
        if run.eval_every and step % run.eval_every < upb and not last:
            val = run_eval(ts.model, f"eval@{step}")
            log.write(dict(split="validation", step=step, **val))
            bar.write(f"step {step}: validation {unit} {val['bits_per_token']:.4f}")
        if run.save_every and step % run.save_every < upb and not last:
            save(step)
    bar.close()
    final_step = stop_batch * upb
    wall = time.perf_counter() - t_start
    if stop_batch < run.total_batches:
        save(final_step)
        print(
            f"stopped at update {final_step} (--stop-at); resume with --resume",
            flush=True,
        )
        return 0
    val = run_eval(ts.model, "eval")
    log.write(dict(split="validation", step=final_step, **val))
    save(final_step, dict(validation=val))
    png = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png", unit=unit)
    print(
        f"validation {unit}: {val['bits_per_token']:.4f} "
        f"(perplexity {val['perplexity']:.3f} over {int(val['token_count']):,} tokens)"
    )
    print(f"train wall time: {wall:.1f} s; checkpoint: {ckpt_dir}; curves: {png}")
    if run.sample_len > 0 and encode is not None:
        prompt = _default_prompt(splits["validation"], run)
        text = _do_sample(
            run,
            ts.model,
            prompt,
            decode,
            steps=run.sample_len,
            temperature=run.temperature,
            top_p=run.top_p,
            seed=run.seed,
        )
        print("sample (prompt from validation text, then generated):")
        print("-" * 60)
        print((decode(prompt) if decode else "") + "\u2502" + text)
        print("-" * 60)
    return 0


def _default_prompt(arr, run):
    import numpy as np

    n = min(len(arr), max(1, run.model.block_len))
    return np.asarray(arr[:n], np.int32)


def cmd_eval(args) -> int:
    import jax

    run_dir = Path(args.run_dir)
    run, ts, meta, _ = _load_run(run_dir)
    overrides = _overrides(args)
    allowed = {"eval_batches", "batch_size", "implementation", "block_len", "data"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise UsageError(f"eval: flags {bad} cannot change a trained model's settings")
    model_changes = {
        k: v for k, v in overrides.items() if k in ("implementation", "block_len")
    }
    run = run.replace(**overrides)
    model = ts.model.with_config(**model_changes) if model_changes else ts.model
    splits, _, _ = _load_data(run, split=args.split)
    stream = _stream(run, splits[args.split], train=False)
    mesh = _mesh_or_none(run.batch_size)
    t0 = time.perf_counter()
    res = _evaluate_stream(
        run,
        model,
        stream,
        mesh=mesh,
        desc=f"eval {args.split}",
        no_progress=args.no_progress,
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
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps(dict(res, split=f"eval_{args.split}"), sort_keys=True) + "\n"
        )
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    run_dir = Path(args.run_dir)
    run, ts, meta, _ = _load_run(run_dir)
    overrides = _overrides(args)
    allowed = {"sample_len", "temperature", "top_p", "seed", "data"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise UsageError(
            f"sample: flags {bad} cannot change a trained model's settings"
        )
    run = run.replace(**overrides)
    if run.data_kind == "bytes":
        decode = lambda toks: bytes(int(t) for t in toks).decode("utf-8", "replace")
        encode = lambda s: np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32)
    else:
        _, decode, encode = _load_data(run, split="validation")
    if args.prompt is not None:
        if encode is None:
            raise UsageError("--prompt needs a text dataset")
        prompt = encode(args.prompt)
        if prompt.size == 0:
            raise UsageError("--prompt must not be empty")
    else:
        prompt = (
            np.frombuffer(b"\n", np.uint8).astype(np.int32)
            if run.data_kind == "bytes"
            else np.zeros(1, np.int32)
        )
    t0 = time.perf_counter()
    out = _do_sample(
        run,
        ts.model,
        prompt,
        decode,
        steps=run.sample_len,
        temperature=run.temperature,
        top_p=run.top_p,
        seed=run.seed,
    )
    dt = time.perf_counter() - t0
    print(
        (decode(prompt) if decode else "") + (out if isinstance(out, str) else str(out))
    )
    print(
        f"[{run.sample_len} tokens in {dt:.2f} s incl. compile; step {meta['step']}]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args) -> int:
    import jax
    import numpy as np

    from .nn import Transformer
    from .sampling import sample
    from .train import init_train_state, make_train_step, optimizer_from_config
    from .train._presets import PRESETS

    run = PRESETS[args.preset].replace(**_overrides(args))
    mesh = _mesh_or_none(run.batch_size)
    optimizer = optimizer_from_config(run.optimizer_config())
    model = Transformer(run.model, key=jax.random.key(run.seed))
    ts = init_train_state(model, optimizer, run.batch_size, key=jax.random.key(1))
    if mesh is not None:
        from .train import shard_train_state

        ts = shard_train_state(ts, mesh)
    rng = np.random.default_rng(0)
    toks = rng.integers(
        0, run.model.n_vocab, (run.batch_size, run.seq_len + 1), dtype=np.int32
    )
    batch = dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=np.ones((run.batch_size, run.seq_len), np.float32),
    )
    step_fn = make_train_step(optimizer, update_len=run.update_len, mesh=mesh)
    t0 = time.perf_counter()
    ts, m = step_fn(ts, batch, reset=True)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        ts, m = step_fn(ts, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.bench_steps
    n_tok = run.batch_size * run.seq_len
    res = dict(
        preset=args.preset,
        device=str(jax.devices()[0].platform),
        devices=jax.device_count(),
        compile_s=compile_s,
        step_s=dt,
        train_tokens_per_s=n_tok / dt,
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


# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .train._presets import PRESETS

    p = _Parser(
        prog="tvq-eqx", description="Transformer-VQ: train, evaluate, sample, bench."
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a model (tqdm progress, JSONL log, PNG curves)"
    )
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    t.add_argument(
        "--run-dir",
        default=None,
        help="output folder (default runs/PRESET, or runs/PRESET-N if taken)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run's newest checkpoint"
    )
    t.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="UPDATE",
        help="stop (and checkpoint) after this many updates; --resume continues",
    )
    t.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host)",
    )
    t.add_argument("--no-progress", action="store_true")
    _add_config_flags(t)

    e = sub.add_parser("eval", help="bits per token of a trained run on a data split")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--split", choices=("validation", "test"), default="validation")
    e.add_argument("--distributed", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    _add_config_flags(e)

    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--prompt", default=None)
    s.add_argument("--distributed", action="store_true")
    _add_config_flags(s)

    b = sub.add_parser("bench", help="train-step and sampling throughput of a preset")
    b.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    b.add_argument("--bench-steps", type=int, default=5)
    b.add_argument("--sample-tokens", type=int, default=64)
    b.add_argument("--distributed", action="store_true")
    _add_config_flags(b)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m tvq_eqx` and the `tvq-eqx` script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (already reported)
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        if getattr(args, "distributed", False):
            import jax

            jax.distributed.initialize()
        cmd = dict(train=cmd_train, eval=cmd_eval, sample=cmd_sample, bench=cmd_bench)
        return cmd[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write("tvq-eqx: interrupted\n")
        return 130
    except Exception as e:
        if os.environ.get("TVQ_EQX_DEBUG") or not isinstance(e, _REPORTED):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"tvq-eqx: error: {msg}\n")
        return EXIT_ERROR

"""Depth benchmark: compile time and step time of the real train step against
the number of layers.

Builds the `tiny` preset's model (d_model 128, one head, 64 codes, block 64)
at each depth in `--depths`, with the `tiny` optimizer, batch and update
length, and measures the jitted train step (`tvq_eqx.train.train_step` under
`eqx.filter_jit`, the program `make_train_step` runs without a mesh):

- trace: `jitted.lower(...)` (Python tracing of loss, gradient, optimizer
  and the scan over update segments, then lowering to StableHLO);
- compile: `lowered.compile()` (XLA);
- step: the median wall time of `--reps` calls of the compiled step after
  one warm-up call (random tokens, no donation).

All depths run in one process, in order. The results file holds one section
per `--label` (e.g. "before" and "after" a change); running again with a
label replaces that section and keeps the others, so the tables can be read
side by side. `--remat` sets `TransformerConfig.remat` where the config has
that field.

    python -m benchmarks.depth --label after --depths 1 8 24
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import tvq_eqx
from benchmarks import _common as C
from tvq_eqx import train


def _train_state_and_batch(n_layer: int, remat: str | None, preset: str):
    run = train.PRESETS[preset]
    changes: dict = dict(n_layer=n_layer)
    if remat is not None:
        changes["remat"] = remat
    cfg = run.model.replace(**changes)
    opt = train.optimizer_from_config(run.optimizer, run.steps)
    model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
    ts = train.init_train_state(model, opt, run.data.batch_size, key=jax.random.key(1))
    toks = jax.random.randint(
        jax.random.key(2), (run.data.batch_size, run.data.seq_len + 1), 0, cfg.n_vocab
    )
    batch = dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=jnp.ones((run.data.batch_size, run.data.seq_len), jnp.float32),
    )
    return ts, batch, opt, run


def measure(n_layer: int, *, remat: str | None, reps: int, preset: str) -> dict:
    ts, batch, opt, run = _train_state_and_batch(n_layer, remat, preset)
    jitted = eqx.filter_jit(train.train_step)  # a fresh cache per depth
    # `reset` traced, as the step function passes it.
    options = dict(optimizer=opt, update_len=run.update_len, reset=jnp.asarray(False))
    t0 = time.perf_counter()
    lowered = jitted.lower(ts, batch, **options)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    times = C.time_calls(lambda: compiled(ts, batch, **options), reps=reps, warmup=1)
    _, metrics = compiled(ts, batch, **options)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"n_layer={n_layer}: non-finite loss {loss}")
    n_params = sum(
        x.size for x in jax.tree.leaves(eqx.filter(ts.model, eqx.is_inexact_array))
    )
    return dict(
        n_layer=n_layer,
        params=n_params,
        trace=t1 - t0,
        compile=t2 - t1,
        step=C.median(times),
        loss=loss,
    )


def table(rows: list[dict]) -> list[str]:
    base = rows[0]
    out = []
    for r in rows:
        total = r["trace"] + r["compile"]
        base_total = base["trace"] + base["compile"]
        out.append(
            [
                r["n_layer"],
                f"{r['params'] / 1e6:.2f}M",
                f"{r['trace']:.2f}",
                f"{r['compile']:.2f}",
                f"{total:.2f}",
                f"{total / base_total:.2f}",
                f"{r['step'] * 1e3:.0f}",
                f"{r['step'] / base['step']:.2f}",
                f"{r['loss']:.4f}",
            ]
        )
    return C.markdown_table(
        [
            "layers",
            "params",
            "trace s",
            "compile s",
            "trace+compile s",
            "x (vs first)",
            "step ms",
            "x (vs first)",
            "loss (step 1)",
        ],
        out,
    )


_SECTION = re.compile(r"^## ", re.M)


def _merge(path: Path, header: list[str], label: str, section: list[str]) -> list[str]:
    """The file's header replaced, section `label` replaced or appended."""
    sections: dict[str, str] = {}
    if path.is_file():
        parts = _SECTION.split(path.read_text())
        for part in parts[1:]:
            name = part.split("\n", 1)[0].strip()
            sections[name] = "## " + part.rstrip()
    sections[label] = "\n".join(section).rstrip()
    lines = list(header)
    for text in sections.values():
        lines += ["", text]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 8, 24])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--remat", default=None, help="TransformerConfig.remat value")
    ap.add_argument("--label", required=True, help="section name, e.g. before/after")
    ap.add_argument("--note", default="", help="one line under the section title")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    load = C.machine_info().get("load average at start (1/5/15 min)", "n/a")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for n in args.depths:
        r = measure(n, remat=args.remat, reps=args.reps, preset=args.preset)
        C.log(
            f"n_layer={n}: trace {r['trace']:.2f}s compile {r['compile']:.2f}s "
            f"step {r['step'] * 1e3:.0f}ms loss {r['loss']:.4f}"
        )
        rows.append(r)

    run = train.PRESETS[args.preset]
    out = args.out or C.RESULTS_DIR / f"depth-{C.device_tag()}.md"
    header = C.header_lines(
        "Train-step compile time and step time by depth",
        C.command_line(argv),
        notes=[
            f"Model: the `{args.preset}` preset (d_model {run.model.d_model}, "
            f"{run.model.n_head} head(s), {run.model.n_code} codes, block "
            f"{run.model.block_len}; batch {run.data.batch_size} x {run.data.seq_len} "
            f"tokens, update_len "
            f"{run.update_len}), n_layer varied; the real train step "
            "(loss, gradient, optimizer update), no donation.",
            "trace = `lower()` (tracing + StableHLO), compile = XLA "
            f"`compile()`, step = median of {args.reps} calls after a warm-up. "
            "Shared 2-core machine: timings are noisy, read the ratios.",
        ],
    )
    section = [f"## {args.label}", "", f"Started {stamp}, load average {load}.", ""]
    if args.note:
        section += [args.note, ""]
    section += table(rows)
    C.write_text(out, _merge(out, header, args.label, section))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

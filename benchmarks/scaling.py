"""Scaling benchmark: training-step time, throughput and memory against
sequence length, VQ attention vs full (quadratic) attention.

At each length T, for vq and for full, the benchmark compiles the library's
scanned train step (`tvq_eqx.train.train_step`: loss, gradients, AdamW update
with the EMA codebook routing) on one update segment of `batch x T` tokens,
reads the compiled program's memory estimate, calls it once untimed
(warm-up), then times `reps` calls (median, `block_until_ready`). Both
models are timed side by side in one run, with the same parameters: every
length and model is compiled and warmed up first, then timed in rounds (each
round calls every program once), so load drifts on a shared machine hit all
of them alike.

Memory: `compiled.memory_analysis()` of the jitted step, temp + argument +
output bytes (donated buffers counted once): XLA's static estimate of the
peak, available without running (so it is also given for lengths too long to
run). Scaling exponents: least-squares slope of log(time) against log(T).

Correctness gate, at every length, before the times are reported:

- vq: `vq_attention_xla` (what trains) equals `vq_attention_quadratic` (the
  definition) on `min(T, check_len)` tokens of random queries/keys/values with
  the model's codebook, block length and relative-bias table;
- full: `full_attention_with_state` equals the quadratic definition with
  un-quantized keys on the same slice;
- the timed train step's loss is finite.

A length where a check fails gets no ratio: its row says CHECK FAILED.
"""

from __future__ import annotations

import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import Transformer, train
from tvq_eqx.ops import (
    FullAttentionState,
    full_attention_with_state,
    vq_attention_quadratic,
    vq_attention_xla,
)

from . import _common as C
from .registry import ScalingPreset

CHECK_TOL = 1e-4  # relative error, float32 on CPU


def model_config(p: ScalingPreset, attention: str):
    return p.model.replace(attention=attention, kv_cache_len=p.model.block_len)


def op_check(model, attention: str, seq: int, *, seed: int = 0) -> tuple[bool, float]:
    """Linear-time / streaming op vs the quadratic definition on `seq` tokens,
    with the model's first unit's codebook and relative-bias table."""
    c = model.config
    unit = model.attention_units()[0]
    ks = jax.random.split(jax.random.key(seed), 4)
    b, h = 1, c.n_head
    q = jax.random.normal(ks[0], (b, seq, h, c.d_k))
    k = jax.random.normal(ks[1], (b, seq, h, c.d_k))
    v = jax.random.normal(ks[2], (b, seq, h, c.d_v))
    rq = 0.1 * jax.random.normal(ks[3], (b, seq, h, c.d_k))
    table = unit.rel_bias.table()
    scale = c.d_k**-0.5
    codebook = unit.quantizer.codebook
    if attention == "full":
        state = FullAttentionState.empty(
            b, capacity=c.kv_cache_len, heads=h, d_k=c.d_k, d_v=c.d_v
        )
        out, _ = full_attention_with_state(
            q, k, v, state, scale=scale, rel_query=rq, rel_table=table
        )
        ref = vq_attention_quadratic(
            q,
            k,
            v,
            codebook,
            scale=scale,
            rel_query=rq,
            rel_table=table,
            quantize_keys=False,
        )
    else:
        out, _ = vq_attention_xla(
            q,
            k,
            v,
            codebook,
            block_len=c.block_len,
            scale=scale,
            rel_query=rq,
            rel_table=table,
        )
        ref = vq_attention_quadratic(
            q, k, v, codebook, scale=scale, rel_query=rq, rel_table=table
        )
    err = C.rel_err(ref, out)
    return bool(np.isfinite(err)) and err <= CHECK_TOL, err


def check(model, attention: str, seq: int) -> tuple[bool, float]:
    """The correctness gate (module-level so tests can force a failure)."""
    return op_check(model, attention, seq)


def compile_step(model, batch_size: int, seq: int):
    """(compiled step, train-state arrays, batch): one update on `seq` tokens."""
    opt = train.make_optimizer(
        "adamw", learning_rate=1e-3, warmup_steps=10, total_steps=1000, grad_clip=1.0
    )
    ts = train.init_train_state(model, opt, batch_size, key=jax.random.key(1))
    dyn, static = eqx.partition(ts, eqx.is_array)

    def step(dyn, batch):
        new, metrics = train.train_step(
            eqx.combine(dyn, static), batch, optimizer=opt, update_len=seq
        )
        return eqx.partition(new, eqx.is_array)[0], metrics["loss"]

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(
        rng.integers(0, model.config.n_vocab, (batch_size, seq + 1)), jnp.int32
    )
    batch = dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        loss_mask=jnp.ones((batch_size, seq), jnp.float32),
    )
    compiled = jax.jit(step, donate_argnums=0).lower(dyn, batch).compile()
    return compiled, dyn, batch


def prepare(model, p: ScalingPreset, seq: int, run_it: bool) -> dict:
    """Compile the step, read its memory estimate and (if it is to run) make
    one untimed warm-up call."""
    t0 = time.perf_counter()
    compiled, dyn, batch = compile_step(model, p.batch_size, seq)
    out = dict(
        compile_s=time.perf_counter() - t0,
        mem=C.compiled_memory_bytes(compiled),
        times=None,
        loss=None,
    )
    if out["mem"] is not None and out["mem"] > p.mem_limit_gib * 2**30:
        out["skip"] = (
            f"memory estimate {C.fmt_bytes(out['mem'])} > {p.mem_limit_gib:g} GiB"
        )
        return out
    if not run_it:
        out["skip"] = f"not run (T > {C.fmt_len(p.full_max_len)}: too slow here)"
        return out
    state = {"dyn": dyn}

    def call():
        state["dyn"], loss = compiled(state["dyn"], batch)
        return loss

    out["loss"] = float(C.block(call()))  # warm-up
    out["call"] = call
    out["times"] = []
    return out


def timed_call(m: dict) -> None:
    t0 = time.perf_counter()
    loss = C.block(m["call"]())
    m["times"].append(time.perf_counter() - t0)
    m["loss"] = float(loss) if np.isfinite(m["loss"]) else m["loss"]


def run(p: ScalingPreset, *, out_dir: Path, tag: str, command: str) -> dict:
    rows = []
    t_start = time.perf_counter()
    for seq in p.lengths:
        row = dict(T=seq)
        for att in ("vq", "full"):
            model = Transformer(model_config(p, att), key=jax.random.key(0))
            ok, err = check(model, att, min(seq, p.check_len))
            m = prepare(model, p, seq, run_it=(att == "vq" or seq <= p.full_max_len))
            m.update(check_ok=ok, err=err)
            row[att] = m
            C.log(
                f"scaling T={seq} {att}: compiled, mem {C.fmt_bytes(m['mem'])}, "
                f"check {'pass' if ok else 'FAIL'} ({err:.1e})"
                + (f", {m['skip']}" if "skip" in m else "")
            )
        rows.append(row)
    # Timing rounds: every (length, model) once per round, so that load
    # drifts on a shared machine hit all lengths alike.
    for _ in range(p.reps):
        for row in rows:
            for att in ("vq", "full"):
                if row[att].get("call") is not None:
                    timed_call(row[att])
    for row in rows:
        for att in ("vq", "full"):
            m = row[att]
            m.pop("call", None)
            finite = m["loss"] is None or bool(np.isfinite(m["loss"]))
            m["ok"] = m.pop("check_ok") and finite
            t = C.median(m["times"]) if m["times"] else None
            C.log(
                f"scaling T={row['T']} {att}: "
                + (f"{t * 1e3:.1f} ms" if t else m.get("skip", ""))
            )
    wall = time.perf_counter() - t_start
    md = out_dir / f"scaling-{tag}.md"
    png = out_dir / f"scaling-{tag}.png"
    lines, fits = write_report(p, rows, md=md, png=png, command=command, wall=wall)
    plot(p, rows, fits, png, command)
    return dict(rows=rows, fits=fits, markdown=md, plot=png, lines=lines)


def _t(m) -> float | None:
    return C.median(m["times"]) if m.get("times") else None


def fits_of(rows) -> dict:
    """Scaling exponents: time (over each model's timed lengths, and over the
    lengths both ran) and memory."""
    out = {}
    for att in ("vq", "full"):
        ts = [(r["T"], _t(r[att])) for r in rows if _t(r[att]) is not None]
        out[f"{att}_time"] = C.fit_exponent([a for a, _ in ts], [b for _, b in ts])
        ms = [(r["T"], r[att]["mem"]) for r in rows if r[att]["mem"]]
        out[f"{att}_mem"] = C.fit_exponent([a for a, _ in ms], [b for _, b in ms])
        out[f"{att}_range"] = (ts[0][0], ts[-1][0]) if ts else None
    both = [r for r in rows if _t(r["vq"]) and _t(r["full"])]
    out["vq_time_common"] = C.fit_exponent(
        [r["T"] for r in both], [_t(r["vq"]) for r in both]
    )
    return out


def write_report(p, rows, *, md, png, command, wall):
    m = p.model
    fits = fits_of(rows)
    notes = [
        f"model: {m.n_layer} layer(s) ({2 * m.n_layer} gated attention units), d_model "
        f"{m.d_model}, d_k {m.d_k}, d_v {m.d_v}, heads {m.n_head}, codes {m.n_code}, "
        f"block_len {m.block_len}; full: KV cache {m.block_len} tokens, so its cost is "
        "the T x T causal attention of the segment",
        f"step: `tvq_eqx.train.train_step` (loss, gradients, AdamW + EMA codebook "
        f"update) on batch {p.batch_size} x T tokens, one update segment; jit, "
        "donated train state",
        f"time: median of {p.reps} calls after 1 warm-up call (compile excluded), "
        "interleaved over all lengths and both models round by round; "
        "tokens/s = batch x T / time",
        "memory: XLA's compiled estimate (`memory_analysis()`: temp + argument + "
        "output bytes) of the step, not a measured RSS",
        f"gate at each T: xla vs quadratic VQ attention (and full vs quadratic full) "
        f"on min(T, {p.check_len}) tokens, relative error <= {CHECK_TOL:g}, and a finite "
        "loss; a failed check replaces the ratio with CHECK FAILED",
        f"total wall time {wall / 60:.1f} min (compile included); shared CPU, so "
        "absolute times are noisy",
    ]
    lines = C.header_lines(f"Scaling benchmark ({C.tag_of(md)})", command, notes)
    table = []
    for r in rows:
        vq, fu = r["vq"], r["full"]
        tv, tf = _t(vq), _t(fu)
        ok = vq["ok"] and fu["ok"]
        ratio = (
            C.gated_ratio(tv, tf, ok)
            if tv and tf
            else (C.CHECK_FAILED if not ok else "n/a")
        )
        n_tok = p.batch_size * r["T"]
        table.append(
            [
                C.fmt_len(r["T"]),
                C.fmt_num(tv * 1e3 if tv else None, ".1f"),
                C.fmt_num(n_tok / tv if tv else None, ",.0f"),
                C.fmt_bytes(vq["mem"]),
                C.fmt_num(tf * 1e3, ".1f") if tf else fu.get("skip", "n/a"),
                C.fmt_num(n_tok / tf if tf else None, ",.0f"),
                C.fmt_bytes(fu["mem"]),
                ratio,
                f"{'pass' if vq['ok'] else C.CHECK_FAILED} ({vq['err']:.1e}) / "
                f"{'pass' if fu['ok'] else C.CHECK_FAILED} ({fu['err']:.1e})",
            ]
        )
    lines += ["## Train-step time and memory", ""]
    lines += C.markdown_table(
        [
            "T",
            "vq ms",
            "vq tokens/s",
            "vq memory",
            "full ms",
            "full tokens/s",
            "full memory",
            "vq/full time",
            "check vq / full (rel err)",
        ],
        table,
        "lrrrrrrrl",
    )

    def rng(key):
        r = fits[f"{key}_range"]
        return f"{C.fmt_len(r[0])}-{C.fmt_len(r[1])}" if r else "n/a"

    lines += ["", "## Fitted scaling exponents (slope of log y vs log T)", ""]
    lines += C.markdown_table(
        ["quantity", "vq", "full"],
        [
            [
                f"step time (vq over {rng('vq')}, full over {rng('full')})",
                C.fmt_num(fits["vq_time"], ".2f"),
                C.fmt_num(fits["full_time"], ".2f"),
            ],
            [
                "step time, lengths where both ran",
                C.fmt_num(fits["vq_time_common"], ".2f"),
                C.fmt_num(fits["full_time"], ".2f"),
            ],
            [
                "memory estimate (all lengths)",
                C.fmt_num(fits["vq_mem"], ".2f"),
                C.fmt_num(fits["full_mem"], ".2f"),
            ],
        ],
        "lrr",
    )
    lines += ["", f"![scaling]({png.name})", ""]
    C.write_text(md, lines)
    return lines, fits


def plot(p, rows, fits, png, command):
    fig, (ax1, ax2) = C.new_figure(2)
    for att, style in (("vq", "o-"), ("full", "s-")):
        pts = [(r["T"], _t(r[att])) for r in rows if _t(r[att])]
        if pts:
            xs, ys = zip(*pts, strict=False)
            e = fits[f"{att}_time"]
            ax1.plot(
                xs,
                [y * 1e3 for y in ys],
                style,
                label=f"{att} (slope {e:.2f})" if e is not None else att,
            )
        mem = [(r["T"], r[att]["mem"]) for r in rows if r[att]["mem"]]
        if mem:
            xs, ys = zip(*mem, strict=False)
            e = fits[f"{att}_mem"]
            ax2.plot(
                xs,
                [y / 2**20 for y in ys],
                style,
                label=f"{att} (slope {e:.2f})" if e is not None else att,
            )
    for ax, ylabel, title in (
        (ax1, "train step time (ms)", "train step time vs sequence length"),
        (ax2, "compiled memory estimate (MiB)", "memory vs sequence length"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="sequence length T (tokens)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    C.save_figure(fig, png, command)

"""Long-stream precision: bf16 against float32 over >= 1M tokens streamed in
segments, for the attention op and for a small model.

Both runs see the same inputs (bf16-exact values, so only the arithmetic
differs); each segment is one call that carries the state to the next. The
carried cache (per-code counts and value means) is float32 whatever the
activation dtype. For contrast the bf16 run is repeated with the cache mean
re-rounded to bf16 after every call, which is what the state held before
(`cache_mean` in the value dtype): the error then grows with the stream.

- op: `vq_attention_with_state` (xla), one head; values drift linearly from
  1 to 4 over the stream (plus noise), so every code's mean keeps moving,
  the hard case for a rounded mean.
- model: a one-layer `tvq_eqx.Transformer` (random init), tokens drawn from a
  16-token window of the vocabulary that slides along the stream; the model's
  log-probabilities are compared.

Errors per segment: op: elementwise |bf16 - f32| / |f32| of the outputs
(values are >= ~0.5, so the ratio is well defined), max and mean; model:
max |dlogp| and the relative error ||p16 - p32|| / ||p32|| of the
probabilities.

Run: `python -m benchmarks.long_stream` (14 min on 2 shared CPU cores at load
average 12; a few minutes on an idle machine);
`--tokens`, `--segment` to change the sizes.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import Transformer, TransformerConfig
from tvq_eqx.ops import VQAttentionState, vq_attention_with_state

from . import _common as C

RESULTS = Path(__file__).parent / "results"

# The op: one head, a small codebook so each code sees many keys.
OP = dict(heads=1, d_k=16, d_v=16, codes=64, block_len=256)
MODEL = TransformerConfig(
    n_vocab=256,
    d_model=32,
    d_k=16,
    d_v=32,
    n_head=1,
    n_code=32,
    n_layer=1,
    block_len=256,
)


def _round_cache(state):
    """The previous behaviour: the cache mean rounded to bf16 between calls."""

    def one(s):
        if not isinstance(s, VQAttentionState):
            return s
        mean = s.cache_mean.astype(jnp.bfloat16).astype(s.cache_mean.dtype)
        return eqx.tree_at(lambda x: x.cache_mean, s, mean)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, VQAttentionState))


def _bf16_exact(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def op_inputs(seg: int, segment: int, total: int, seed: int = 0):
    """Query, key, drifting value of segment `seg` (float32, bf16-exact)."""
    h, dk, dv = OP["heads"], OP["d_k"], OP["d_v"]
    ks = jax.random.split(jax.random.fold_in(jax.random.key(seed), seg), 3)
    q = jax.random.normal(ks[0], (1, segment, h, dk))
    k = jax.random.normal(ks[1], (1, segment, h, dk))
    pos = (seg * segment + jnp.arange(segment)) / total
    v = 1.0 + 3.0 * pos[None, :, None, None]
    v = v + 0.1 * jax.random.normal(ks[2], (1, segment, h, dv))
    return _bf16_exact(q), _bf16_exact(k), _bf16_exact(v)


@functools.partial(
    jax.jit, static_argnames=("segment", "total", "dtype", "round_cache")
)
def op_step(state, codebook, seg, *, segment, total, dtype, round_cache):
    q, k, v = op_inputs(seg, segment, total)
    out, state = vq_attention_with_state(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        codebook,
        state,
        block_len=OP["block_len"],
        implementation="xla",
    )
    if round_cache:
        state = _round_cache(state)
    return out.astype(jnp.float32), state


def model_tokens(seg: int, segment: int, seed: int = 0):
    """Tokens from a 16-token window of the vocabulary sliding along the stream."""
    key = jax.random.fold_in(jax.random.key(seed + 1), seg)
    start = seg * segment + np.arange(segment)
    base = (start // 4096) % MODEL.n_vocab
    offset = jax.random.randint(key, (1, segment), 0, 16)
    return ((base[None] + offset) % MODEL.n_vocab).astype(jnp.int32)


@eqx.filter_jit
def model_step(model, state, tokens, round_cache: bool):
    logp, state, _ = model(tokens, state)
    if round_cache:
        state = _round_cache(state)
    return logp.astype(jnp.float32), state


def stream_op(tokens: int, segment: int) -> list[dict]:
    n_seg = tokens // segment
    codebook = jax.random.normal(
        jax.random.key(7), (OP["heads"], OP["codes"], OP["d_k"])
    )

    def empty(dtype):
        return VQAttentionState.empty(
            1,
            mem_len=OP["block_len"],
            heads=OP["heads"],
            codes=OP["codes"],
            d_k=OP["d_k"],
            d_v=OP["d_v"],
            dtype=dtype,
        )

    runs = {
        "f32": (jnp.float32, False),
        "bf16": (jnp.bfloat16, False),
        "bf16_rounded": (jnp.bfloat16, True),
    }
    states = {name: empty(dt) for name, (dt, _) in runs.items()}
    rows = []
    for seg in range(n_seg):
        outs = {}
        for name, (dt, rnd) in runs.items():
            outs[name], states[name] = op_step(
                states[name],
                codebook,
                seg,
                segment=segment,
                total=tokens,
                dtype=dt,
                round_cache=rnd,
            )
        ref = np.asarray(outs["f32"], np.float64)
        row = dict(seg=seg, tokens=(seg + 1) * segment)
        for name in ("bf16", "bf16_rounded"):
            err = np.abs(np.asarray(outs[name], np.float64) - ref) / np.abs(ref)
            row[name] = (float(err.max()), float(err.mean()))
        row["finite"] = all(bool(np.isfinite(o).all()) for o in outs.values())
        rows.append(row)
    dtypes = {n: str(s.cache_mean.dtype) for n, s in states.items()}
    return rows, dtypes


def stream_model(tokens: int, segment: int) -> list[dict]:
    n_seg = tokens // segment
    f32 = Transformer(MODEL, key=jax.random.key(0))
    bf16 = f32.with_config(dtype="bfloat16")
    runs = {"f32": (f32, False), "bf16": (bf16, False), "bf16_rounded": (bf16, True)}
    states = {name: m.init_state(1) for name, (m, _) in runs.items()}
    rows = []
    for seg in range(n_seg):
        toks = model_tokens(seg, segment)
        outs = {}
        for name, (m, rnd) in runs.items():
            outs[name], states[name] = model_step(m, states[name], toks, rnd)
        ref = np.asarray(outs["f32"], np.float64)
        p_ref = np.exp(ref)
        row = dict(seg=seg, tokens=(seg + 1) * segment)
        for name in ("bf16", "bf16_rounded"):
            lp = np.asarray(outs[name], np.float64)
            row[name] = (
                float(np.abs(lp - ref).max()),
                float(np.linalg.norm(np.exp(lp) - p_ref) / np.linalg.norm(p_ref)),
            )
        row["finite"] = all(bool(np.isfinite(o).all()) for o in outs.values())
        rows.append(row)
    dtypes = {
        n: str(s.stacked[0].cache_mean.dtype)  # type: ignore[attr-defined]
        for n, s in states.items()
    }
    return rows, dtypes


def _shown(rows, n_show: int = 8):
    """About `n_show` evenly spaced segments, always the first and the last."""
    step = max(1, len(rows) // n_show)
    idx = sorted(set(range(0, len(rows), step)) | {len(rows) - 1})
    return [rows[i] for i in idx]


def write_report(op_rows, op_dtypes, model_rows, model_dtypes, *, md, command, wall):
    notes = [
        f"op: `vq_attention_with_state` (xla), batch 1, heads {OP['heads']}, d_k "
        f"{OP['d_k']}, d_v {OP['d_v']}, {OP['codes']} codes, block_len "
        f"{OP['block_len']}; values drift from 1 to 4 over the stream",
        f"model: 1-layer Transformer, d_model {MODEL.d_model}, d_k {MODEL.d_k}, d_v "
        f"{MODEL.d_v}, {MODEL.n_code} codes, block_len {MODEL.block_len}, random "
        "init; tokens from a sliding 16-token window of the vocabulary",
        "same bf16-exact inputs for every run; one call per segment, state carried",
        f"cache-state dtype after the stream: op {op_dtypes['bf16']} (bf16 run), "
        f"model {model_dtypes['bf16']} (bf16 run); the `bf16, cache rounded` "
        "columns re-round the cache mean to bf16 after every call (the previous "
        "behaviour), for contrast",
        f"total wall time {wall / 60:.1f} min",
    ]
    lines = C.header_lines("Long-stream bf16 vs float32", command, notes)
    op_last, m_last = op_rows[-1], model_rows[-1]
    op_worst = max(r["bf16"][0] for r in op_rows)
    m_worst = max(r["bf16"][1] for r in model_rows)
    lines += [
        "## Summary",
        "",
        f"- op, {op_last['tokens']:,} tokens: bf16 vs float32 relative error of "
        f"the output, last segment max **{op_last['bf16'][0]:.2e}**, mean "
        f"**{op_last['bf16'][1]:.2e}** (worst segment max {op_worst:.2e}); with "
        f"the cache rounded to bf16 per call: max {op_last['bf16_rounded'][0]:.2e}, "
        f"mean {op_last['bf16_rounded'][1]:.2e}",
        f"- model, {m_last['tokens']:,} tokens: last segment max |dlogp| "
        f"**{m_last['bf16'][0]:.2e}**, probability relative error "
        f"**{m_last['bf16'][1]:.2e}** (worst segment {m_worst:.2e}); with the "
        f"cache rounded per call: {m_last['bf16_rounded'][0]:.2e} / "
        f"{m_last['bf16_rounded'][1]:.2e}",
        "- all outputs finite: "
        + ("yes" if all(r["finite"] for r in op_rows + model_rows) else "NO"),
        "",
        "## Op output, relative error bf16 vs float32",
        "",
    ]
    lines += C.markdown_table(
        ["tokens", "max", "mean", "max (cache rounded)", "mean (cache rounded)"],
        [
            [
                f"{r['tokens']:,}",
                f"{r['bf16'][0]:.2e}",
                f"{r['bf16'][1]:.2e}",
                f"{r['bf16_rounded'][0]:.2e}",
                f"{r['bf16_rounded'][1]:.2e}",
            ]
            for r in _shown(op_rows)
        ],
    )
    lines += ["", "## Model log-probabilities, bf16 vs float32", ""]
    lines += C.markdown_table(
        [
            "tokens",
            "max abs dlogp",
            "prob rel err",
            "max abs dlogp (cache rounded)",
            "prob rel err (cache rounded)",
        ],
        [
            [
                f"{r['tokens']:,}",
                f"{r['bf16'][0]:.2e}",
                f"{r['bf16'][1]:.2e}",
                f"{r['bf16_rounded'][0]:.2e}",
                f"{r['bf16_rounded'][1]:.2e}",
            ]
            for r in _shown(model_rows)
        ],
    )
    C.write_text(md, lines)
    return lines


def run(tokens: int, segment: int, *, out: Path, command: str) -> dict:
    if tokens < segment or tokens % segment:
        raise ValueError(
            f"--tokens ({tokens}) must be a positive multiple of --segment ({segment})"
        )
    if segment % OP["block_len"] or segment % MODEL.block_len:
        raise ValueError(f"--segment ({segment}) must be a multiple of 256")
    t0 = time.perf_counter()
    op_rows, op_dtypes = stream_op(tokens, segment)
    C.log(f"op: {tokens} tokens in {time.perf_counter() - t0:.0f}s")
    model_rows, model_dtypes = stream_model(tokens, segment)
    wall = time.perf_counter() - t0
    C.log(f"model done; total {wall:.0f}s")
    lines = write_report(
        op_rows, op_dtypes, model_rows, model_dtypes, md=out, command=command, wall=wall
    )
    return dict(
        op=op_rows,
        model=model_rows,
        op_dtypes=op_dtypes,
        model_dtypes=model_dtypes,
        markdown=out,
        lines=lines,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--segment", type=int, default=1 << 14)
    ap.add_argument("--out", type=Path, default=RESULTS / "long-stream-cpu.md")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks.long_stream", *map(shlex.quote, argv)])
    res = run(args.tokens, args.segment, out=args.out, command=command)
    print("\n".join(res["lines"]))


if __name__ == "__main__":
    main()

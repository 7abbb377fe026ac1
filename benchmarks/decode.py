"""Decode benchmark: per-token sampling latency against context length,
VQ attention (constant-size carried state) vs full attention (KV cache).

Per token, the scheme is `tvq_eqx.sampling`'s: the model's state holds every
*completed* block; each new token re-runs the current, partly filled block
(`block_len` tokens, padded) from that state, reads the log-probabilities at
the last known position, draws a token (`sample_token`, temperature 1), and
when the block is full keeps that call's new state: `sampling.decode_step`,
the same function `sample` scans. The vq state is a fixed
size (previous block + per-code cache); the full model's KV cache holds the
whole context (`kv_cache_len` = context length), so its per-token work grows
with the context.

At each context length N the context (random tokens) is fed into the state in
chunks of `fill_chunk` tokens; then one jitted `lax.scan` decodes `block_len`
tokens (one whole block, including the state update at its end) from that
state. Latency per token = median over `reps` timed calls (after one warm-up
call; compile excluded) / `block_len`. All contexts are prepared first, then
timed in rounds (each round calls every context and model once), so that load
drifts on a shared machine affect every length alike.

Correctness gate (per model, at a short context `check_context`): greedy
decoding with the carried state must give the same log-probabilities as one
teacher-forced forward pass over context + generated tokens (max |dlogp| <=
1e-4), and every timed call's log-probabilities must be finite. A model that
fails gets CHECK FAILED in place of its ratios.

Time to first token (`run_ttft`, `python -m benchmarks.run ttft`): the
prefill of `tvq_eqx.sampling` (the prompt's complete blocks in one model
call, or in chunks of `prefill_chunk` tokens per call) against the
block-by-block loop it replaced, timed side by side at each prompt length,
gated by the first token's log-probabilities against one teacher-forced
forward pass.
"""

from __future__ import annotations

import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import Transformer, sampling
from tvq_eqx.sampling import DecodeCarry, decode_step

from . import _common as C
from .registry import DecodePreset

CHECK_TOL = 1e-4


def model_config(p: DecodePreset, attention: str, context: int):
    # The full model's cache holds the whole context and the block being decoded.
    return p.model.replace(
        attention=attention, kv_cache_len=context + p.model.block_len
    )


@eqx.filter_jit
def fill(model, state, chunk):
    """Feed `chunk` [B, n * block_len] into the state."""
    _, state, _ = model(chunk, state)
    return state


@eqx.filter_jit
def decode(model, state, buf, idx, key, temperature):
    """Decode `block_len` tokens from (state, partial block `buf`, last known
    position `idx`) with `tvq_eqx.sampling.decode_step`, the step `sample`
    scans. Returns the final carry, the tokens [n, B] and the
    log-probabilities used [n, B, V]."""

    def body(carry, k):
        carry, tok, lp = decode_step(model, carry, k, temperature=temperature)
        return carry, (tok, lp)

    carry, (toks, lps) = jax.lax.scan(
        body,
        DecodeCarry(state, buf, idx),
        jax.random.split(key, model.config.block_len),
    )
    return carry, toks, lps


def build_context(model, tokens, chunk: int):
    """State after feeding `tokens` [B, N] in chunks of `chunk` tokens."""
    b, n = tokens.shape
    state = model.init_state(b)
    for s in range(0, n, chunk):
        state = fill(model, state, tokens[:, s : s + chunk])
    return state


def _start(model, tokens, first, chunk):
    """Context state and the partial block holding one known token."""
    b = tokens.shape[0]
    state = build_context(model, tokens, chunk)
    buf = jnp.zeros((b, model.config.block_len), jnp.int32).at[:, 0].set(first)
    return state, buf, jnp.int32(0)


@eqx.filter_jit
def _forward(model, tokens):
    return model(tokens, model.init_state(tokens.shape[0]))[0]


def exactness_check(
    model, context: int, chunk: int, *, seed: int = 0
) -> tuple[bool, float]:
    """Greedy decode with the carried state vs one forward pass over the text."""
    big_l = model.config.block_len
    rng = np.random.default_rng(seed)
    b = 1
    ctx = jnp.asarray(rng.integers(0, model.config.n_vocab, (b, context)), jnp.int32)
    first = jnp.asarray(rng.integers(0, model.config.n_vocab, (b,)), jnp.int32)
    state, buf, idx = _start(model, ctx, first, min(chunk, context))
    _, toks, lps = decode(model, state, buf, idx, jax.random.key(0), jnp.float32(0.0))
    text = jnp.concatenate(
        [ctx, first[:, None], jnp.swapaxes(toks, 0, 1)[:, :-1]], axis=1
    )
    ref = _forward(model, text)[:, context : context + big_l]  # [B, n, V]
    err = float(jnp.max(jnp.abs(ref - jnp.swapaxes(lps, 0, 1))))
    return bool(np.isfinite(err)) and err <= CHECK_TOL, err


def check(model, context: int, chunk: int) -> tuple[bool, float]:
    """The correctness gate (module-level so tests can force a failure)."""
    return exactness_check(model, context, chunk)


def prepare(model, p: DecodePreset, context: int, *, seed: int = 1) -> dict:
    """Feed a random context of `context` tokens; returns the decode inputs."""
    rng = np.random.default_rng(seed)
    b = p.batch_size
    ctx = jnp.asarray(rng.integers(0, model.config.n_vocab, (b, context)), jnp.int32)
    first = jnp.asarray(rng.integers(0, model.config.n_vocab, (b,)), jnp.int32)
    t0 = time.perf_counter()
    state, buf, idx = _start(model, ctx, first, min(p.fill_chunk, context))
    C.block(state)
    fill_s = time.perf_counter() - t0
    job = dict(
        model=model,
        args=(state, buf, idx, jax.random.key(seed), jnp.float32(1.0)),
        fill_s=fill_s,
        times=[],
        finite=True,
    )
    C.block(decode(model, *job["args"]))  # compile + warm-up, untimed
    return job


def timed_call(job) -> None:
    """One timed decode of a block from the prepared state."""
    t0 = time.perf_counter()
    _, toks, lps = C.block(decode(job["model"], *job["args"]))
    job["times"].append(time.perf_counter() - t0)
    job["finite"] = job["finite"] and bool(jnp.all(jnp.isfinite(lps)))


def run(p: DecodePreset, *, out_dir: Path, tag: str, command: str) -> dict:
    t_start = time.perf_counter()
    gates = {}
    for att in ("vq", "full"):
        cfg = model_config(p, att, p.check_context)
        model = Transformer(cfg, key=jax.random.key(0))
        gates[att] = check(model, p.check_context, p.fill_chunk)
        C.log(
            f"decode gate {att}: {'pass' if gates[att][0] else 'FAIL'} ({gates[att][1]:.1e})"
        )
    jobs = {}
    for n in p.contexts:
        for att in ("vq", "full"):
            model = Transformer(model_config(p, att, n), key=jax.random.key(0))
            jobs[n, att] = prepare(model, p, n)
            C.log(f"decode N={n} {att}: context fed in {jobs[n, att]['fill_s']:.1f}s")
    # Timing rounds: every (context, model) once per round, so that load
    # drifts on a shared machine hit all of them alike.
    for _r in range(p.reps):
        for job in jobs.values():
            timed_call(job)
    n_blk = p.model.block_len
    rows = []
    for n in p.contexts:
        row = dict(N=n)
        for att in ("vq", "full"):
            job = jobs[n, att]
            row[att] = dict(
                per_token=C.median(job["times"]) / n_blk,
                times=job["times"],
                finite=job["finite"],
                fill_s=job["fill_s"],
                ok=gates[att][0] and job["finite"],
            )
            C.log(f"decode N={n} {att}: {row[att]['per_token'] * 1e3:.3f} ms/token")
        rows.append(row)
    wall = time.perf_counter() - t_start
    md = out_dir / f"decode-{tag}.md"
    png = out_dir / f"decode-{tag}.png"
    lines, fits = write_report(
        p, rows, gates, md=md, png=png, command=command, wall=wall
    )
    plot(p, rows, fits, png, command)
    return dict(rows=rows, gates=gates, fits=fits, markdown=md, plot=png, lines=lines)


def write_report(p, rows, gates, *, md, png, command, wall):
    m = p.model
    fits = {
        att: C.fit_exponent([r["N"] for r in rows], [r[att]["per_token"] for r in rows])
        for att in ("vq", "full")
    }
    first = rows[0]
    notes = [
        f"model: {m.n_layer} layer(s) ({2 * m.n_layer} gated attention units), d_model "
        f"{m.d_model}, d_k {m.d_k}, d_v {m.d_v}, heads {m.n_head}, codes {m.n_code}, "
        f"decode block_len {m.block_len}; full: KV cache = context + one block",
        f"per token: one model call on the current block ({m.block_len} tokens) from the "
        "carried state + `sample_token`, as `tvq_eqx.sampling`; batch "
        f"{p.batch_size}",
        f"latency: median of {p.reps} calls (each decodes one block of {m.block_len} "
        "tokens, state update included) after 1 warm-up call, divided by "
        f"{m.block_len}; context fed in chunks of {p.fill_chunk} tokens before timing; "
        "calls interleaved over all contexts and both models, round by round",
        f"gate: greedy decode with the carried state == one forward pass at context "
        f"{p.check_context} (max |dlogp| <= {CHECK_TOL:g}): vq "
        f"{'pass' if gates['vq'][0] else C.CHECK_FAILED} ({gates['vq'][1]:.1e}), full "
        f"{'pass' if gates['full'][0] else C.CHECK_FAILED} ({gates['full'][1]:.1e}); "
        "plus finite log-probabilities at every context",
        f"total wall time {wall / 60:.1f} min; shared CPU, so absolute times are noisy",
    ]
    lines = C.header_lines(f"Decode benchmark ({C.tag_of(md)})", command, notes)
    table = []
    for r in rows:
        v, f = r["vq"], r["full"]
        table.append(
            [
                C.fmt_len(r["N"]),
                f"{v['per_token'] * 1e3:.3f}",
                f"{f['per_token'] * 1e3:.3f}",
                C.gated_ratio(
                    f["per_token"], v["per_token"], v["ok"] and f["ok"], "{:.2f}x"
                ),
                C.gated_ratio(
                    v["per_token"],
                    first["vq"]["per_token"],
                    v["ok"] and first["vq"]["ok"],
                    "{:.3f}",
                ),
                C.gated_ratio(
                    f["per_token"],
                    first["full"]["per_token"],
                    f["ok"] and first["full"]["ok"],
                    "{:.3f}",
                ),
                f"{'pass' if v['ok'] else C.CHECK_FAILED} / {'pass' if f['ok'] else C.CHECK_FAILED}",
            ]
        )
    n0 = C.fmt_len(first["N"])
    lines += ["## Per-token latency", ""]
    lines += C.markdown_table(
        [
            "context",
            "vq ms/token",
            "full ms/token",
            "full/vq",
            f"vq / vq@{n0}",
            f"full / full@{n0}",
            "check vq / full",
        ],
        table,
        "lrrrrrl",
    )
    last = rows[-1]
    ratio = C.gated_ratio(
        last["vq"]["per_token"],
        first["vq"]["per_token"],
        last["vq"]["ok"] and first["vq"]["ok"],
        "{:.3f}",
    )
    met = "n/a"
    if ratio != C.CHECK_FAILED:
        met = "yes" if float(ratio) <= 1.1 else "no"
    lines += [
        "",
        f"- vq latency at {C.fmt_len(last['N'])} / at {n0}: **{ratio}** "
        f"(target <= 1.1: {met}); full: "
        + C.gated_ratio(
            last["full"]["per_token"],
            first["full"]["per_token"],
            last["full"]["ok"] and first["full"]["ok"],
            "{:.2f}",
        ),
        f"- fitted exponent of latency vs context: vq {C.fmt_num(fits['vq'], '.3f')}, "
        f"full {C.fmt_num(fits['full'], '.3f')}",
        "",
        f"![decode]({png.name})",
        "",
    ]
    C.write_text(md, lines)
    return lines, fits


def plot(p, rows, fits, png, command):
    fig, (ax,) = C.new_figure(1, width=6.5)
    for att, style in (("vq", "o-"), ("full", "s-")):
        xs = [r["N"] for r in rows]
        ys = [r[att]["per_token"] * 1e3 for r in rows]
        e = fits[att]
        ax.plot(xs, ys, style, label=f"{att} (slope {e:.2f})" if e is not None else att)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(
        xlabel="context length (tokens)",
        ylabel="latency per token (ms)",
        title="sampling latency vs context",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    C.save_figure(fig, png, command)


# ---------------------------------------------------------------------------
# Time to first token: one-call prefill (after) vs block by block (before)

# The prefills of `tvq_eqx.sampling._start`, by name: the earlier one model
# call per block (kept as `_prefill_blocks`, attention "full" still uses it),
# the one call over the whole bucket (`prefill_chunk=None`), and the bucket
# in chunks of `prefill_chunk` tokens, one call each.
BLOCKS, ONE_CALL = "blocks", "one call"


def ttft_paths(p) -> dict[str, dict]:
    """`sampling._start`'s keyword arguments for each path timed."""
    paths: dict[str, dict] = {
        BLOCKS: dict(prefill=sampling._prefill_blocks),
        ONE_CALL: dict(prefill_chunk=None),
    }
    for c in p.chunks:
        paths[f"chunk {c}"] = dict(prefill_chunk=c)
    return paths


def ttft_prompt(model, n: int, batch: int, seed: int):
    """`batch` random prompts of `n` tokens: rows and lengths as `sample`
    checks them."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, model.config.n_vocab, (batch, n)).astype(np.int32)
    return rows, np.full(batch, n, np.int64)


def first_token(model, rows, lengths, path: dict, key):
    """What `sample(model, prompt, steps=1, key=key, temperature=0)` runs,
    with the given prefill (`ttft_paths`): the prompt read into the carry,
    then one decode chunk of one token (the buffer size `sample` uses)."""
    carry = sampling._start(model, rows, lengths, **path)
    _, out = sampling._decode_chunk(
        model, carry, key, jnp.uint32(0), jnp.int32(1),
        jnp.float32(0.0), jnp.float32(1.0), jnp.int32(0), 16,
    )  # fmt: skip
    return out


@eqx.filter_jit
def _greedy_step(model, carry):
    return decode_step(model, carry, jax.random.key(0), temperature=0.0)[2]


def ttft_exactness(
    model, n: int, paths: dict[str, dict], *, seed: int = 0
) -> tuple[bool, float]:
    """The first token's log-probabilities after each prefill vs one
    teacher-forced forward pass over the prompt (max |dlogp|)."""
    big_l = model.config.block_len
    rows, lengths = ttft_prompt(model, n, 1, seed)
    text = np.zeros((1, -(-n // big_l) * big_l), np.int32)
    text[:, :n] = rows
    ref = _forward(model, jnp.asarray(text))[:, n - 1]
    err = 0.0
    for path in paths.values():
        carry = sampling._start(model, rows, lengths, **path)
        err = max(err, float(jnp.max(jnp.abs(_greedy_step(model, carry) - ref))))
    return bool(np.isfinite(err)) and err <= CHECK_TOL, err


def ttft_check(model, n: int, paths: dict[str, dict]) -> tuple[bool, float]:
    """The TTFT gate (module-level so tests can force a failure)."""
    return ttft_exactness(model, n, paths)


def run_ttft(p, *, out_dir: Path, tag: str, command: str) -> dict:
    """Time to first token at each prompt length for each prefill
    (`ttft_paths`: block by block, one call, chunks of `p.chunks` tokens),
    side by side: every (length, path) is compiled and called once untimed,
    then timed once per round over `p.reps` interleaved rounds; median per
    (length, path)."""
    t_start = time.perf_counter()
    model = Transformer(p.model, key=jax.random.key(0))
    paths = ttft_paths(p)
    gate = ttft_check(model, p.check_prompt, paths)
    C.log(f"ttft gate: {'pass' if gate[0] else 'FAIL'} ({gate[1]:.1e})")
    key = jax.random.key(1)
    jobs = {}
    for n in p.prompts:
        rows, lengths = ttft_prompt(model, n, p.batch_size, seed=n)
        for path, kwargs in paths.items():
            job: dict = dict(args=(model, rows, lengths, kwargs, key), times=[])
            job["tokens"] = np.asarray(C.block(first_token(*job["args"])))  # compile
            jobs[n, path] = job
            C.log(f"ttft N={n} {path}: compiled")
    for _r in range(p.reps):
        for job in jobs.values():
            t0 = time.perf_counter()
            C.block(first_token(*job["args"]))
            job["times"].append(time.perf_counter() - t0)
    rows_out = []
    for n in p.prompts:
        first = jobs[n, ONE_CALL]["tokens"]
        same = all(np.array_equal(jobs[n, q]["tokens"], first) for q in paths)
        times = {q: C.median(jobs[n, q]["times"]) for q in paths}
        rows_out.append(dict(N=n, times=times, same_tokens=same, ok=gate[0] and same))
        C.log(f"ttft N={n}: " + ", ".join(f"{q} {t:.3f}s" for q, t in times.items()))
    wall = time.perf_counter() - t_start
    md = out_dir / f"decode-ttft-{tag}.md"
    png = out_dir / f"decode-ttft-{tag}.png"
    lines = write_ttft_report(
        p, rows_out, gate, md=md, png=png, command=command, wall=wall
    )
    plot_ttft(rows_out, list(paths), png, command)
    return dict(rows=rows_out, gate=gate, markdown=md, plot=png, lines=lines)


def write_ttft_report(p, rows, gate, *, md, png, command, wall):
    m = p.model
    paths = list(rows[0]["times"])
    others = [q for q in paths if q != ONE_CALL]
    notes = [
        f"model: {m.n_layer} layer(s) ({2 * m.n_layer} gated attention units), d_model "
        f"{m.d_model}, d_k {m.d_k}, d_v {m.d_v}, heads {m.n_head}, codes {m.n_code}, "
        f"block_len {m.block_len}, attention {m.attention}; batch {p.batch_size}",
        "time to first token: `sample(model, prompt, steps=1, temperature=0)`'s "
        "work with each prefill (`sampling._start`, then one decode chunk of one "
        "token), from host prompt to the token on the host; blocks = "
        "`sampling._prefill_blocks` (one model call per complete prompt block, a "
        "loop: the prefill before the one call), one call = `prefill_chunk=None` "
        "(`sampling._prefill`: one model call over the bucket of complete blocks, "
        "padding masked as another document), chunk C = `prefill_chunk=C` "
        "(`sampling._prefill_chunks`: the bucket in chunks of C tokens, one model "
        "call each, looped in one compiled program; a chunk at least the bucket "
        "is the one call)",
        f"median of {p.reps} calls per (length, path) after 1 untimed call "
        "(compile); calls interleaved over all lengths and paths, round by round",
        f"gate: the first token's log-probabilities after every prefill == one "
        f"teacher-forced forward pass over a {p.check_prompt}-token prompt (max "
        f"|dlogp| <= {CHECK_TOL:g}): {'pass' if gate[0] else C.CHECK_FAILED} "
        f"({gate[1]:.1e}); and every path draws the same first token at every length",
        f"total wall time {wall / 60:.1f} min; shared CPU, so absolute times are noisy",
    ]
    lines = C.header_lines(f"Time to first token ({C.tag_of(md)})", command, notes)
    table = [
        [C.fmt_len(r["N"] - 1) + " + 1" if r["N"] > 1024 else str(r["N"])]
        + [f"{r['times'][q] * 1e3:.1f}" for q in paths]
        + [
            C.gated_ratio(r["times"][ONE_CALL], r["times"][q], r["ok"], "{:.2f}x")
            for q in others
        ]
        + ["pass" if r["ok"] else C.CHECK_FAILED]
        for r in rows
    ]
    lines += [
        "## Time to first token",
        "",
        f"ms per path; `{ONE_CALL} / X`: how many times faster X is than the one "
        "call (> 1 = X faster).",
        "",
    ]
    lines += C.markdown_table(
        ["prompt tokens"]
        + [f"{q} ms" for q in paths]
        + [f"{ONE_CALL} / {q}" for q in others]
        + ["check"],
        table,
        "l" + "r" * (len(paths) + len(others)) + "l",
    )
    lines += ["", f"![ttft]({png.name})", ""]
    C.write_text(md, lines)
    return lines


def plot_ttft(rows, paths, png, command):
    fig, (ax,) = C.new_figure(1, width=6.5)
    xs = [r["N"] for r in rows]
    styles = ["s-", "o-", "^--", "v--", "d--", "x--"]
    for i, path in enumerate(paths):
        ys = [r["times"][path] * 1e3 for r in rows]
        ax.plot(xs, ys, styles[i % len(styles)], label=path)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(
        xlabel="prompt length (tokens)",
        ylabel="time to first token (ms)",
        title="prefill: block by block, one call, chunks of C tokens",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    C.save_figure(fig, png, command)

"""Every part of the pallas path timed alone, beside fair baselines, in one run.

Parts (each jitted and timed on its own, on exactly the operands the op
passes it; `pallas_kernels.vq_attention.ops.prepare_operands` and the kernel
stage functions):

- `prologue` the XLA work before the kernels (quantization, straight-through
             keys, block sums and their prefix over blocks, the relative-bias
             gather, the kernel layout): `tvq_eqx.ops.pallas_kernel_inputs`;
- `fwd`      the forward kernel (out and log-sum-exp);
- `dq`       the query-side backward kernel (recomputes P and dS; dq, P, dS);
- `dk`, `dv` the key-side backward kernels (window keys and values);
- `dmean`    d(cached mean) of every block (the cache path);
- `epilogue` the output layout and the next state;
- `fwd+bwd`  the whole op, forward and backward (dk included).

Useful FLOPs (multiply-adds count 2; per batch row and head, T queries, each
attending W = S + 1.5 L keys on average: S codes, the previous block, half
its own): fwd 2 T W (K + V); dq 2 T W (2K + V) (scores recomputed, dP, dq);
dk 2 T (1.5 L) K; dv 2 T (1.5 L) V; dmean 2 T S V; prologue 2 T S (K + V)
(distances to the codes, block sums). Bytes: every operand read once and
every result written once (a lower bound on HBM traffic). TFLOP/s and GB/s
are against the card's dense bf16 peak and HBM bandwidth where known.

Baselines, on the same card in the same run (fwd+bwd with gradients to q,
k, v): `xla` the linear-time jnp form; `cudnn` `jax.nn.dot_product_attention`
(implementation "cudnn", causal, on the quantized keys) in d_v / d_k calls
of head width d_k, as benchmarks/kernels.py has always run it (each call
recomputes Q K^T: (2 d_v) / (d_k + d_v) = 1.85x the FLOPs of one dense call
at the official shape), with its FLOP-normalised line (time x
(d_k + d_v) / (2 d_v)); `dense` one causal softmax attention call at the full
d_v in XLA (materialises T x T; skipped where it would not fit); `tokamax`
flash attention if the package is installed (skipped otherwise).

With `--profile` the fwd+bwd of the pallas path runs under `jax.profiler` at
each length in `--profile-seq-lens` and the device ops are summed by name
(time per call).

Usage (GPU: bash benchmarks/gpu_check.sh runs it; CPU: --micro, a smoke
run in interpret mode):

    python benchmarks/kernel_parts.py --seq-lens 8192,32768,131072 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import gzip
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp

from benchmarks._common import (
    CHECK_FAILED,
    RESULTS_DIR,
    command_line,
    device_tag,
    fmt_len,
    header_lines,
    log,
    markdown_table,
    median,
    quantized_keys,
    rel_err,
    time_calls,
    write_text,
)

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated")

# (B, H, d_k, d_v, codes, block_len)
OFFICIAL = (1, 1, 128, 1536, 512, 512)
MICRO = (1, 2, 16, 32, 16, 16)
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) and HBM bandwidth (GB/s).
PEAKS = {
    "H100": (989.0, 3350.0),
    "H200": (989.0, 4800.0),
    "A100": (312.0, 2039.0),
}


def card_peaks(kind: str) -> tuple[float | None, float | None]:
    for name, peaks in PEAKS.items():
        if name in kind:
            return peaks
    return None, None


def useful_flops(part: str, *, b, h, t, k, v, s, blk) -> float:
    rows = b * h * t
    w = s + 1.5 * blk
    per_row = {
        "prologue": 2 * s * (k + v),
        "prologue without cache means": 2 * s * k,
        "cache means, XLA passes": 2 * s * v,
        "cache means, prefix kernel": 2 * s * v,
        "fwd": 2 * w * (k + v),
        "dq": 2 * w * (2 * k + v),
        "dk": 2 * 1.5 * blk * k,
        "dv": 2 * 1.5 * blk * v,
        "dmean": 2 * s * v,
        "epilogue": 0.0,
        "prologue, prefix kernel": 2 * s * (k + v),
        "fwd+bwd, prefix kernel": 0.0,
    }
    if part.startswith("fwd+bwd"):
        return rows * sum(per_row[p] for p in ("fwd", "dq", "dk", "dv", "dmean"))
    return rows * per_row[part]


def nbytes(*trees) -> int:
    leaves = jax.tree.leaves(trees)
    return sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x, "dtype"))


def _inputs(t, dims, dtype, key):
    b, h, k, v, s, blk = dims
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (b, t, h, k), dtype)
    kk = jax.random.normal(ks[1], (b, t, h, k), dtype)
    vv = jax.random.normal(ks[2], (b, t, h, v), dtype)
    cb = jax.random.normal(ks[3], (h, s, k), jnp.float32)
    rq = (0.3 * jax.random.normal(ks[4], (b, t, h, k))).astype(dtype)
    rt = jax.random.normal(ks[5], (blk + 1, h, k), dtype)
    cot = jax.random.normal(ks[6], (b, t, h, v), dtype)
    return q, kk, vv, cb, rq, rt, cot


def _timed(fn, *args, reps, min_time):
    """Median seconds per call; repeats until `min_time` is covered."""
    first = time_calls(lambda: fn(*args), reps=1, warmup=1)[0]
    n = max(reps, min(50, math.ceil(min_time / max(first, 1e-6))))
    return median(time_calls(lambda: fn(*args), reps=n, warmup=0))


def _static(blk, k):
    return dict(
        block_len=blk,
        scale=k**-0.5,
        use_cache=True,
        cache_grad=True,
        sliding_window=False,
        state_keys="codewords",
    )


def _prologue(config, blk: int, k: int):
    """The pallas path's XLA prologue alone, for kernel settings `config`:
    `(q, k, v, codebook, rel_query, rel_table) -> (prologue, kernel args)`."""
    from tvq_eqx.ops import pallas_kernel_inputs

    static = _static(blk, k)

    def prologue(q, kk, vv, cb, rq, rt):
        pro, core_args, _ = pallas_kernel_inputs(
            q, kk, vv, cb, rel_query=rq, rel_table=rt, pallas=config, **static
        )
        return pro, core_args

    return prologue


def _epilogue(b: int, h: int, t: int, v: int, dtype):
    """The output layout and the next state, from the kernel output."""
    from tvq_eqx.ops import pallas_kernel_outputs

    def epilogue(out, pro):
        # The forward kernel's [B, H, T, V padded] as the op's [B*H, T, ...].
        out = out.reshape(b * h, t, -1)
        return pallas_kernel_outputs(
            out, pro, num_heads=h, d_v=v, dtype=dtype, cache_grad=True
        )

    return epilogue


def measure_parts(t, dims, dtype, *, pallas_config, reps, min_time):
    """Rows (part, seconds, flops, bytes) for one sequence length."""
    from pallas_kernels.vq_attention import ops as kops
    from tvq_eqx.ops import pallas_kernel_inputs, vq_attention_pallas

    b, h, k, v, s, blk = dims
    q, kk, vv, cb, rq, rt, cot = _inputs(t, dims, dtype, jax.random.key(t))
    static = _static(blk, k)

    prologue_jit = jax.jit(_prologue(pallas_config, blk, k))
    pro, core_args = prologue_jit(q, kk, vv, cb, rq, rt)
    # The kernels' static settings (ints, flags, tiles): from one eager call.
    _, _, core_kwargs = pallas_kernel_inputs(
        q, kk, vv, cb, rel_query=rq, rel_table=rt, pallas=pallas_config, **static
    )
    st, ops = kops.prepare_operands(*core_args, **core_kwargs)
    rows = []

    def add(part, seconds, inputs, outputs):
        flops = useful_flops(part, b=b, h=h, t=t, k=k, v=v, s=s, blk=blk)
        rows.append((part, seconds, flops, nbytes(inputs) + nbytes(outputs)))

    sec = _timed(prologue_jit, q, kk, vv, cb, rq, rt, reps=reps, min_time=min_time)
    add("prologue", sec, (q, kk, vv, cb, rq, rt), (pro, core_args))
    kernel_config = dataclasses.replace(pallas_config, cache_prefix="kernel")

    prologue_kernel = jax.jit(_prologue(kernel_config, blk, k))
    sec = _timed(prologue_kernel, q, kk, vv, cb, rq, rt, reps=reps, min_time=min_time)
    add(
        "prologue, prefix kernel", sec, (q, kk, vv, cb, rq, rt),
        prologue_kernel(q, kk, vv, cb, rq, rt),
    )  # fmt: skip

    fwd = jax.jit(lambda o: kops.forward_kernel(st, o))
    out, lse = fwd(ops)
    add("fwd", _timed(fwd, ops, reps=reps, min_time=min_time), ops, (out, lse))

    # The output's cotangent in kernel layout ([B, H, T, V], d_v padded): the
    # same one the whole op's backward gets below, so the stages' dq can be
    # checked against the op's.
    dout = jnp.transpose(cot, (0, 2, 1, 3)).astype(out.dtype)
    dout = jnp.pad(dout, [(0, 0)] * 3 + [(0, out.shape[-1] - v)])
    delta = jnp.sum(
        out.astype(jnp.float32) * dout.astype(jnp.float32), -1, keepdims=True
    )
    ds = jax.jit(lambda o, d, l, dl: kops.ds_kernel(st, o, d, l, dl))
    ds_out = ds(ops, dout, lse, delta)
    dq, p_win, ds_win, p_code, _ = ds_out
    sec = _timed(ds, ops, dout, lse, delta, reps=reps, min_time=min_time)
    add("dq", sec, (ops, dout, lse, delta), ds_out)

    dk = jax.jit(lambda o, x: kops.dk_kernel(st, o, x))
    sec = _timed(dk, ops, ds_win, reps=reps, min_time=min_time)
    add("dk", sec, (ds_win, ops.q, ops.k_ext), dk(ops, ds_win))

    dv = jax.jit(lambda o, p, d: kops.dv_kernel(st, o, p, d))
    sec = _timed(dv, ops, p_win, dout, reps=reps, min_time=min_time)
    add("dv", sec, (p_win, dout, ops.v_ext), dv(ops, p_win, dout))

    dmean = jax.jit(lambda o, p, d: kops.dmean_kernel(st, o, p, d))
    sec = _timed(dmean, ops, p_code, dout, reps=reps, min_time=min_time)
    add("dmean", sec, (p_code, dout), dmean(ops, p_code, dout))

    epilogue_fn = _epilogue(b, h, t, v, dtype)

    epi = jax.jit(epilogue_fn)
    sec = _timed(epi, out, pro, reps=reps, min_time=min_time)
    add("epilogue", sec, (out, pro.ext, pro.new_count, pro.new_mean), epi(out, pro))

    def whole(q, kk, vv, rq, rt, cot, config=pallas_config):
        def f(q, kk, vv, rq, rt):
            o, _ = vq_attention_pallas(
                q, kk, vv, cb, rel_query=rq, rel_table=rt, pallas=config,
                **{n: static[n] for n in ("block_len", "scale")},
            )  # fmt: skip
            return o

        o, vjp = jax.vjp(f, q, kk, vv, rq, rt)
        return o, vjp(cot)

    whole_jit = jax.jit(whole)
    sec = _timed(whole_jit, q, kk, vv, rq, rt, cot, reps=reps, min_time=min_time)
    o, grads = whole_jit(q, kk, vv, rq, rt, cot)
    add("fwd+bwd", sec, (q, kk, vv, rq, rt, cot), (o, grads))
    whole_kernel = jax.jit(functools.partial(whole, config=kernel_config))
    sec = _timed(whole_kernel, q, kk, vv, rq, rt, cot, reps=reps, min_time=min_time)
    o_k, grads_k = whole_kernel(q, kk, vv, rq, rt, cot)
    add("fwd+bwd, prefix kernel", sec, (q, kk, vv, rq, rt, cot), (o_k, grads_k))
    # The parts are the op: its output and dq come from these kernels.
    check = dict(
        out=rel_err(o, jnp.transpose(out[..., :v], (0, 2, 1, 3))),
        dq=rel_err(grads[0], jnp.transpose(dq[..., :k], (0, 2, 1, 3))),
        prefix_kernel_out=rel_err(o, o_k),
        prefix_kernel_dv=rel_err(grads[2], grads_k[2]),
    )
    return rows, check, whole_jit, (q, kk, vv, rq, rt, cot)


def account_parts(t, dims, dtype, *, pallas_config):
    """Rows (part, useful FLOPs, operand bytes, XLA bytes accessed or None)
    at one length, from shapes alone (nothing runs): the kernels' operands
    by `jax.eval_shape`, and for the XLA parts (prologue, epilogue) the
    bytes XLA's compiled cost analysis counts on this machine's backend."""
    from pallas_kernels.vq_attention import ops as kops
    from tvq_eqx.ops import pallas_kernel_inputs

    b, h, k, v, s, blk = dims
    sds = jax.ShapeDtypeStruct
    q = kk = rq = sds((b, t, h, k), dtype)
    vv = sds((b, t, h, v), dtype)
    cb, rt = sds((h, s, k), jnp.float32), sds((blk + 1, h, k), dtype)
    inputs = (q, kk, vv, cb, rq, rt)
    static = _static(blk, k)
    kept = {}

    def prepared(q, kk, vv, cb, rq, rt):
        pro, core_args, core_kwargs = pallas_kernel_inputs(
            q, kk, vv, cb, rel_query=rq, rel_table=rt, pallas=pallas_config, **static
        )
        kept["st"], ops = kops.prepare_operands(*core_args, **core_kwargs)
        return pro, ops

    pro, ops = jax.eval_shape(prepared, *inputs)
    st = kept["st"]
    out, lse = jax.eval_shape(lambda o: kops.forward_kernel(st, o), ops)
    dout = sds(out.shape, out.dtype)
    delta = sds(lse.shape, jnp.float32)
    ds_out = jax.eval_shape(lambda *a: kops.ds_kernel(st, *a), ops, dout, lse, delta)
    _, p_win, ds_win, p_code, _ = ds_out
    epilogue_fn = _epilogue(b, h, t, v, dtype)
    kernel_bytes, compulsory_bytes = _prefix_kernel_bytes(t, dims, dtype)
    parts = _prologue_parts(inputs, dims, pallas_config) + [
        ("cache means, prefix kernel", (), (), kernel_bytes),
        ("fwd", ops, (out, lse), None),
        ("dq", (ops, dout, lse, delta), ds_out, None),
        ("dk", (ds_win, ops.q, ops.k_ext),
         jax.eval_shape(lambda o, x: kops.dk_kernel(st, o, x), ops, ds_win), None),
        ("dv", (p_win, dout, ops.v_ext),
         jax.eval_shape(lambda o, p, d: kops.dv_kernel(st, o, p, d), ops, p_win, dout), None),
        ("dmean", (p_code, dout),
         jax.eval_shape(lambda o, p, d: kops.dmean_kernel(st, o, p, d), ops, p_code, dout), None),
        ("epilogue", (out, pro.ext, pro.new_count, pro.new_mean),
         jax.eval_shape(epilogue_fn, out, pro), _xla_bytes(epilogue_fn, out, pro)),
    ]  # fmt: skip
    compulsory = {"cache means, prefix kernel": compulsory_bytes}
    return [
        (name, useful_flops(name, b=b, h=h, t=t, k=k, v=v, s=s, blk=blk),
         compulsory.get(name, nbytes(ins) + nbytes(outs)), xb)
        for name, ins, outs, xb in parts
    ]  # fmt: skip


def _xla_bytes(fn, *args):
    """The bytes accessed XLA's cost analysis counts for `jit(fn)(*args)`."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost.get("bytes accessed")


def _prologue_parts(inputs, dims, pallas_config):
    """Rows (part, operands, results, XLA bytes) of the prologue, whole and
    split: everything but the cache means (XLA), and the cache means made by
    XLA's passes (the prefix kernel's row is `_prefix_kernel_bytes`)."""
    from tvq_eqx.ops import pallas_cache_means_xla

    k, s, blk = dims[2], dims[4], dims[5]
    prologue_fn = _prologue(pallas_config, blk, k)
    without_means = _prologue(
        dataclasses.replace(pallas_config, cache_prefix="kernel"), blk, k
    )

    def rest_fn(q, kk, vv, cb, rq, rt):
        pro, core_args = without_means(q, kk, vv, cb, rq, rt)
        return pro.terms, core_args[:6], core_args[7:]  # all but the means

    # The prologue made without the means (what the prefix kernel reads).
    pro_shapes, _ = jax.eval_shape(without_means, *inputs)

    def means_fn(pro):
        return pallas_cache_means_xla(pro, n_code=s, block_len=blk)

    return [
        ("prologue", inputs, jax.eval_shape(prologue_fn, *inputs),
         _xla_bytes(prologue_fn, *inputs)),
        ("prologue without cache means", inputs, jax.eval_shape(rest_fn, *inputs),
         _xla_bytes(rest_fn, *inputs)),
        ("cache means, XLA passes", (pro_shapes.terms, pro_shapes.ext.value),
         jax.eval_shape(means_fn, pro_shapes), _xla_bytes(means_fn, pro_shapes)),
    ]  # fmt: skip


def _prefix_kernel_bytes(t, dims, dtype):
    """The prefix kernel's bytes at the GPU tiles, (read and written, the
    compulsory part: each value read once)."""
    from pallas_kernels.vq_attention import prefix

    b, h, k, v, s, blk = dims
    tiles = prefix.PREFIX_TILES[("gpu", dtype == jnp.float32)]
    bs = min(tiles[0], s)
    n_blk = t // blk
    # The kernel reads the codes, each value tile once per code tile (S / bs
    # times; re-reads may hit L2), the counts and the carried sums; writes
    # the means and the sums after the segment.
    kernel_bytes = (
        b * h * t * 4
        + (s // bs) * b * h * t * v * dtype.itemsize
        + b * h * n_blk * s * 4
        + 2 * b * h * s * v * 4
        + b * h * n_blk * s * v * dtype.itemsize
    )
    return kernel_bytes, kernel_bytes - (s // bs - 1) * b * h * t * v * dtype.itemsize


def accounting_lines(seq_lens, dims, dtype, *, pallas_config):
    """The per-part FLOPs / bytes table (per token) at each length."""
    b = dims[0]
    rows = []
    for t in seq_lens:
        for name, flops, nb, xb in account_parts(
            t, dims, dtype, pallas_config=pallas_config
        ):
            rows.append((
                fmt_len(t), name, f"{flops / (b * t) / 1e6:.2f}",
                f"{nb / (b * t) / 1e3:.1f}",
                "n/a" if xb is None else f"{xb / (b * t) / 1e3:.1f}",
                "n/a" if not nb else f"{flops / nb:.0f}",
            ))  # fmt: skip
    return markdown_table(
        ["T", "part", "MFLOP per token", "operand KB per token",
         f"XLA bytes accessed, KB per token ({jax.default_backend()} compile; "
         "the prefix kernel: its reads and writes)",
         "FLOP per operand byte"],
        rows,
    )  # fmt: skip


def _attention_grad(attend):
    def f(q, kk, vv, cot):
        o, vjp = jax.vjp(attend, q, kk, vv)
        return o, vjp(cot)

    return jax.jit(f)


def measure_baselines(t, dims, dtype, *, reps, min_time, memory_bytes):
    """Rows (name, seconds, flops, note) of the baselines at one length."""
    b, h, k, v, s, blk = dims
    q, kk, vv, cb, rq, rt, cot = _inputs(t, dims, dtype, jax.random.key(t))

    def grad_seconds(attend, keys):
        """Seconds of `attend(q, keys, vv)` forward and backward."""
        f = _attention_grad(attend)
        return _timed(f, q, keys, vv, cot, reps=reps, min_time=min_time)

    fwd_bwd_useful = useful_flops("fwd+bwd", b=b, h=h, t=t, k=k, v=v, s=s, blk=blk)
    rows = [_xla_row(grad_seconds, kk, cb, rq, rt, dims, fwd_bwd_useful)]
    khat = quantized_keys(kk, cb)
    # Causal dense attention, fwd + bwd = 3.5 x fwd (flash convention).
    dense_flops = 3.5 * b * h * t * t * (k + v)  # 2 * T^2 / 2 * (K + V) * 3.5
    chunks = max(1, v // k)
    chunk_flops = 3.5 * b * h * t * t * 2 * k * chunks
    impls = ["cudnn"] if jax.default_backend() == "gpu" else ["xla"]
    for impl in impls:
        rows += _dpa_rows(grad_seconds, khat, impl, k, chunks, chunk_flops, dense_flops)
    rows.append(_dense_row(grad_seconds, khat, t, dims, dense_flops, memory_bytes))
    rows.append(_tokamax_row(grad_seconds, khat, k, chunks, chunk_flops))
    return rows


def _xla_row(grad_seconds, kk, cb, rq, rt, dims, flops):
    """The linear-time jnp form (out of memory at long T is a result)."""
    from tvq_eqx.ops import vq_attention_xla

    k, blk = dims[2], dims[5]

    def xla(q, kk, vv):
        o, _ = vq_attention_xla(
            q, kk, vv, cb, block_len=blk, scale=k**-0.5, rel_query=rq, rel_table=rt
        )
        return o

    try:
        return ("xla form", grad_seconds(xla, kk), flops, "")
    except Exception as e:
        return ("xla form", None, flops, type(e).__name__)


def _dpa_rows(grad_seconds, khat, impl, k, chunks, chunk_flops, dense_flops):
    """`jax.nn.dot_product_attention` (`impl`) in `chunks` calls of value
    width d_k, and its FLOP-normalised line."""

    def chunked(q, kk, vv):
        outs = [
            jax.nn.dot_product_attention(
                q,
                kk,
                vv[..., i * k : (i + 1) * k],
                is_causal=True,
                implementation=impl,
            )  # fmt: skip
            for i in range(chunks)
        ]
        return jnp.concatenate(outs, axis=-1)

    name = f"dpa-{impl} ({chunks} calls)"
    try:
        sec = grad_seconds(chunked, khat)
    except Exception as e:
        return [(name, None, chunk_flops, type(e).__name__)]
    return [
        (name, sec, chunk_flops, ""),
        (f"{name}, FLOP-normalised", sec * dense_flops / chunk_flops,
         dense_flops, "time x one call's FLOPs / these calls' FLOPs"),
    ]  # fmt: skip


def _dense_row(grad_seconds, khat, t, dims, dense_flops, memory_bytes):
    """One dense call at the full d_v (XLA materialises the T x T scores),
    where it fits in memory."""
    b, h, k = dims[:3]
    need = 4 * b * h * t * t * 4  # scores, probabilities and their grads, f32
    if memory_bytes is not None and need >= 0.6 * memory_bytes:
        return ("dense, one call (XLA)", None, dense_flops, "would not fit")

    def dense(q, kk, vv):
        sc = jnp.einsum("bthk,bshk->bhts", q, kk, preferred_element_type=jnp.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))
        sc = jnp.where(causal, sc * k**-0.5, -1e30)
        p = jax.nn.softmax(sc, axis=-1).astype(vv.dtype)
        return jnp.einsum("bhts,bshv->bthv", p, vv)

    try:
        return ("dense, one call (XLA)", grad_seconds(dense, khat), dense_flops, "")
    except Exception as e:
        return ("dense, one call (XLA)", None, dense_flops, type(e).__name__)


def _tokamax_row(grad_seconds, khat, k, chunks, chunk_flops):
    """tokamax's flash attention in `chunks` calls, if it is installed."""
    try:
        import tokamax  # type: ignore[import-not-found]
    except ImportError:
        return ("tokamax", None, None, "not installed")

    def flash(q, kk, vv):
        outs = [
            tokamax.dot_product_attention(
                q, kk, vv[..., i * k : (i + 1) * k], is_causal=True
            )
            for i in range(chunks)
        ]
        return jnp.concatenate(outs, axis=-1)

    name = f"tokamax ({chunks} calls)"
    try:
        return (name, grad_seconds(flash, khat), chunk_flops, "")
    except Exception as e:
        return (name, None, chunk_flops, f"{type(e).__name__}: {e}"[:80])


def profile_ops(fn, args, *, calls=3, top=12):
    """Device time per call of each op name under jax.profiler (perfetto)."""
    with tempfile.TemporaryDirectory() as d:
        fn(*args)  # compiled before tracing
        jax.block_until_ready(fn(*args))
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        paths = glob.glob(
            os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True
        )
        if not paths:
            return []
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {
        pid for pid, n in names.items() if "device" in n.lower() or "gpu" in n.lower()
    }
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
            totals[e["name"]] += e["dur"] / 1e3 / calls  # us -> ms per call
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def _rate(flops, seconds, peak):
    if seconds is None or not flops:
        return "n/a", "n/a"
    tflops = flops / seconds / 1e12
    return f"{tflops:.3g}", ("n/a" if peak is None else f"{100 * tflops / peak:.1f}%")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="8192,32768,131072")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--micro", action="store_true", help="tiny shapes (CPU smoke)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-seq-lens", default="8192,32768,131072")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new lengths after this many seconds")  # fmt: skip
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--accounting", action="store_true",
        help="only the FLOPs / bytes per part, from shapes (runs nothing)",
    )  # fmt: skip
    return ap


@dataclasses.dataclass(frozen=True)
class Card:
    """The device the parts run on: its kind, dense bf16 peak and memory."""

    kind: str
    peak_tflops: float | None
    peak_gbs: float | None
    memory_bytes: int | None

    @classmethod
    def local(cls) -> Card:
        device = jax.devices()[0]
        try:
            memory = device.memory_stats().get("bytes_limit")
        except Exception:  # CPU has no memory stats
            memory = None
        return cls(device.device_kind, *card_peaks(device.device_kind), memory)


def _parts_section(t, parts, check, dims, dtype, card: Card) -> list[str]:
    """The table of the parts at length `t` and the check that they are the
    op; `parts` and `check` from `measure_parts`."""
    b = dims[0]
    total = dict((p, sec) for p, sec, _, _ in parts)["fwd+bwd"]
    table = []
    for part, sec, flops, nb in parts:
        tf, pct = _rate(flops, sec, card.peak_tflops)
        gbs = nb / sec / 1e9
        table.append((
            part, f"{sec * 1e3:.3f}", f"{100 * sec / total:.0f}%", tf, pct,
            f"{gbs:.0f}", f"{nb / (b * t) / 1e3:.1f}", card.kind,
        ))  # fmt: skip
    lines = [f"## T = {fmt_len(t)}: parts of the pallas path", ""]
    lines += [
        "The parts are the op: relative error of the op's output and dq "
        "against the forward and dq kernels' alone: "
        + ", ".join(f"{n} {e:.1e}" for n, e in check.items()),
        "",
    ]
    # The parts are the same kernels: to rounding. The prefix kernel sums
    # in another order: one rounding of the means to the value dtype.
    prefix_tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    limits = dict(out=1e-3, dq=1e-3)
    if any(e > limits.get(n, prefix_tol) for n, e in check.items()):
        lines += [f"**{CHECK_FAILED}: the parts do not reproduce the op**", ""]
    lines += markdown_table(
        ["part", "ms", "of fwd+bwd", "TFLOP/s", "of peak", "GB/s",
         "KB per token", "card"],
        table,
    )  # fmt: skip
    return lines


def _baselines_section(t, total, base, dims, card: Card):
    """The whole op's fwd+bwd (`total` seconds) beside the baselines
    (`measure_baselines`) at length `t`: (lines, the cuDNN rows' seconds)."""
    b, h, k, v, s, blk = dims
    rows = [("pallas fwd+bwd", f"{total * 1e3:.3f}", "1.00", *_rate(
        useful_flops("fwd+bwd", b=b, h=h, t=t, k=k, v=v, s=s, blk=blk),
        total, card.peak_tflops), "", card.kind)]  # fmt: skip
    cudnn = []
    for name, sec, flops, note in base:
        ratio = "n/a" if sec is None else f"{sec / total:.2f}"
        ms = "n/a" if sec is None else f"{sec * 1e3:.3f}"
        rows.append(
            (name, ms, ratio, *_rate(flops, sec, card.peak_tflops), note, card.kind)
        )
        if name.startswith("dpa-cudnn") and "normalised" not in name:
            cudnn.append(sec)
    lines = ["", f"## T = {fmt_len(t)}: fwd+bwd beside the baselines", ""]
    lines += markdown_table(
        ["form", "ms", "time / pallas", "TFLOP/s", "of peak", "note", "card"], rows
    )
    return lines, cudnn


def _profile_section(t, whole, whole_args, card: Card) -> list[str]:
    """The device ops of the whole op's fwd+bwd at length `t`, by name."""
    ops = profile_ops(whole, whole_args)
    lines = ["", f"## T = {fmt_len(t)}: device ops of pallas fwd+bwd", ""]
    if not ops:
        return lines + ["(the profiler recorded no device ops on this backend)"]
    return lines + markdown_table(
        ["op", "ms per call", "card"],
        [(n.replace("|", "/")[:80], f"{ms:.3f}", card.kind) for n, ms in ops],
    )


def _accounting(args, lines, seq_lens, dims, dtype):
    """`--accounting`: the FLOPs / bytes table alone (runs nothing)."""
    from pallas_kernels.vq_attention import BlockSizes, PallasConfig

    # The GPU tiles (sm_90), whatever this machine is: they set the padding.
    gpu = PallasConfig(block_sizes=BlockSizes.for_platform("gpu", arch=90))
    lines += ["## FLOPs and bytes per part (GPU tiles, sm_90)", ""]
    lines += accounting_lines(seq_lens, dims, dtype, pallas_config=gpu)
    out_path = args.out or RESULTS_DIR / "kernel-parts-accounting.md"
    write_text(out_path, lines)
    log(f"wrote {out_path}")
    return out_path


def main(argv=None):
    args = _parser().parse_args(argv)

    from pallas_kernels.vq_attention import PallasConfig

    dims = MICRO if args.micro else OFFICIAL
    dtype = jnp.dtype(args.dtype)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    profile_lens = {int(x) for x in args.profile_seq_lens.split(",")}
    card = Card.local()
    pallas_config = PallasConfig()
    out_path = args.out or RESULTS_DIR / f"kernel-parts-{device_tag()}.md"
    b, h, k, v, s, blk = dims
    notes = [
        f"card: {card.kind} (bf16 dense peak {card.peak_tflops} TFLOP/s, HBM "
        f"{card.peak_gbs} GB/s)",
        f"shape: B {b}, H {h}, d_k {k}, d_v {v}, codes {s}, block {blk}; {dtype.name}",
        "TFLOP/s on useful FLOPs (module doc); GB/s on operands read once and "
        "results written once (a lower bound on traffic)",
    ]
    lines = header_lines("VQ attention, part by part", command_line(argv), notes)
    if args.accounting:
        return _accounting(args, lines, seq_lens, dims, dtype)
    start = time.perf_counter()
    summary = []  # (T, pallas seconds, cuDNN seconds)
    for t in seq_lens:
        if time.perf_counter() - start > args.budget_s:
            lines += [f"(T = {fmt_len(t)} skipped: time budget spent)", ""]
            continue
        log(f"kernel_parts: T = {t}")
        parts, check, whole, whole_args = measure_parts(
            t, dims, dtype, pallas_config=pallas_config, reps=args.reps,
            min_time=args.min_time,
        )  # fmt: skip
        lines += _parts_section(t, parts, check, dims, dtype, card)
        total = dict((p, sec) for p, sec, _, _ in parts)["fwd+bwd"]
        base = measure_baselines(
            t, dims, dtype, reps=args.reps, min_time=args.min_time,
            memory_bytes=card.memory_bytes,
        )  # fmt: skip
        section, cudnn = _baselines_section(t, total, base, dims, card)
        lines += section
        summary += [(t, total, sec) for sec in cudnn]
        if args.profile and t in profile_lens:
            lines += _profile_section(t, whole, whole_args, card)
        lines += [""]
        write_text(out_path, lines)  # each length as soon as it is done
    if summary:
        lines += ["## Per token and against cuDNN", ""]
        lines += markdown_table(
            ["T", "pallas ns per token", "cuDNN / pallas", "card"],
            [(fmt_len(t), f"{1e9 * p / t:.0f}", f"{c / p:.2f}", card.kind)
             for t, p, c in summary],
        )  # fmt: skip
    write_text(out_path, lines)
    log(f"wrote {out_path}")
    return out_path


if __name__ == "__main__":
    main()

"""Time the kernels' forward and forward+backward for a few tile choices that
all pass the compile gate (docs/kernels.md), to check the GPU rule of
`pallas_kernels/vq_attention/config.py` against real timings.

    python benchmarks/tile_sweep.py [--seq-len 16384] [--dtype bfloat16] [--out FILE]

Each candidate is checked against the default rule's output and gradients
first (relative error; a candidate that disagrees is reported, not timed). Writes a markdown
table (default benchmarks/results/tiles-<backend>.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels.vq_attention import BlockSizes, PallasConfig
from pallas_kernels.vq_attention.config import local_arch, rule
from tvq_eqx.ops import vq_attention_pallas

# Variants at the official shape that pass the gate on sm_90 (bf16): the
# rule's, a wider forward value tile (halves the Q K^T recompute), a taller
# forward query tile (halves the key/value traffic per query), a taller bwd_dq
# query tile.
CANDIDATES = {
    "rule": {},
    "fwd bv512 w8": dict(block_v=512, num_warps=8),
    "fwd bq128 w8": dict(block_q=128, num_warps=8),
    # bwd_dq with 128 query rows (216 registers, 80 KiB): half the dO / V
    # chunk traffic per score of the rule's 64 rows.
    "dq bq128 w8": dict(dq_block_q=128, dq_num_warps=8),
}


def _time(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--d-k", type=int, default=128)
    p.add_argument("--d-v", type=int, default=1536)
    p.add_argument("--codes", type=int, default=512)
    p.add_argument("--block-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--platform", default="gpu", help="rule to start from")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    t, k, v, s, blk = args.seq_len, args.d_k, args.d_v, args.codes, args.block_len
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (1, t, 1, k), dtype)
    kk = jax.random.normal(ks[1], (1, t, 1, k), dtype)
    vv = jax.random.normal(ks[2], (1, t, 1, v), dtype)
    cb = jax.random.normal(ks[3], (1, s, k), jnp.float32)
    cot = jax.random.normal(ks[4], (1, t, 1, v), dtype)
    flops = 2.0 * t * (s + 1.5 * blk) * (k + v)  # useful forward FLOPs

    def make(sizes):
        def fwd(q, kk, vv):
            return vq_attention_pallas(
                q, kk, vv, cb, block_len=blk, scale=k**-0.5, pallas=PallasConfig(sizes)
            )[0]

        def fwdbwd(q, kk, vv, cot):
            out, vjp = jax.vjp(fwd, q, kk, vv)
            return out, *vjp(cot)

        return jax.jit(fwd), jax.jit(fwdbwd)

    lines = [
        f"# Tile sweep on {jax.devices()[0].device_kind}: T {t}, d_k {k}, d_v {v}, "
        f"codes {s}, block {blk}, {dtype.name}",
        "",
        "| candidate | fwd ms | fwd TFLOP/s (useful) | fwd+bwd ms "
        "| max rel. err vs rule (out, dq, dk, dv) |",
        "|---|---:|---:|---:|---:|",
    ]
    out_path = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"tiles-{jax.default_backend()}.md"
    )

    def write():  # after every row: a run cut by a time limit keeps its rows
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    ref = None
    # Every field explicit (the rule's values, then the candidate's), so a
    # forward tile does not carry over to the backward kernels.
    base = rule(
        "gpu" if args.platform in ("gpu", "cuda", "rocm") else args.platform,
        float32=dtype == jnp.float32,
        block_len=blk,
        codes=s,
        d_k=k,
        d_v=v,
        arch=local_arch(),
    )
    for name, fixed in CANDIDATES.items():
        sizes = BlockSizes.for_platform(args.platform, **{**base, **fixed})
        fwd, fwdbwd = make(sizes)
        try:
            outs = jax.block_until_ready(fwdbwd(q, kk, vv, cot))  # out, dq, dk, dv
            if ref is None:
                ref = outs
            err = 0.0
            for r, o in zip(ref, outs, strict=True):
                r64 = np.asarray(r, np.float64)
                err = max(
                    err,
                    float(
                        np.linalg.norm(r64 - np.asarray(o, np.float64))
                        / np.linalg.norm(r64)
                    ),
                )
            if err > 5e-2:
                raise ValueError(f"disagrees with the rule: rel. err {err:.1e}")
            t_f = _time(fwd, q, kk, vv, reps=args.reps)
            t_fb = _time(fwdbwd, q, kk, vv, cot, reps=args.reps)
            row = (
                f"| {name} | {t_f * 1e3:.2f} | {flops / t_f / 1e12:.0f} "
                f"| {t_fb * 1e3:.2f} | {err:.1e} |"
            )
        except Exception as e:  # report the failure and go on
            row = f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | | |"
        lines.append(row)
        print(row, flush=True)
        write()
    print("wrote", out_path)


if __name__ == "__main__":
    main()

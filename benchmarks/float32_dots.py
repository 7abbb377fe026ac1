"""Error of the float32 dot algorithms the GPU kernels can use, measured on CPU.

On a GPU, float32 kernel dots run as one of (config.py `float32_dots`):
- "highest": IEEE float32 FMA dots (exact products; no tensor cores);
- "bf16x6" / "bf16x3": each operand split into three bfloat16 terms
  `a = a0 + a1 + a2` and 6 (or 3) bfloat16 tensor-core products with float32
  accumulation (jax's Pallas-Triton lowering of `DotAlgorithmPreset
  .BF16_BF16_F32_X6` / `_X3`);
- "tf32": `Precision.HIGH`/`DEFAULT`, operands rounded to TF32 (10-bit
  mantissa), one tensor-core pass.

Interpret mode computes every dot in float32, so this script emulates each
algorithm exactly (bf16 x bf16 products are exact in float32; the split and
the sum of the partial products are what the lowering does) by swapping the
dot helpers (`dot_nt`, `dot_nn`, `dot_tn`) the forward and backward kernel
modules call, runs the kernels' forward and backward in interpret mode
and reports the relative error against the xla form at Precision.HIGHEST.

    python benchmarks/float32_dots.py [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels.vq_attention import BlockSizes, PallasConfig
from pallas_kernels.vq_attention import backward as backward_kernels
from pallas_kernels.vq_attention import forward as forward_kernels
from tvq_eqx.ops import vq_attention_pallas, vq_attention_xla


def _bf16_terms(x, n):
    terms = []
    for _ in range(n):
        t = x.astype(jnp.bfloat16)
        terms.append(t)
        x = x - t.astype(jnp.float32)
    return terms


def _tf32(x):
    # Round to nearest with a 10-bit mantissa (TF32): clear the low 13 bits.
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def emulated_dot(algorithm):
    """A replacement for `lax.dot_general` with float32 inputs."""

    def dot(a, b, dims):
        exact = lambda x, y: lax.dot_general(
            x.astype(jnp.float32),
            y.astype(jnp.float32),
            dims,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        if a.dtype != jnp.float32 or algorithm == "highest":
            return exact(a, b)
        if algorithm == "tf32":
            return exact(_tf32(a), _tf32(b))
        a0, a1, a2 = _bf16_terms(a, 3)
        b0, b1, b2 = _bf16_terms(b, 3)
        # smallest terms first, in the lowering's order
        pairs = [(a1, b0), (a0, b1), (a0, b0)]
        if algorithm == "bf16x6":
            pairs = [(a2, b0), (a0, b2), (a1, b1), *pairs]
        acc = None
        for x, y in pairs:
            term = exact(x, y)
            acc = term if acc is None else acc + term
        return acc

    return dot


def patch_dots(algorithm):
    dot = emulated_dot(algorithm)
    nt = lambda a, b, precision: dot(a, b, (((1,), (1,)), ((), ())))
    nn = lambda a, b, precision: dot(a, b, (((1,), (0,)), ((), ())))
    tn = lambda a, b, precision: dot(a, b, (((0,), (0,)), ((), ())))
    # The kernels look these names up in their own modules when traced.
    for mod in (forward_kernels, backward_kernels):
        for name, fn in (("dot_nt", nt), ("dot_nn", nn), ("dot_tn", tn)):
            if hasattr(mod, name):
                setattr(mod, name, fn)


def rel(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / np.linalg.norm(ref))


def measure(algorithm, shape, seed=0):
    b, t, h, k, v, s, blk = shape
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (b, t, h, k))
    kk = jax.random.normal(ks[1], (b, t, h, k))
    vv = jax.random.normal(ks[2], (b, t, h, v))
    cb = jax.random.normal(ks[3], (h, s, k))
    rq = 0.3 * jax.random.normal(ks[4], (b, t, h, k))
    rt = jax.random.normal(ks[5], (blk + 1, h, k))
    cot = jax.random.normal(ks[6], (b, t, h, v))

    def run(fn, **opts):
        def f(q, kk, vv):
            out, st = fn(
                q,
                kk,
                vv,
                cb,
                block_len=blk,
                scale=k**-0.5,
                rel_query=rq,
                rel_table=rt,
                **opts,
            )
            return out

        out, vjp = jax.vjp(f, q, kk, vv)
        return (out, *vjp(cot))

    with jax.default_matmul_precision("highest"):
        ref = run(vq_attention_xla)
    patch_dots(algorithm)
    sizes = BlockSizes(block_q=16, block_k=16, block_code=16, block_v=32)
    got = run(vq_attention_pallas, pallas=PallasConfig(sizes))
    return [rel(r, g) for r, g in zip(ref, got, strict=True)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    shape = (1, 256, 1, 128, 192, 64, 64)
    lines = [
        "| float32 dots | out | dq | dk | dv |",
        "|---|---:|---:|---:|---:|",
    ]
    for alg in ("highest", "bf16x6", "bf16x3", "tf32"):
        errs = measure(alg, shape)
        lines.append(f"| {alg} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                f"Shape (B, T, H, d_k, d_v, codes, L) = {shape}, with bias; "
                "relative error vs the xla form at HIGHEST.\n\n"
            )
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

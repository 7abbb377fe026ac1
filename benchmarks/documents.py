"""What packed-document masking (`doc_starts`) costs: forward+backward of the
Pallas kernels and of the xla form, with and without documents, side by side
in one run. Writes benchmarks/results/documents-<tag>.md.

    python benchmarks/documents.py                 # GPU: official shape, T 16384
    python benchmarks/documents.py --seq-len 1024 --d-v 64 --codes 64 --block-len 64
                                                   # CPU (pallas in interpret mode)
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from tvq_eqx.ops import vq_attention_pallas, vq_attention_xla  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _inputs(b, t, h, k, v, s, block_len, dtype, mean_doc_len):
    keys = jax.random.split(jax.random.key(0), 6)
    q, key = (jax.random.normal(x, (b, t, h, k), dtype) for x in keys[:2])
    value = jax.random.normal(keys[2], (b, t, h, v), dtype)
    codebook = jax.random.normal(keys[3], (h, s, k), jnp.float32)
    rel_query = (0.3 * jax.random.normal(keys[4], (b, t, h, k))).astype(dtype)
    rel_table = jax.random.normal(keys[5], (block_len + 1, h, k), dtype)
    rng = np.random.default_rng(0)
    starts = np.zeros((b, t), bool)
    for row in range(b):
        starts[row, rng.integers(0, t, size=max(1, t // mean_doc_len))] = True
    return (q, key, value, rel_query, rel_table), codebook, jnp.asarray(starts)


def _gradient_step(fn, codebook, block_len, scale, doc_starts):
    def loss(q, key, value, rel_query, rel_table):
        out, _ = fn(
            q, key, value, codebook, block_len=block_len, scale=scale,
            rel_query=rel_query, rel_table=rel_table, doc_starts=doc_starts,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main(argv=None):
    gpu = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384 if gpu else 1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d-k", type=int, default=128 if gpu else 32)
    p.add_argument("--d-v", type=int, default=1536 if gpu else 64)
    p.add_argument("--codes", type=int, default=512 if gpu else 64)
    p.add_argument("--block-len", type=int, default=512 if gpu else 64)
    p.add_argument("--mean-doc-len", type=int, default=2000 if gpu else 200)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--reps", type=int, default=5 if gpu else 2)
    p.add_argument("--device-tag", default=jax.default_backend())
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    arrays, codebook, starts = _inputs(
        args.batch, args.seq_len, args.heads, args.d_k, args.d_v, args.codes,
        args.block_len, dtype, args.mean_doc_len,
    )  # fmt: skip
    forms = dict(pallas=vq_attention_pallas, xla=vq_attention_xla)
    rows = [("pallas", False), ("pallas", True), ("xla", False), ("xla", True)]
    times = {}
    for name, docs in rows:
        step = _gradient_step(
            forms[name], codebook, args.block_len, args.d_k**-0.5,
            starts if docs else None,
        )  # fmt: skip
        times[name, docs] = min(
            C.time_calls(functools.partial(step, *arrays), reps=args.reps)
        )
        print(f"{name:6s} documents={docs!s:5s} {1e3 * times[name, docs]:9.2f} ms")
    base = times["pallas", False]
    lines = C.header_lines(
        "Packed documents: cost",
        C.command_line(),
        [
            "forward+backward (gradients of q, k, v and the relative-bias "
            f"inputs) of B {args.batch}, T {args.seq_len}, heads {args.heads}, "
            f"d_k {args.d_k}, d_v {args.d_v}, codes {args.codes}, block "
            f"{args.block_len}, {args.dtype}, {int(starts.sum())} document "
            f"starts; best of {args.reps} after compile, all rows in one run"
            + ("" if gpu else "; CPU: pallas in interpret mode (not a speed figure)"),
        ],
    )
    lines += C.markdown_table(
        ["form", "documents", "time (ms)", "vs pallas without documents"],
        [
            (name, "yes" if docs else "no", f"{1e3 * t:.2f}", f"{t / base:.2f}")
            for (name, docs), t in times.items()
        ],
        align="llrr",
    )
    out = C.write_text(RESULTS / f"documents-{args.device_tag}.md", lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

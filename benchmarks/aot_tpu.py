"""Ahead-of-time TPU compile of forward + backward of the pallas path, on a
CPU machine: libtpu's real Mosaic compiler through a topology description
(no TPU needed). Needs `jax[tpu]` (libtpu) installed; a separate venv is
fine (`PYTHONPATH=.`).

    python benchmarks/aot_tpu.py --topology v5e:2x2 --dtypes bfloat16,float32

Prints one Markdown row per (shape, dtype): status or the compiler's error,
the temporaries XLA reports and the compile time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def compile_case(shape, dtype, topology: str):
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import (
        AbstractDevice,
        AbstractMesh,
        SingleDeviceSharding,
        use_abstract_mesh,
    )

    from pallas_kernels.vq_attention import BlockSizes, PallasConfig
    from tvq_eqx.ops import vq_attention_pallas

    dev = topologies.get_topology_desc(topology, platform="tpu").devices[0]
    b, t, h, k, v, s, blk = shape
    dt = jnp.dtype(dtype)
    shard = SingleDeviceSharding(dev)

    def sds(shp, d):
        return jax.ShapeDtypeStruct(shp, d, sharding=shard)

    args = (
        sds((b, t, h, k), dt), sds((b, t, h, k), dt), sds((b, t, h, v), dt),
        sds((h, s, k), jnp.float32), sds((b, t, h, k), dt), sds((blk + 1, h, k), dt),
    )  # fmt: skip
    config = PallasConfig(block_sizes=BlockSizes.for_platform("tpu"))

    def loss(q, key, val, codebook, rq, rt):
        out, state = vq_attention_pallas(
            q, key, val, codebook, block_len=blk, scale=k**-0.5, rel_query=rq,
            rel_table=rt, pallas=config,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state.cache_mean)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5)))
    mesh = AbstractMesh(
        (), (), abstract_device=AbstractDevice(dev.device_kind, 1, "tpu")
    )
    t0 = time.time()
    with use_abstract_mesh(mesh):
        lowered = fn.trace(*args).lower(lowering_platforms=("tpu",))
    n_mosaic = lowered.as_text().count("tpu_custom_call")
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return dev.device_kind, n_mosaic, temp, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    shape = (1, 2048, 1, 128, 1536, 512, 512)  # the official configuration
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    print("| shape | dtype | device | Mosaic calls | temporaries | compile | status |")
    print("|---|---|---|---:|---:|---:|---|")
    bad = 0
    for dtype in args.dtypes.split(","):
        try:
            kind, n, temp, sec = compile_case(shape, dtype, args.topology)
            mib = "n/a" if temp is None else f"{temp / 2**20:.1f} MiB"
            print(f"| official | {dtype} | {kind} | {n} | {mib} | {sec:.0f} s | ok |")
        except Exception as e:  # the compiler's message is the result
            bad += 1
            msg = (
                str(e).strip().splitlines()[0][:300]
                if str(e).strip()
                else type(e).__name__
            )
            print(f"| official | {dtype} | {args.topology} | | | | FAILED: {msg} |")
        sys.stdout.flush()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""TPU compile gate: forward + backward of the pallas path compiled by
libtpu's real XLA:TPU + Mosaic compiler on a CPU machine (no TPU), for every
kernel mode, shape, dtype and TPU generation. Lowering is not compiling: a
kernel that lowers to Mosaic MLIR can still run out of VMEM or break an
alignment rule, which only the compiler says.

    python benchmarks/aot_tpu.py                       # the whole gate
    python benchmarks/aot_tpu.py --shapes official --modes cache+bias \
        --generations v5e --dtypes bfloat16 --json     # one case, JSON lines

Needs libtpu: `scripts/setup.sh` installs the pinned one (pyproject's
`aot-tpu` extra) into `.venv/libtpu`. Every case compiles in a worker process
(`--jobs` at once). Per case: the status or the compiler's first error line,
the Mosaic kernels in the program, `bwd_dq`'s tiles (streamed value columns
or whole rows) with its estimated VMEM against the limit, the program's HBM
temporaries and the compile time. Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Modes of the op: keyword arguments of `aot_compile.lower` (block_len L is
# the shape's; the sliding window keeps keys at distance <= L / 4).
MODES = {
    "cache+bias": dict(rel=True),
    "cache": dict(rel=False),
    "cache_grad=False": dict(rel=True, cache_grad=False),
    "window": dict(rel=True, use_cache=False),
    "sliding": dict(rel=True, use_cache=False, window_len="L/4"),
    "documents": dict(rel=True, documents=True),
    "decay": dict(rel=True, cache_decay=0.9),
}
GENERATIONS = ("v4", "v5e", "v5p", "v6e")
DTYPES = ("bfloat16", "float32")
# The benchmarks' presets (benchmarks/aot_compile.py SHAPES) run in the
# default mode; the official shape in every mode.
PRESETS = ("scaling-gpu", "decode-gpu", "quality-gpu", "multihead")


def compile_case(shape_name: str, mode: str, generation: str, dtype: str) -> dict:
    """Compile one case (in a process that called `use_libtpu`); a dict row."""
    import jax.numpy as jnp
    from jax.sharding import use_abstract_mesh

    from benchmarks import aot_compile
    from benchmarks._libtpu import abstract_mesh_for, topology_devices
    from pallas_kernels.vq_attention import BlockSizes
    from pallas_kernels.vq_attention.config import dq_vmem_bytes, resolve_tiles

    shape = aot_compile.SHAPES[shape_name]
    b, t, h, k, v, s, blk = shape
    options = dict(MODES[mode])
    if options.get("window_len") == "L/4":
        options["window_len"] = max(blk // 4, 1)
    row = dict(shape=shape_name, mode=mode, generation=generation, dtype=dtype)
    f32 = dtype == "float32"
    tiles = resolve_tiles(
        BlockSizes.for_platform("tpu", tpu=generation),
        block_len=blk, codes=s if options.get("use_cache", True) else 1,
        d_k=k, d_v=v, float32=f32,
    )  # fmt: skip
    dims = dict(
        block_len=blk, codes=tiles.codes, d_k=tiles.d_k, d_v=tiles.d_v,
        itemsize=4 if f32 else 2,
    )  # fmt: skip
    row["dq_tiles"] = f"{tiles.dq.block_q}x{tiles.dq.block_v}" + (
        " streamed" if tiles.dq_stream_v else " whole rows"
    )
    row["dq_vmem_mib"] = (
        dq_vmem_bytes(tiles.dq, stream=tiles.dq_stream_v, **dims) / 2**20
    )
    row["vmem_limit_mib"] = (tiles.vmem_limit_bytes or 0) / 2**20
    device = topology_devices(generation)[0]
    row["device"] = device.device_kind
    t0 = time.time()
    try:
        lowered = aot_compile.lower(
            shape, jnp.dtype(dtype), platform="tpu", tpu_device=device, **options
        )
        text = lowered.as_text()
        row["kernels"] = sorted(
            {name for name in _KERNELS if f'"{name}' in text or f"@{name}" in text}
        )
        row["mosaic_calls"] = text.count("tpu_custom_call")
        with use_abstract_mesh(abstract_mesh_for(device)):
            compiled = lowered.compile()
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        row["temp_mib"] = None if temp is None else temp / 2**20
        row["status"] = "ok"
    except Exception as e:  # the compiler's message is the result
        msg = str(e).strip()
        row["status"] = "FAILED"
        row["error"] = msg.splitlines()[0][:400] if msg else type(e).__name__
        culprit = [name for name in _KERNELS if name in msg]
        if culprit:
            row["error"] += f" [{culprit[0]}]"
    row["seconds"] = time.time() - t0
    return row


_KERNELS = (
    "vq_attention_fwd",
    "vq_attention_bwd_dq",
    "vq_attention_bwd_dk",
    "vq_attention_bwd_dv",
    "vq_attention_bwd_dmean",
)


def _worker_init():
    from benchmarks._libtpu import MISSING, use_libtpu

    if not use_libtpu():
        raise RuntimeError(MISSING)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _run(case):
    return compile_case(*case)


HEADER = (
    "| shape | mode | chip | dtype | kernels | bwd_dq tiles | bwd_dq VMEM (est.) "
    "| temporaries | compile | status |\n"
    "|---|---|---|---|---:|---|---:|---:|---:|---|"
)


def format_row(r: dict) -> str:
    vmem = f"{r['dq_vmem_mib']:.1f} / {r['vmem_limit_mib']:.0f} MiB"
    temp = "-" if r.get("temp_mib") is None else f"{r['temp_mib']:.1f} MiB"
    status = r["status"] + (f": {r['error']}" if r.get("error") else "")
    n = len(r.get("kernels", []))
    return (
        f"| {r['shape']} | {r['mode']} | {r['generation']} | {r['dtype']} | {n} "
        f"| {r['dq_tiles']} | {vmem} | {temp} | {r['seconds']:.0f} s | {status} |"
    )


def cases(shapes, modes, generations, dtypes, presets=()):
    out = []
    for shape in shapes:
        for mode in modes:
            out += [(shape, mode, g, d) for g in generations for d in dtypes]
    for shape in presets:
        out += [(shape, "cache+bias", g, d) for g in generations for d in dtypes]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="official")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--generations", default=",".join(GENERATIONS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument(
        "--presets",
        default=",".join(PRESETS),
        help="shapes compiled in the default mode only ('' for none)",
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true", help="one JSON line per case")
    ap.add_argument("--out", help="also write the Markdown table here")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]
    work = cases(
        split(args.shapes), split(args.modes), split(args.generations),
        split(args.dtypes), split(args.presets) if args.presets else (),
    )  # fmt: skip
    unknown = {m for _, m, _, _ in work} - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    import multiprocessing as mp

    t0 = time.time()
    rows = []
    if not args.json:
        print(HEADER, flush=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter: libtpu before jax
    pool = ctx.Pool(max(1, min(args.jobs, len(work))), _worker_init)
    try:
        for row in pool.imap(_run, work):
            rows.append(row)
            print(json.dumps(row) if args.json else format_row(row), flush=True)
    finally:
        pool.close()  # let the workers exit (terminate() makes libtpu dump stacks)
        pool.join()
    bad = [r for r in rows if r["status"] != "ok"]
    summary = (
        f"{len(rows) - len(bad)}/{len(rows)} cases compiled "
        f"({time.time() - t0:.0f} s wall, {args.jobs} jobs)"
    )
    print(summary if not args.json else json.dumps({"summary": summary}))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{HEADER}\n" + "\n".join(map(format_row, rows)) + "\n\n")
            f.write(summary + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

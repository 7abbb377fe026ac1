"""Offline TPU cost comparison: the pallas path against the xla form (and
`jax.nn.dot_product_attention`) from XLA's compiled cost analysis, on a CPU
machine (libtpu's compiler through a topology description; no TPU).

For the official attention shape (B 1, H 1, d_k 128, d_v 1536, 512 codes,
block 512; `benchmarks/aot_compile.SHAPES["official"]`) at each T, compiles
forward + backward (`value_and_grad` of a sum loss over the output and the
new state's cache, with the model's relative bias) of

- `pallas`: `tvq_eqx.ops.vq_attention_with_state(..., implementation="pallas")`
  with the TPU tiles (`BlockSizes.for_platform("tpu")`);
- `xla`: the same call with `implementation="xla"` (the linear-time jnp form);
- `dpa`: `jax.nn.dot_product_attention(q, C[z], v, is_causal=True,
  implementation="xla")` on the quantized keys, in d_v / d_k calls of width
  d_k (as `benchmarks/kernels.py`; it needs d_v == d_k), as a reference;

and reports `compiled.cost_analysis()` (FLOPs, bytes accessed), the
temporaries of `compiled.memory_analysis()` and the compile time.

XLA's cost analysis does not see inside Mosaic custom calls (the probe at
the top of the report shows it on a lone Pallas matmul), so for the pallas
path it counts only the XLA work around the kernels (quantization, block
sums, the cache prefix). The report therefore adds the analytic per-kernel
FLOPs and compulsory HBM bytes of `benchmarks/aot_compile.kernel_costs` to
get a comparable total, and says which figure is which.

    python benchmarks/tpu_cost.py                                # T 8k, 32k; bf16, f32
    python benchmarks/tpu_cost.py --lengths 8192 --dtypes bfloat16 --no-dpa
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._libtpu import TOPOLOGIES, require_libtpu

FORMS = ("pallas", "xla", "dpa")


def _cost(compiled) -> dict:
    """FLOPs, bytes accessed, transcendentals of a compiled program (summed
    over its entries: `cost_analysis()` is a dict, or a list of dicts on
    older jax)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, dict):
        ca = [ca]
    out = dict(flops=0.0, bytes=0.0, transcendentals=0.0)
    for d in ca or []:
        out["flops"] += float(d.get("flops", 0.0))
        out["bytes"] += float(d.get("bytes accessed", 0.0))
        out["transcendentals"] += float(d.get("transcendentals", 0.0))
    return out


def _device(topology: str):
    from jax.experimental import topologies

    name = TOPOLOGIES.get(topology, topology)
    return name, topologies.get_topology_desc(name, platform="tpu").devices[0]


def _compile(fn, args, device):
    """Lower `fn` for TPU (single device) and compile it with libtpu."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    mesh = AbstractMesh(
        (), (), abstract_device=AbstractDevice(device.device_kind, 1, "tpu")
    )
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with use_abstract_mesh(mesh):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",))
    n_mosaic = lowered.as_text().count("tpu_custom_call")
    compiled = lowered.compile()
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return dict(
        **_cost(compiled), temp=temp, seconds=seconds, n_mosaic=n_mosaic, error=""
    )


def probe_custom_call(device) -> dict:
    """Does XLA's cost analysis count a Mosaic kernel's work? A lone Pallas
    matmul (1024^3, bf16), without and with a `pl.CostEstimate`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    n = 1024

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(
            a_ref[...], b_ref[...], preferred_element_type=jnp.float32
        ).astype(o_ref.dtype)

    sharding = jax.sharding.make_single_device_sharding(device)
    arg = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=sharding)
    flops = 2 * n**3
    nbytes = 3 * n * n * 2
    out = {}
    for label, estimate in (
        ("no cost_estimate", None),
        ("cost_estimate", pl.CostEstimate(flops=flops, bytes_accessed=nbytes, transcendentals=0)),
    ):  # fmt: skip

        def fn(a, b, estimate=estimate):
            return pl.pallas_call(
                kernel,
                out_shape=jax.ShapeDtypeStruct((n, n), jnp.bfloat16),
                grid=(n // 256, n // 256),
                in_specs=[
                    pl.BlockSpec((256, n), lambda i, j: (i, 0)),
                    pl.BlockSpec((n, 256), lambda i, j: (0, j)),
                ],
                out_specs=pl.BlockSpec((256, 256), lambda i, j: (i, j)),
                cost_estimate=estimate,
            )(a, b)

        out[label] = _compile(fn, (arg, arg), device)
    out["analytic"] = dict(flops=flops, bytes=nbytes)
    return out


def attention_program(form: str, shape, dtype, device, *, rel: bool = True):
    """The function and its abstract arguments for one form (`rel`: with the
    model's relative position bias, as the model calls it)."""
    import jax
    import jax.numpy as jnp

    from benchmarks._common import quantized_keys
    from tvq_eqx.ops import BlockSizes, PallasConfig, vq_attention_with_state

    b, t, h, k, v, s, blk = shape
    dt = jnp.dtype(dtype)
    sharding = jax.sharding.make_single_device_sharding(device)

    def sds(shp, d):
        return jax.ShapeDtypeStruct(shp, d, sharding=sharding)

    q, key, val = sds((b, t, h, k), dt), sds((b, t, h, k), dt), sds((b, t, h, v), dt)
    codebook = sds((h, s, k), jnp.float32)
    if form == "dpa":

        def loss(q, key, val, codebook):
            khat = quantized_keys(key, codebook)
            outs = [
                jax.nn.dot_product_attention(
                    q, khat, val[..., i : i + k], scale=k**-0.5, is_causal=True,
                    implementation="xla",
                )
                for i in range(0, v, k)
            ]  # fmt: skip
            return jnp.sum(jnp.concatenate(outs, axis=-1).astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1, 2)), (q, key, val, codebook)

    pallas = PallasConfig(block_sizes=BlockSizes.for_platform("tpu"))
    rq, rt = sds((b, t, h, k), dt), sds((blk + 1, h, k), dt)

    def loss(q, key, val, codebook, rq, rt):
        extra = dict(rel_query=rq, rel_table=rt) if rel else {}
        out, state = vq_attention_with_state(
            q, key, val, codebook, None, block_len=blk, scale=k**-0.5,
            implementation=form, pallas=pallas, **extra,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
            state.cache_mean.astype(jnp.float32)
        )

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 4, 5))
    return fn, (q, key, val, codebook, rq, rt)


def useful_flops(form: str, shape) -> float:
    """Useful FLOPs of forward + backward (benchmarks/kernels.py's count:
    multiply-add = 2, backward = 2.5 x forward). pallas / xla: every query
    scores the S codewords, the previous block and half its own, and mixes as
    many values; dpa: dense causal, in d_v / d_k calls of width d_k."""
    b, t, h, k, v, s, blk = shape
    if form == "dpa":
        fwd = b * h * t * t * 2 * v
    else:
        fwd = 2 * b * h * t * (s + 1.5 * blk) * (k + v)
    return 3.5 * fwd


def kernel_totals(shape, dtype: str, *, rel: bool = True) -> dict:
    """The Mosaic kernels' work, analytic, times B H T, summed over the five
    kernels: `aot_compile.kernel_costs` (per query token: executed FLOPs,
    useful FLOPs, compulsory HBM bytes), whose executed FLOPs use its GPU
    tiles; `flops` re-evaluates the two tile-dependent rows (the forward
    recomputes Q K^T once per value tile; forward and bwd_dq compute the
    current block's key tiles at or below the diagonal) with the same
    formulas at the TPU tiles (`BlockSizes.for_platform("tpu")`, v5e)."""
    from benchmarks.aot_compile import avg_current_keys, kernel_costs
    from pallas_kernels.vq_attention import BlockSizes
    from pallas_kernels.vq_attention.config import resolve_tiles

    b, t, h, _, _, s, blk = shape
    rows = kernel_costs(shape, dtype, rel=rel)
    tiles = resolve_tiles(
        BlockSizes.for_platform("tpu", tpu="v5e"), block_len=blk, codes=s,
        d_k=shape[3], d_v=shape[4], float32=dtype == "float32",
    )  # fmt: skip
    K, V, S = tiles.d_k, tiles.d_v, tiles.codes
    tpu = {}
    fwd_keys = S + blk + avg_current_keys(blk, tiles.fwd.block_q, tiles.fwd.block_k)
    tpu["vq_attention_fwd"] = 2 * fwd_keys * ((V // tiles.fwd.block_v) * K + V)
    dq_keys = S + blk + avg_current_keys(blk, tiles.dq.block_q, tiles.dq.block_k)
    tpu["vq_attention_bwd_dq"] = 2 * dq_keys * (2 * K + V)
    n = b * h * t
    return dict(
        flops=n * sum(tpu.get(r["name"], r["flops"]) for r in rows),
        flops_gpu_tiles=n * sum(r["flops"] for r in rows),
        useful=n * sum(r["useful_flops"] for r in rows),
        bytes=n * sum(r["bytes"] for r in rows),
        kernels=[r["name"] for r in rows],
    )


def run(
    lengths, dtypes, forms, topology: str, *, diagnose: bool = True, log=print
) -> tuple[list[dict], dict]:
    """Every (T, dtype, form), then (`diagnose`) pallas and xla without the
    relative bias at every T in the first dtype (how much of XLA's count the
    bias's gather and scatter-add are)."""
    from benchmarks.aot_compile import SHAPES

    topo, device = _device(topology)
    probe = probe_custom_call(device)
    log(f"probe: {probe}")
    base = SHAPES["official"]
    cases = [(t, d, f, True) for t in lengths for d in dtypes for f in forms]
    if diagnose:
        cases += [(t, dtypes[0], f, False) for t in lengths for f in ("pallas", "xla")]
    rows = []
    for t, dtype, form, rel in cases:
        shape = (base[0], t, *base[2:])
        row = dict(form=form, t=t, dtype=dtype, shape=shape, rel=rel)
        try:
            fn, args = attention_program(form, shape, dtype, device, rel=rel)
            row.update(_compile(fn, args, device))
        except Exception as e:  # the compiler's message is the result
            msg = str(e).strip().splitlines()
            row.update(error=(msg[0] if msg else type(e).__name__)[:300])
        row["useful"] = useful_flops(form, shape)
        if form == "pallas" and not row.get("error"):
            kt = kernel_totals(shape, dtype, rel=rel)
            row["kernel_flops"], row["kernel_bytes"] = kt["flops"], kt["bytes"]
            row["total_flops"] = row["flops"] + kt["flops"]
            row["total_flops_gpu_tiles"] = row["flops"] + kt["flops_gpu_tiles"]
            row["total_bytes"] = row["bytes"] + kt["bytes"]
        elif not row.get("error"):
            row["total_flops"], row["total_bytes"] = row["flops"], row["bytes"]
        log(
            f"{form}{'' if rel else ' (no rel bias)'} T={t} {dtype}: "
            + (
                row["error"]
                or f"flops {row['flops']:.3e} bytes {row['bytes']:.3e} "
                f"temp {row['temp']} compile {row['seconds']:.1f}s"
            )
        )
        rows.append(row)
    return rows, dict(topology=topo, device_kind=device.device_kind, probe=probe)


# ------------------------------------------------------------------- report
def _g(x, unit="") -> str:
    if x is None:
        return "n/a"
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {p}{unit}"
    return f"{x:.0f} {unit}".strip()


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def markdown(all_rows, meta) -> str:
    rows = [r for r in all_rows if r.get("rel", True)]
    plain = [r for r in all_rows if not r.get("rel", True)]
    by = {(r["t"], r["dtype"], r["form"]): r for r in rows if not r.get("error")}
    lines = _probe_section(meta)
    lines += _cost_section(rows)
    lines += _ratio_section(rows, plain, by)
    if plain:
        lines += _bias_section(plain, by)
    lines += [
        "",
        "Useful FLOPs (`benchmarks/kernels.py`'s count): pallas and xla 3.5 x "
        "2 B H T (S + 1.5 L)(d_k + d_v); dpa 3.5 x B H T^2 2 d_v (dense causal in "
        "d_v / d_k calls of width d_k). XLA's bytes accessed sum every HLO "
        "op's operands and results as if nothing stayed on chip; the analytic "
        "kernel bytes assume each kernel reads its inputs and writes its outputs "
        "once: the two are not the same kind of estimate, so the bytes ratio is "
        "indicative only.",
        "",
    ]
    return "\n".join(lines)


def _probe_section(meta) -> list[str]:
    """Whether XLA's cost analysis counts a Mosaic call (the lone-matmul
    probe), and so what the XLA columns below hold."""
    p = meta["probe"]
    lines = [
        "# Offline TPU cost: pallas path vs xla form (XLA cost analysis, no TPU)",
        "",
        "Written by `benchmarks/tpu_cost.py`: forward + backward (`value_and_grad` "
        "of a sum loss over the output and the new state's cache; relative bias "
        "on) at the official attention shape (B 1, H 1, d_k 128, d_v 1536, 512 "
        "codes, block 512), lowered on a CPU machine for "
        f"`{meta['topology']}` ({meta['device_kind']}, one chip) and compiled by "
        "libtpu. Nothing ran: these are the compiler's estimates, the best "
        "available without hardware, not timings.",
        "",
        "## Does XLA's cost analysis see inside Mosaic kernels?",
        "",
        "A lone Pallas matmul (1024 x 1024 x 1024, bf16; analytic "
        f"{_g(p['analytic']['flops'], 'FLOP')}, {_g(p['analytic']['bytes'], 'B')}):",
        "",
        "| kernel | XLA FLOPs | XLA bytes accessed |",
        "|---|---:|---:|",
    ]
    for label in ("no cost_estimate", "cost_estimate"):
        r = p[label]
        lines.append(f"| pallas_call, {label} | {_g(r['flops'])} | {_g(r['bytes'])} |")
    seen = p["no cost_estimate"]["flops"] < 0.01 * p["analytic"]["flops"]
    uses_estimate = (
        abs(p["cost_estimate"]["flops"] - p["analytic"]["flops"])
        < 0.01 * p["analytic"]["flops"]
    )
    lines += [
        "",
        (
            "Without a `pl.CostEstimate`, XLA counts a Mosaic call's FLOPs as "
            "(about) zero"
            if seen
            else "XLA counts FLOPs for a Mosaic call without a cost estimate"
        )
        + (
            "; with one, it reports the estimate. "
            if uses_estimate
            else "; a `pl.CostEstimate` does not change it. "
        )
        + "The VQ-attention kernels pass no `cost_estimate`, so the **XLA** columns "
        "of the pallas rows below count only the XLA work around the kernels "
        "(quantization, the one-hot block sums and their prefix, the relative "
        "bias, and their backward); the **kernels (analytic)** columns add "
        "`benchmarks/aot_compile.kernel_costs` times B H T: compulsory HBM bytes "
        "(each kernel's inputs and outputs once) and executed FLOPs, its formulas "
        "evaluated at the TPU tiles (`kernel_totals`: the forward recomputes "
        "Q K^T once per 512-wide value tile; `kernel_costs` itself uses the GPU "
        "tiles, 256-wide in bf16 and 128 in float32: last column of the ratio "
        "table). **total** = XLA + kernels. For xla and dpa the total is XLA's "
        "own figure.",
        "",
    ]
    return lines


def _cost_section(rows) -> list[str]:
    """XLA's and the kernels' FLOPs and bytes of every form."""
    lines = [
        "## Cost per form",
        "",
        "| T | dtype | form | Mosaic calls | XLA FLOPs | kernels FLOPs (analytic) "
        "| total FLOPs | useful FLOPs | XLA bytes | kernels bytes (analytic) "
        "| total bytes | temporaries | compile |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"| {r['t']} | {r['dtype']} | {r['form']} | | | | | "
                f"{_g(r['useful'])} | | | | | FAILED: {r['error']} |"
            )
            continue
        kf = _g(r["kernel_flops"]) if "kernel_flops" in r else "-"
        kb = _g(r["kernel_bytes"], "B") if "kernel_bytes" in r else "-"
        lines.append(
            f"| {r['t']} | {r['dtype']} | {r['form']} | {r['n_mosaic']} "
            f"| {_g(r['flops'])} | {kf} | {_g(r['total_flops'])} | {_g(r['useful'])} "
            f"| {_g(r['bytes'], 'B')} | {kb} | {_g(r['total_bytes'], 'B')} "
            f"| {_mib(r['temp'])} | {r['seconds']:.0f} s |"
        )
    return lines


def _ratio_section(rows, plain, by) -> list[str]:
    """pallas / xla (and dpa / xla) per length and dtype."""
    lines = [
        "",
        "## Ratios pallas / xla (the key figure)",
        "",
        "Total FLOPs and bytes: pallas = XLA-visible + analytic kernels; xla = XLA. "
        "Both totals of bytes are dominated by the relative bias's gather and "
        "scatter-add (XLA's count, diagnostic below), which both forms share; "
        "'no rel bias' compares the same programs without it (first dtype only). "
        "XLA-only: what XLA's cost analysis alone says (misleading for pallas: it "
        "leaves out the kernels). Below 1: the pallas path does less.",
        "",
        "| T | dtype | total FLOPs | total bytes | total bytes, no rel bias "
        "| temporaries | XLA-only FLOPs | XLA-only bytes | dpa / xla total FLOPs "
        "| dpa / xla bytes | total FLOPs, GPU-tile kernel count |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_plain = {(r["t"], r["dtype"], r["form"]): r for r in plain if not r.get("error")}

    def ratio(a, b, key, key_b=None):
        key_b = key_b or key
        if a is None or b is None or not b.get(key_b) or a.get(key) is None:
            return "n/a"
        return f"{a[key] / b[key_b]:.2f}"

    for t, dtype in sorted({(r["t"], r["dtype"]) for r in rows}):
        pa, xl, dp = (by.get((t, dtype, f)) for f in FORMS)
        pa0, xl0 = (by_plain.get((t, dtype, f)) for f in ("pallas", "xla"))
        lines.append(
            f"| {t} | {dtype} | **{ratio(pa, xl, 'total_flops')}** "
            f"| {ratio(pa, xl, 'total_bytes')} "
            f"| **{ratio(pa0, xl0, 'total_bytes')}** | {ratio(pa, xl, 'temp')} "
            f"| {ratio(pa, xl, 'flops')} | {ratio(pa, xl, 'bytes')} "
            f"| {ratio(dp, xl, 'total_flops')} | {ratio(dp, xl, 'total_bytes')} "
            f"| {ratio(pa, xl, 'total_flops_gpu_tiles', 'total_flops')} |"
        )
    return lines


def _bias_section(plain, by) -> list[str]:
    """The same programs without the relative bias: its share of the count."""
    lines = [
        "",
        "## Diagnostic: the relative bias's share of XLA's count",
        "",
        "Both forms build the window bias with `tvq_eqx.ops.relative_bias` "
        "(`jnp.take_along_axis`: a TPU gather over `[blocks, L, 2L, 3]` "
        "int32 indices, and a scatter-add in the backward). The same programs "
        "without the relative bias:",
        "",
        "| T | dtype | form | XLA FLOPs with / without bias | XLA bytes with "
        "/ without bias | temporaries with / without | bias's share of XLA "
        "bytes | total FLOPs / bytes without bias |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in plain:
        w = by.get((r["t"], r["dtype"], r["form"]))
        if w is None or r.get("error"):
            lines.append(
                f"| {r['t']} | {r['dtype']} | {r['form']} | | | | | "
                f"{r.get('error') or 'n/a'} |"
            )
            continue
        share = 1 - r["bytes"] / w["bytes"] if w["bytes"] else float("nan")
        lines.append(
            f"| {r['t']} | {r['dtype']} | {r['form']} "
            f"| {_g(w['flops'])} / {_g(r['flops'])} "
            f"| {_g(w['bytes'], 'B')} / {_g(r['bytes'], 'B')} "
            f"| {_mib(w['temp'])} / {_mib(r['temp'])} | {share:.0%} "
            f"| {_g(r['total_flops'])} / {_g(r['total_bytes'], 'B')} |"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e", help="v4, v5e, v5p, v6e or a name")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--no-dpa", action="store_true", help="skip the dpa reference")
    ap.add_argument(
        "--no-diagnose",
        action="store_true",
        help="skip the pallas/xla rows without the relative bias",
    )
    ap.add_argument("--out", default="benchmarks/results/tpu-cost.md")
    args = ap.parse_args(argv)
    if not require_libtpu():
        return 3
    forms = [f for f in FORMS if not (args.no_dpa and f == "dpa")]
    rows, meta = run(
        [int(x) for x in args.lengths.split(",")],
        args.dtypes.split(","),
        forms,
        args.topology,
        diagnose=not args.no_diagnose,
        log=lambda s: print(s, flush=True),
    )
    text = markdown(rows, meta)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if any(r.get("error") and r["form"] != "dpa" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

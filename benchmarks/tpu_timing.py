"""TPU timing of forward + backward: the pallas path, the xla form and
`jax.nn.dot_product_attention`, at the official attention shape in bfloat16.

Prepared for a machine with a TPU (none was available when it was written:
`benchmarks/tpu_cost.py` has the offline estimate). On any other backend it
says so and exits with status 2; it never reports CPU or interpret-mode
numbers as TPU ones.

    python benchmarks/tpu_timing.py                          # T 8k, 32k, 128k
    python benchmarks/tpu_timing.py --lengths 8192 --reps 20

The programs are `benchmarks/tpu_cost.py`'s (`value_and_grad` of a sum loss
over the output and the new state's cache, relative bias on; dpa: dense
causal on the quantized keys, in d_v / d_k calls of width d_k). Each is
compiled and run once, warmed up, then timed `--reps` times with
`block_until_ready`; the median is reported, with TFLOP/s on useful FLOPs
(`tpu_cost.useful_flops`, `benchmarks/kernels.py`'s count) and their
fraction of the chip's bf16 peak. Writes `benchmarks/results/tpu-timing.md`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Dense bf16 peak per chip (TFLOP/s), from Google Cloud's TPU pages; one jax
# device is one chip on these generations (v4 and v5p: a megacore).
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
NO_TPU = 2


def _chip(device_kind: str) -> str | None:
    from pallas_kernels.vq_attention.config import tpu_chip_of_kind

    return tpu_chip_of_kind(device_kind)


def time_form(form, shape, device, *, warmup: int, reps: int) -> dict:
    """Median seconds of one fwd+bwd call, and the gradients (for a check)."""
    import jax

    from benchmarks.tpu_cost import attention_program

    fn, specs = attention_program(form, shape, "bfloat16", device)
    keys = jax.random.split(jax.random.key(0), len(specs))
    args = [
        jax.device_put(jax.random.normal(k, s.shape, s.dtype), device)
        for k, s in zip(keys, specs, strict=True)
    ]
    f = jax.jit(fn)
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return dict(seconds=statistics.median(times), first=first, grads=out[1])


def _rel_err(a, b) -> float:
    import jax.numpy as jnp

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--forms", default="pallas,xla,dpa")
    ap.add_argument(
        "--dpa-max", type=int, default=32768, help="longest T for dense attention"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/tpu-timing.md")
    args = ap.parse_args(argv)

    import jax

    backend = jax.default_backend()
    if backend != "tpu":
        print(
            f"No TPU present (jax backend: {backend!r}); nothing timed. Run this "
            "on a TPU VM; benchmarks/tpu_cost.py gives the offline estimate.",
            file=sys.stderr,
        )
        return NO_TPU

    from benchmarks.aot_compile import SHAPES
    from benchmarks.tpu_cost import useful_flops

    device = jax.devices()[0]
    chip = _chip(device.device_kind)
    peak = PEAK_BF16_TFLOPS.get(chip or "")
    base = SHAPES["official"]
    lines = [
        "# TPU timing: VQ attention forward + backward (bf16, official shape)",
        "",
        f"Written by `benchmarks/tpu_timing.py` on {datetime.date.today()}: "
        f"{device.device_kind} ({chip or 'unknown generation'}; bf16 peak "
        f"{peak or 'unknown'} TFLOP/s per chip), jax {jax.__version__}, one "
        f"device. B {base[0]}, H {base[2]}, d_k {base[3]}, d_v {base[4]}, "
        f"{base[5]} codes, block {base[6]}. Median of {args.reps} runs after "
        f"{args.warmup} warm-up calls. TFLOP/s on useful FLOPs "
        "(`tpu_cost.useful_flops`); dq / dv error: relative to the xla form.",
        "",
        "| T | form | ms | TFLOP/s | of peak | xla ms / form ms | dq err | dv err "
        "| first call s | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    forms = args.forms.split(",")
    order = ["xla"] + [f for f in forms if f != "xla"] if "xla" in forms else forms
    for t in (int(x) for x in args.lengths.split(",")):
        shape = (base[0], t, *base[2:])
        results = {}
        for form in order:
            if form == "dpa" and t > args.dpa_max:
                results[form] = dict(note=f"skipped (T > --dpa-max {args.dpa_max})")
                continue
            try:
                results[form] = time_form(
                    form, shape, device, warmup=args.warmup, reps=args.reps
                )
            except Exception as e:  # e.g. out of memory: the message is the result
                msg = str(e).strip().splitlines()
                results[form] = dict(note="FAILED: " + (msg[0] if msg else "")[:200])
            print(t, form, results[form].get("seconds"), flush=True)
        ref = results.get("xla", {})
        for form in forms:
            r = results[form]
            if "seconds" not in r:
                lines.append(f"| {t} | {form} | | | | | | | | {r['note']} |")
                continue
            ms = r["seconds"] * 1e3
            tflops = useful_flops(form, shape) / r["seconds"] / 1e12
            frac = f"{tflops / peak:.1%}" if peak else "n/a"
            speed = f"{ref['seconds'] / r['seconds']:.2f}" if "seconds" in ref else ""
            # grads (dq, dk, dv, ...) against the xla form: pallas computes the
            # same function; dpa another one (no bias, no cache term), unchecked.
            errs = ["", ""]
            if "grads" in ref and form == "pallas":
                errs = [
                    f"{_rel_err(r['grads'][i], ref['grads'][i]):.1e}" for i in (0, 2)
                ]
            lines.append(
                f"| {t} | {form} | {ms:.2f} | {tflops:.1f} | {frac} | {speed} "
                f"| {errs[0]} | {errs[1]} | {r['first']:.1f} | |"
            )
    lines += [
        "",
        "dpa computes dense causal attention on the already-quantized keys (the "
        "same forward function); its useful FLOPs are the dense count, so its "
        "TFLOP/s is not comparable to the linear-time forms' at equal T: compare "
        "milliseconds.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

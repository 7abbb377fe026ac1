"""Kernel benchmark: VQ attention forward and forward+backward, side by side.

Forms (all on the same inputs, one run, one device):

- `pallas`     the fused kernels (`vq_attention_pallas`); on CPU they run in
               interpret mode, which measures the interpreter, not a kernel, so
               CPU runs include pallas only at small T (`--pallas-max`).
- `xla`        the linear-time chunked jnp form (`vq_attention_xla`).
- `quadratic`  the O(T^2) definition (`vq_attention_quadratic`).
- `summaries`  not a form: the XLA block-summary step that the pallas path
               runs before its kernels (quantize, per-block code histograms and
               value sums, exclusive prefix over blocks: the cache of
               `pallas_kernel_inputs`), timed alone to show it is not the
               bottleneck; FLOPs 2 * B * H * T * S * V.
- `dpa`        `jax.nn.dot_product_attention(q, C[z], v, is_causal=True)` on the
               already-quantized keys: the same forward function computed by
               dense causal attention, implementation "xla" and, on GPU, also
               "cudnn" (`dpa-cudnn`) where available. Its backward gives no
               gradient to the raw keys (no straight-through term), which is a
               slightly smaller computation than ours. It needs d_v == d_k, so
               for d_v > d_k the values are split into d_v / d_k chunks of width
               d_k, one call each (recomputing Q K^T per chunk; counted below).

FLOP counts (multiply-adds count 2; B batch, H heads, T seq, K d_k, V d_v,
S codes, L block_len):

- pallas, xla (same count, so their TFLOP/s compare directly): every query
  scores the S codewords, the previous block and on average half of its own
  block, and mixes as many values:
      fwd = 2 * B * H * T * (S + 1.5 L) * (K + V)
  (the block summaries, 2*B*H*T*S*V, and the xla form's masked upper half of
  the current block are not counted: they are overhead, not useful work).
- quadratic (dense T x T with a mask): fwd = 2 * B * H * T^2 * (K + V)
- dpa (causal, in d_v / d_k calls of width d_k): fwd = B * H * T^2 * 2 * V
- fwd+bwd = 3.5 * fwd for every form (backward = 2.5 * forward, the usual
  flash-attention convention: dS, dQ, dK, dV plus recomputing P).

Correctness gate: for every shape, each form's forward output (and, for
fwd+bwd, its dq and dv) is compared with the xla form's (relative error
||ref - out|| / ||ref||; tolerance 1e-4 in float32 on CPU; on GPU/TPU 2e-2 for
bfloat16 and 5e-3 for float32, where matmuls may use TF32/bf16 passes). A form
that fails the gate gets its times reported but no ratio ("check failed").
Ratios are xla_time / form_time (> 1: faster than xla).

Writes `benchmarks/results/kernels-<device-tag>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._common import quantized_keys
from tvq_eqx.ops import (
    pallas_kernel_inputs,
    vq_attention_pallas,
    vq_attention_quadratic,
    vq_attention_xla,
)

FORMS = ("pallas", "xla", "quadratic", "dpa", "dpa-cudnn", "summaries")


def flops_fwd(form, *, b, t, h, k, v, s, blk):
    if form in ("pallas", "xla"):
        return 2.0 * b * h * t * (s + 1.5 * blk) * (k + v)
    if form == "quadratic":
        return 2.0 * b * h * t * t * (k + v)
    if form == "summaries":
        return 2.0 * b * h * t * s * v
    return 1.0 * b * h * t * t * (k + k) * (v // k)  # causal dense, v/k calls


def make_fn(form, *, block_len, scale, codebook, mode):
    """fn(q, k, v, cot) -> out (mode fwd) or (out, dq, dv) (mode fwdbwd)."""
    if form == "pallas":

        def attn(q, k, v):
            return vq_attention_pallas(
                q, k, v, codebook, block_len=block_len, scale=scale
            )[0]
    elif form == "xla":

        def attn(q, k, v):
            return vq_attention_xla(
                q, k, v, codebook, block_len=block_len, scale=scale
            )[0]
    elif form == "summaries":

        def attn(q, k, v):
            # Quantization, straight-through keys and every block's cache (the
            # kernels' `cache_mean`; XLA drops the rest of the prologue).
            _, core_args, _ = pallas_kernel_inputs(
                q, k, v, codebook, block_len=block_len, scale=scale
            )
            return core_args[6]
    elif form == "quadratic":

        def attn(q, k, v):
            return vq_attention_quadratic(q, k, v, codebook, scale=scale)
    else:
        impl = "cudnn" if form == "dpa-cudnn" else "xla"

        def attn(q, k, v):
            khat = quantized_keys(k, codebook)
            width = q.shape[-1]
            if v.shape[-1] % width:
                raise ValueError(
                    f"dpa needs d_v ({v.shape[-1]}) to be a multiple of d_k ({width})"
                )
            chunks = [
                jax.nn.dot_product_attention(
                    q,
                    khat,
                    v[..., i : i + width],
                    scale=scale,
                    is_causal=True,
                    implementation=impl,
                )
                for i in range(0, v.shape[-1], width)
            ]
            return jnp.concatenate(chunks, axis=-1)

    if mode == "fwd":
        return jax.jit(lambda q, k, v, cot: attn(q, k, v))

    def fwdbwd(q, k, v, cot):
        out, vjp = jax.vjp(attn, q, k, v)
        if form == "summaries":
            cot = jnp.ones_like(out)
        dq, _, dv = vjp(cot)
        return out, dq, dv

    return jax.jit(fwdbwd)


def time_fn(fn, args, *, reps, min_time):
    out = jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up (the second call is slow on CPU too)
    times = []
    start = time.perf_counter()
    while len(times) < reps or (
        time.perf_counter() - start < min_time and len(times) < 50
    ):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def rel_err(ref, out):
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    return float(np.linalg.norm(ref - out) / max(np.linalg.norm(ref), 1e-30))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device-tag",
        default=None,
        help="name in the output file (default: jax backend)",
    )
    p.add_argument(
        "--seq-lens",
        default=None,
        help="comma-separated T (default: CPU 1024..16384, GPU 1024..131072)",
    )
    p.add_argument("--quick", action="store_true", help="few small shapes, one rep")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d-k", type=int, default=128)
    p.add_argument(
        "--d-v", type=int, default=None, help="default: 1536 on GPU, 256 on CPU"
    )
    p.add_argument("--codes", type=int, default=512)
    p.add_argument("--block-len", type=int, default=512)
    p.add_argument(
        "--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU"
    )
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument(
        "--pallas-max",
        type=int,
        default=None,
        help="largest T for pallas (default: 2048 on CPU, unlimited elsewhere)",
    )
    p.add_argument(
        "--quadratic-max",
        type=int,
        default=None,
        help="largest T for quadratic and dpa-xla (default 16384 on CPU, 32768 on GPU)",
    )
    p.add_argument(
        "--extra-seq-len",
        type=int,
        default=None,
        help="one extra T (e.g. 1048576) for pallas and xla only, if memory allows",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--out", default=None)
    return p


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's settings: the flags with the backend's defaults filled in."""

    tag: str
    dtype: np.dtype
    d_v: int
    seq_lens: list[int]
    reps: int
    min_time: float
    pallas_max: int
    quad_max: int
    forms: list[str]
    tol: float  # the correctness gate's relative error

    @classmethod
    def from_args(cls, args) -> Settings:
        backend = jax.default_backend()
        on_cpu = backend == "cpu"
        dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
        if args.seq_lens:
            seq_lens = [int(x) for x in args.seq_lens.split(",")]
        elif args.quick:
            seq_lens = [1024, 2048]
        elif on_cpu:
            seq_lens = [1024, 2048, 4096, 8192, 16384]
        else:
            seq_lens = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
        forms = [f for f in args.forms.split(",") if f]
        if "dpa-cudnn" in forms and backend != "gpu":
            forms.remove("dpa-cudnn")
        if on_cpu and dtype == jnp.float32:
            tol = 1e-4
        else:
            tol = 5e-3 if dtype == jnp.float32 else 2e-2
        return cls(
            tag=args.device_tag or backend,
            dtype=dtype,
            d_v=args.d_v or (256 if on_cpu else 1536),
            seq_lens=seq_lens,
            reps=1 if args.quick else args.reps,
            min_time=0.0 if args.quick else args.min_time,
            pallas_max=args.pallas_max or (2048 if on_cpu else 1 << 40),
            quad_max=args.quadratic_max or (16384 if on_cpu else 32768),
            forms=forms,
            tol=tol,
        )


def _forms_at(t: int, extra: bool, cfg: Settings) -> list[str]:
    """The forms measured at length `t`, xla first (every other form's
    reference)."""
    forms = []
    for form in ["xla"] + [f for f in cfg.forms if f != "xla"]:
        if form not in cfg.forms:
            continue
        if form == "pallas" and t > cfg.pallas_max:
            continue
        if form in ("quadratic", "dpa") and t > cfg.quad_max:
            continue
        if extra and form not in ("pallas", "xla", "summaries"):
            continue
        forms.append(form)
    return forms


def _random_inputs(t: int, args, cfg: Settings):
    """(q, k, v, cot) `[B, T, H, .]` and the codebook, from the key of `t`."""
    b, h, k, s = args.batch, args.heads, args.d_k, args.codes
    ks = jax.random.split(jax.random.key(t), 5)
    q = jax.random.normal(ks[0], (b, t, h, k), cfg.dtype)
    kk = jax.random.normal(ks[1], (b, t, h, k), cfg.dtype)
    v = jax.random.normal(ks[2], (b, t, h, cfg.d_v), cfg.dtype)
    codebook = jax.random.normal(ks[3], (h, s, k), jnp.float32)
    cot = jax.random.normal(ks[4], (b, t, h, cfg.d_v), cfg.dtype)
    return (q, kk, v, cot), codebook


def _measure(form, mode, t, inputs, codebook, ref, args, cfg: Settings) -> dict:
    """One row: the median time of `form` in `mode` at length `t` and its
    error against the xla form's outputs (kept in `ref[mode]`)."""
    blk = args.block_len
    scale = 1.0 / math.sqrt(args.d_k)
    fn = make_fn(form, block_len=blk, scale=scale, codebook=codebook, mode=mode)
    try:
        sec, out = time_fn(fn, inputs, reps=cfg.reps, min_time=cfg.min_time)
    except Exception as e:  # OOM, unsupported cudnn config, ...
        msg = str(e).splitlines()[0][:100]
        print(f"T={t} {form} {mode}: failed: {msg}", flush=True)
        return dict(
            t=t, form=form, mode=mode, sec=None, err=None, ok=False,
            note=f"failed: {msg}",
        )  # fmt: skip
    outs = out if isinstance(out, tuple) else (out,)
    if form == "summaries":
        err = None
    elif form == "xla":
        ref[mode] = outs
        err = 0.0
    elif mode in ref:
        err = max(rel_err(r, o) for r, o in zip(ref[mode], outs, strict=True))
    else:
        err = None
    ok = (err is not None and err <= cfg.tol) or form == "summaries"
    fl = flops_fwd(
        form, b=args.batch, t=t, h=args.heads, k=args.d_k, v=cfg.d_v, s=args.codes,
        blk=blk,
    )  # fmt: skip
    fl = fl * (3.5 if mode == "fwdbwd" else 1.0)
    print(
        f"T={t:>7} {mode:>6} {form:>10}: {sec * 1e3:10.2f} ms  "
        f"{fl / sec / 1e12:7.3f} TFLOP/s  err={err}",
        flush=True,
    )
    return dict(
        t=t, form=form, mode=mode, sec=sec, err=err, ok=ok, tflops=fl / sec / 1e12,
        note="",
    )  # fmt: skip


def main(argv=None):
    args = _parser().parse_args(argv)
    cfg = Settings.from_args(args)
    rows = []
    todo = [(t, False) for t in cfg.seq_lens]
    if args.extra_seq_len:
        todo.append((args.extra_seq_len, True))
    for t, extra in todo:
        if t % args.block_len:
            print(
                f"skip T={t}: not a multiple of block_len {args.block_len}", flush=True
            )
            continue
        inputs, codebook = _random_inputs(t, args, cfg)
        ref = {}  # the xla form's outputs per mode, measured first
        for mode in ("fwd", "fwdbwd"):
            for form in _forms_at(t, extra, cfg):
                rows.append(_measure(form, mode, t, inputs, codebook, ref, args, cfg))
        # Rewrite the table after every shape, so a run cut short keeps its results.
        write_table(
            rows,
            args=args,
            tag=cfg.tag,
            dtype=cfg.dtype,
            d_v=cfg.d_v,
            tol=cfg.tol,
            pallas_max=cfg.pallas_max,
            quad_max=cfg.quad_max,
            forms=cfg.forms,
        )


def write_table(rows, *, args, tag, dtype, d_v, tol, pallas_max, quad_max, forms):
    dev = jax.devices()[0]
    lines = [
        f"# Kernel benchmark: {tag}",
        "",
        f"Generated by `python benchmarks/kernels.py {' '.join(sys.argv[1:])}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}.",
        "",
        f"- device: {dev.device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPU cores",
        f"- shape: batch {args.batch}, heads {args.heads}, d_k {args.d_k}, d_v {d_v}, "
        f"codes {args.codes}, block_len {args.block_len}, dtype {dtype.name}",
        f"- forms: {', '.join(forms)}; pallas up to T={pallas_max}"
        + (
            " (interpret mode on CPU: this times the Pallas interpreter, not a kernel)"
            if jax.default_backend() == "cpu"
            else ""
        )
        + f"; quadratic and dpa up to T={quad_max}",
        "- times: median wall time after a compile call and a warm-up call; "
        "ratio = xla time / form time (>1 is faster than xla), shown only when "
        f"the form's forward (and dq, dv) match the xla form within {tol:g} "
        "relative error",
        "- TFLOP/s against each form's own FLOP count (see the script's docstring): "
        "pallas/xla 2*B*H*T*(S+1.5L)*(K+V), quadratic 2*B*H*T^2*(K+V), dpa "
        "B*H*T^2*2V (d_v/d_k calls of width d_k); fwd+bwd = 3.5x fwd",
        "",
    ]
    for mode, title in (("fwd", "Forward"), ("fwdbwd", "Forward + backward")):
        lines += [
            f"## {title}",
            "",
            "| T | form | time (ms) | ratio vs xla | TFLOP/s "
            "| max rel err vs xla | check |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        xla_time = {
            r["t"]: r["sec"] for r in rows if r["form"] == "xla" and r["mode"] == mode
        }
        for r in rows:
            if r["mode"] != mode:
                continue
            if r["sec"] is None:
                lines.append(
                    f"| {r['t']} | {r['form']} | — | — | — | — | {r['note']} |"
                )
                continue
            base = xla_time.get(r["t"])
            if r["ok"] and base:
                ratio = f"{base / r['sec']:.2f}x"
            else:
                ratio = "— (check failed)" if not r["ok"] else "—"
            err = (
                "ref"
                if r["form"] == "xla"
                else ("n/a" if r["err"] is None else f"{r['err']:.1e}")
            )
            check = "pass" if r["ok"] else "FAIL"
            if r["form"] == "summaries":
                ratio = f"{100 * r['sec'] / base:.0f}% of xla" if base else "—"
                check = "component"
            lines.append(
                f"| {r['t']} | {r['form']} | {r['sec'] * 1e3:.2f} | {ratio} | "
                f"{r['tflops']:.3f} | {err} | {check} |"
            )
        lines.append("")
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"kernels-{tag}.md"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()

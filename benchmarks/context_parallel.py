"""Context parallelism: per-device memory and step time of one layer against
sequence length and the number of devices the sequence is split over.

```
python benchmarks/context_parallel.py [--preset cpu|quick|micro] [--out DIR]
```

One training step (forward and backward of `loss_fn`) of a one-layer model
on one row of `T` tokens, the sequence split over a `("data", "seq")` mesh
of `1 x n` fake CPU devices (`jax_num_cpu_devices`, set here before JAX
starts). Per-device memory is XLA's compiled estimate (`memory_analysis`:
scratch + arguments + outputs of one device's program); the step time is
measured only up to `time_max_len` tokens (all the fake devices share this
machine's cores, so it shows the cost of the exchange, not a speed-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

MAX_DEVICES = 8

if __name__ == "__main__":  # before JAX starts: the fake devices
    import jax

    jax.config.update("jax_num_cpu_devices", MAX_DEVICES)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (After the device count is set above.)
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tvq_eqx  # noqa: E402
from benchmarks import _common as C  # noqa: E402
from tvq_eqx import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ContextPreset:
    model: tvq_eqx.TransformerConfig
    lengths: tuple[int, ...]
    devices: tuple[int, ...]
    time_max_len: int
    reps: int = 2


_MODEL = tvq_eqx.TransformerConfig(
    n_vocab=256, d_model=64, d_k=32, d_v=64, n_head=1, n_code=64, n_layer=1,
    block_len=256,
)  # fmt: skip
PRESETS = {
    "cpu": ContextPreset(
        model=_MODEL,
        lengths=(65_536, 131_072, 262_144, 524_288, 1_048_576),
        devices=(1, 2, 4, 8),
        time_max_len=131_072,
    ),
    "quick": ContextPreset(
        model=_MODEL,
        lengths=(65_536, 262_144),
        devices=(1, 2, 4, 8),
        time_max_len=65_536,
        reps=1,
    ),  # fmt: skip
    "micro": ContextPreset(
        model=_MODEL.replace(
            d_model=16, d_k=8, d_v=16, n_code=8, block_len=8, mem_len=None
        ),
        lengths=(128,),
        devices=(1, 4),
        time_max_len=128,
        reps=1,
    ),
}


def _step_fn(model):
    """`jax.jit` of the gradient w.r.t. the model's arrays (a plain jit, so
    that the compiled program has XLA's memory analysis)."""
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, batch):
        return tvq_eqx.loss_fn(eqx.combine(params, static), batch, None)[0]

    return params, jax.jit(jax.grad(loss))


def measure(p: ContextPreset, t: int, n: int) -> dict:
    """Compile (and, up to `time_max_len`, time) one step at length `t` on
    `n` devices; the gradients are checked against the one-device step's
    where both are timed."""
    mesh = train.make_mesh(jax.devices()[:n], seq=n) if n > 1 else None
    cfg = (
        p.model if mesh is None else p.model.replace(seq_axis="seq", batch_axis="data")
    )
    model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
    rows = np.random.default_rng(0).integers(0, 256, (1, t + 1))
    batch = dict(
        inputs=jnp.asarray(rows[:, :-1]),
        targets=jnp.asarray(rows[:, 1:]),
        loss_mask=jnp.ones((1, t), jnp.float32),
    )
    params, step = _step_fn(model)
    ctx = jax.set_mesh(mesh) if mesh is not None else _null()
    with ctx:
        t0 = time.perf_counter()
        compiled = step.lower(params, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = C.compiled_memory_bytes(compiled)
        step_s = grads = None
        if t <= p.time_max_len:
            times = C.time_calls(lambda: compiled(params, batch), reps=p.reps)
            step_s = C.median(times)
            grads = compiled(params, batch)
    return dict(t=t, n=n, mem=mem, compile_s=compile_s, step_s=step_s, grads=grads)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _grad_err(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb, strict=True))
    den = sum(float(jnp.sum(y**2)) for y in lb)
    return (num / max(den, 1e-30)) ** 0.5


def run(p: ContextPreset, *, out_dir: Path, tag: str, command: str) -> dict:
    if len(jax.devices()) < max(p.devices):
        raise RuntimeError(
            f"needs {max(p.devices)} devices, JAX has {len(jax.devices())}: run this "
            "file as a script (it sets jax_num_cpu_devices before JAX starts)"
        )
    t_start = time.perf_counter()
    results = []
    for t in p.lengths:
        one_device = None  # the unsharded step's gradients
        for n in p.devices:
            C.log(f"context_parallel: T={t} devices={n}")
            r = measure(p, t, n)
            grads = r.pop("grads")
            if n == 1:
                one_device = grads
            r["grad_err"] = (
                _grad_err(grads, one_device)
                if n > 1 and grads is not None and one_device is not None
                else None
            )
            results.append(r)
    wall = time.perf_counter() - t_start

    by = {(r["t"], r["n"]): r for r in results}
    rows = []
    for t in p.lengths:
        one = by[(t, 1)]["mem"] if (t, 1) in by else None
        for n in p.devices:
            r = by[(t, n)]
            ratio = (one / r["mem"]) if (one and r["mem"]) else None
            rows.append(
                [
                    C.fmt_len(t),
                    n,
                    C.fmt_bytes(r["mem"]),
                    C.fmt_num(ratio, ".2f"),
                    C.fmt_num(r["compile_s"], ".1f"),
                    "—" if r["step_s"] is None else f"{r['step_s']:.2f}",
                    "—" if r["grad_err"] is None else f"{r['grad_err']:.1e}",
                ]
            )
    m = p.model
    lines = C.header_lines(
        f"Context parallelism ({tag})",
        command,
        notes=[
            f"model: 1 layer (2 gated VQ-attention units), d_model {m.d_model}, d_k "
            f"{m.d_k}, d_v {m.d_v}, {m.n_code} codes, block_len {m.block_len}; one "
            "row; one training step (forward + backward of loss_fn)",
            "mesh: data=1 x seq=n fake CPU devices (jax_num_cpu_devices); n = 1 is "
            "the plain (unsharded) step",
            "memory: XLA's compiled per-device estimate (scratch + arguments + "
            "outputs); step time only up to "
            f"{C.fmt_len(p.time_max_len)} tokens (the fake devices share the "
            "machine's cores)",
            f"total wall time {wall / 60:.1f} min",
        ],
    )
    lines += [
        "| T | devices | memory per device | 1-device / this | compile s | step s | grad rel. err vs 1 device |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    md = C.write_text(out_dir / f"context-parallel-{tag}.md", lines)
    png = _plot(p, by, out_dir / f"context-parallel-{tag}.png", command)
    return dict(results=results, markdown=md, plot=png, lines=lines)


def _plot(p, by, path, command):
    fig, (ax,) = C.new_figure()
    for t in p.lengths:
        ns = [n for n in p.devices if by[(t, n)]["mem"]]
        ax.plot(
            ns, [by[(t, n)]["mem"] / 2**20 for n in ns], marker="o",
            label=f"T = {C.fmt_len(t)}",
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(p.devices), [str(n) for n in p.devices])
    ax.set_xlabel("devices the sequence is split over")
    ax.set_ylabel("compiled memory per device (MiB)")
    ax.set_title("One-layer training step, context parallel")
    ax.legend(fontsize=7)
    return C.save_figure(fig, path, command)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    tag = "cpu" if args.preset == "cpu" else f"cpu-{args.preset}"
    out = run(
        PRESETS[args.preset], out_dir=Path(args.out), tag=tag,
        command=C.command_line(),
    )  # fmt: skip
    print("\n".join(out["lines"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

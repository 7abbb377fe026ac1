"""Before/after timing of a change, two checkouts side by side: decode step
time (`benchmarks/decode.py`'s jitted block decode) and train step time
(`benchmarks/scaling.py`'s compiled train step), each checkout in its own
worker process with its own `PYTHONPATH`.

Written for the stacked attention state (issue 23): the "before" checkout
stacks the per-unit state tuple for the layer scan and slices it back on
every call; the "after" checkout scans the stored stacked state as it is.

Each worker builds and compiles every case first (untimed warm-up), then the
driver times them in rounds: each round runs every case `calls` times in the
one worker, then in the other, the order of the two alternating from round
to round, so that load drifts on a shared machine hit both alike. Reported:
per case the median time of each checkout and the ratio after / before of
the medians, with the spread of the per-round ratios.

    python -m benchmarks.state_layout --before /work/wt-state-base \\
        --after . --rounds 15 --out benchmarks/results/state-layout.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (name, kind, settings): small CPU shapes that time in milliseconds.
BASE: dict[str, Any] = dict(
    d_model=64, d_k=32, d_v=64, n_head=1, n_code=64, n_vocab=256
)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("decode vq, 4 layers, batch 1", "decode",
     dict(model=dict(BASE, n_layer=4, block_len=32, attention="vq"), batch=1, context=256)),
    ("decode vq, 4 layers, batch 8", "decode",
     dict(model=dict(BASE, n_layer=4, block_len=32, attention="vq"), batch=8, context=256)),
    ("decode full, 4 layers, batch 1, KV 2k", "decode",
     dict(model=dict(BASE, n_layer=4, block_len=32, attention="full",
                     kv_cache_len=2048 + 32), batch=1, context=2048)),
    ("train vq, 4 layers, batch 2 x 256", "train",
     dict(model=dict(BASE, n_layer=4, block_len=64, attention="vq"), batch=2, seq=256)),
    ("train vq, 1 layer, batch 1 x 1k", "train",
     dict(model=dict(BASE, n_layer=1, block_len=128, attention="vq"), batch=1, seq=1024)),
]  # fmt: skip


# ------------------------------------------------------------------ worker
def _worker(calls: int) -> None:
    """Build every case with the checkout on sys.path, then answer "time i"
    lines on stdin with a JSON list of `calls` call times."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import _common as C
    from benchmarks.decode import _start, decode
    from benchmarks.scaling import compile_step
    from tvq_eqx import Transformer, TransformerConfig

    runners = []
    for _, kind, s in CASES:
        cfg = TransformerConfig(**s["model"])
        model = Transformer(cfg, key=jax.random.key(0))
        rng = np.random.default_rng(1)
        if kind == "decode":
            b, n = s["batch"], s["context"]
            ctx = jnp.asarray(rng.integers(0, cfg.n_vocab, (b, n)), jnp.int32)
            first = jnp.asarray(rng.integers(0, cfg.n_vocab, (b,)), jnp.int32)
            args = (*_start(model, ctx, first, n), jax.random.key(1), jnp.float32(1.0))

            def run_decode(model=model, args=args):
                C.block(decode(model, *args))

            run = run_decode
        else:
            compiled, dyn, batch = compile_step(model, s["batch"], s["seq"])
            box = [dyn]

            def run_train(compiled=compiled, box=box, batch=batch):
                box[0], loss = compiled(box[0], batch)  # donated: carry it on
                C.block(loss)

            run = run_train

        run()  # compile + warm-up, untimed
        runners.append(run)
    import tvq_eqx

    print("ready", tvq_eqx.__file__, flush=True)
    for line in sys.stdin:
        i = int(line.split()[1])
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            runners[i]()
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


# ------------------------------------------------------------------ driver
def _start_worker(tree: Path, calls: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    script = Path(__file__).resolve()
    p = subprocess.Popen(
        # -P: not the script's folder first on sys.path, only the checkout.
        [sys.executable, "-P", str(script), "--worker", "--calls", str(calls)],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    ready, path = p.stdout.readline().split()
    if ready != "ready" or not Path(path).resolve().is_relative_to(tree):
        raise RuntimeError(f"worker for {tree} imported tvq_eqx from {path}")
    return p


def _ask(p: subprocess.Popen, i: int) -> list[float]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"time {i}\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path)
    ap.add_argument("--after", type=Path)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3, help="calls per case per round")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        _worker(args.calls)
        return
    t_start = time.perf_counter()
    before = _start_worker(args.before.resolve(), args.calls)
    after = _start_worker(args.after.resolve(), args.calls)
    times = {(i, w): [] for i in range(len(CASES)) for w in ("before", "after")}
    ratios = {i: [] for i in range(len(CASES))}
    for r in range(args.rounds):
        order = (("before", before), ("after", after))
        if r % 2:
            order = order[::-1]
        for i in range(len(CASES)):
            got = {w: _ask(p, i) for w, p in order}
            for w, ts in got.items():
                times[i, w] += ts
            ratios[i].append(
                statistics.median(got["after"]) / statistics.median(got["before"])
            )
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for p in (before, after):
        assert p.stdin is not None
        p.stdin.close()
        p.wait()
    rows = []
    for i, (name, _, _) in enumerate(CASES):
        b = statistics.median(times[i, "before"])
        a = statistics.median(times[i, "after"])
        q = statistics.quantiles(ratios[i], n=4)
        rows.append(
            f"| {name} | {b * 1e3:.2f} | {a * 1e3:.2f} | **{a / b:.3f}** | "
            f"{q[1]:.3f} ({q[0]:.3f} - {q[2]:.3f}) |"
        )
    import jax

    from benchmarks import _common as C

    cmd = C.command_line()
    lines = C.header_lines(
        "Stacked attention state: step times before / after (cpu)",
        cmd,
        [
            f"before: {args.before}, after: {args.after} (each its own worker process)",
            f"{args.rounds} rounds; each round times every case {args.calls} calls in "
            "one worker then in the other, the order alternating round by round; "
            "compile and one warm-up call untimed",
            "decode: `benchmarks.decode.decode` (a jitted scan decoding one block of "
            "`block_len` tokens from the carried state, state update included) "
            "after `benchmarks.decode._start` fed the context; time per block",
            "train: `benchmarks.scaling.compile_step` (the library's train step, "
            "AdamW, one update segment, donated train state); time per step",
            f"model: d_model 64, d_k 32, d_v 64, 1 head, 64 codes, vocab 256 "
            f"(jax {jax.__version__})",
            f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min; shared "
            "2-core CPU (other jobs running), so read the ratios, not the times",
        ],
    )
    lines += [
        "| case | before ms (median) | after ms (median) | after / before | "
        "per-round after / before: median (quartiles) |",
        "|---|---:|---:|---:|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

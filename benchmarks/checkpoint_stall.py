"""How long a checkpoint stalls the training loop: the synchronous save
(`save_checkpoint`: host copy, serialise, fsync, rename, rotate) against the
asynchronous one `fit` uses (`AsyncCheckpointer.save`: the host copy only;
the files are written in a background thread).

The train state has the `pg19` preset's shapes (d_model 2048, d_v 4096,
n_code 512, Adafactor as the preset) with fewer layers (`--layers`, default
2 of 24: the state grows linearly with the layers, so does the write; the
table gives the bytes so the full preset can be read off). Side by side in
one run, `--reps` each, medians. Writes
`benchmarks/results/checkpoint-stall-<device>.md`.

    python benchmarks/checkpoint_stall.py --layers 2 --reps 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx
import jax

from benchmarks import _common as C


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--preset", default="pg19")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from tvq_eqx import train

    run = train.PRESETS[args.preset]
    run = run.replace(model=dict(n_layer=args.layers), data=dict(batch_size=1))
    ts = train.new_train_state(run)
    state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(eqx.filter(ts, eqx.is_array))
    )
    rows = []
    sync_s, stall_s, write_s = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.reps):
            t0 = time.perf_counter()
            train.save_checkpoint(Path(d) / "sync", ts, step=i + 1, keep=1)
            sync_s.append(time.perf_counter() - t0)
        saver = train.AsyncCheckpointer()
        for i in range(args.reps):
            t0 = time.perf_counter()
            saver.save(Path(d) / "async", ts, step=i + 1, keep=1)
            stall_s.append(time.perf_counter() - t0)
            saver.wait()
            write_s.append(time.perf_counter() - t0)
    sync, stall, total = C.median(sync_s), C.median(stall_s), C.median(write_s)
    rows.append(("synchronous save (before)", f"{sync:.3f}", f"{sync:.3f}", "1.00"))
    rows.append(
        (
            "asynchronous save (fit now)",
            f"{stall:.3f}",
            f"{total:.3f}",
            f"{stall / sync:.3f}",
        )
    )
    lines = C.header_lines(
        "Checkpoint stall of the training loop",
        C.command_line(argv),
        [
            f"train state: the {args.preset} preset's shapes with {args.layers} of "
            f"{train.PRESETS[args.preset].model.n_layer} layers, "
            f"{state_bytes / 2**30:.2f} GiB (parameters and optimizer state); "
            f"medians of {args.reps}",
            "stall: how long the loop waits; write: until the files are durable",
        ],
    )
    lines += C.markdown_table(
        ["save", "stall (s)", "write done (s)", "stall / synchronous"], rows
    )
    out = (
        Path(args.out)
        if args.out
        else C.RESULTS_DIR / f"checkpoint-stall-{C.device_tag()}.md"
    )
    C.write_text(out, lines)
    C.log(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

"""Codebook initialisation and dead-code restart (issue 24, item 7): the
recall benchmark's `vq` variant and the regime benchmark's `vq` variant,
each trained per seed with today's (official) init, the k-means init, and
the k-means init with dead-code restart (`tvq_eqx.train.CodebookConfig`).

```
python -m benchmarks.codebook_init run recall|regime [--preset cpu] [--seeds 0 1 2]
                                   [--options official kmeans kmeans_restart]
                                   [--out DIR]
python -m benchmarks.codebook_init report [--out DIR]
```

`run` writes one JSON file per (benchmark, option, seed) under
`DIR/codebook-init-runs/` as it finishes (a stopped measurement keeps what
it has; a run whose file exists is skipped); `report` turns them into
`DIR/codebook-init-cpu.md` (mean ± sample sd over seeds, per option).
Training and scoring are the benchmarks' own (`recall.train_one`,
`quality.train_one` + `regime.evaluate_positions`); only the codebook
procedure differs, and every option of a seed sees the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import _common as C
from benchmarks import registry
from tvq_eqx import train

# The options compared: name -> CodebookConfig (the restart: codes below a
# tenth of their head's mean count, checked every 10 batches).
OPTIONS: dict[str, train.CodebookConfig] = {
    "official": train.CodebookConfig(),
    "kmeans": train.CodebookConfig(init="kmeans", kmeans_iters=10),
    "kmeans_restart": train.CodebookConfig(
        init="kmeans", kmeans_iters=10, restart_threshold=0.1, restart_every=10
    ),
    "restart": train.CodebookConfig(restart_threshold=0.1, restart_every=10),
}
RUNS_DIR = "codebook-init-runs"


def _run_recall(preset: str, option: str, seed: int) -> dict:
    from benchmarks import recall

    p = registry.preset("recall", preset)
    name, cfg = next((n, c) for n, c in recall.variant_configs(p) if n == "vq")
    ev = recall.eval_set(p)
    res = recall.train_one(name, cfg, p, seed, ev, codebook=OPTIONS[option])
    far = [r["acc"] for d, r in res["by_distance"].items() if d >= 2]
    far_bits = [r["bits"] for d, r in res["by_distance"].items() if d >= 2]
    return dict(
        acc_far=float(np.mean(far)),
        bits_far=float(np.mean(far_bits)),
        acc_d1=float(res["by_distance"][1]["acc"]),
        last_train_bits=float(res["curve"][-1][1]),
        ok=bool(res["ok"]),
        train_s=float(res["train_s"]),
    )


def _run_regime(preset: str, option: str, seed: int) -> dict:
    import dataclasses

    from benchmarks import quality, regime
    from tvq_eqx import data

    p = registry.preset("regime", preset)
    text, _ = regime.load_corpus(p, None)
    splits = data.split_bytes(text)
    heldout = np.concatenate([splits[s] for s in p.eval_splits])
    name, cfg = next((n, c) for n, c in regime.variant_configs(p) if n == "vq")
    q = dataclasses.replace(p.quality, seed=seed)
    res = quality.train_one(name, cfg, q, splits, codebook=OPTIONS[option])
    pos = regime.evaluate_positions(res.pop("model"), cfg, p, heldout)
    out = dict(
        val_bpb=float(res["bpb"]),
        ok=bool(res["ok"] and all(e["finite"] for e in pos.values())),
        train_s=float(res["train_s"]),
        used_fraction=float(res["usage"]["used_fraction"]),
        perplexity=float(res["usage"]["perplexity"]),
    )
    for m, e in pos.items():
        out[f"bpb_{m}x"] = float(e["bpb"])
    return out


def run(bench: str, preset: str, options, seeds, out: Path) -> None:
    runs = out / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    fn = _run_recall if bench == "recall" else _run_regime
    for seed in seeds:
        for option in options:
            path = runs / f"{bench}-{preset}-{option}-seed{seed}.json"
            if path.exists():
                continue
            C.log(f"codebook-init: {bench} ({preset}) {option} seed {seed}")
            t0 = time.perf_counter()
            res = fn(preset, option, seed)
            res.update(
                bench=bench,
                preset=preset,
                option=option,
                seed=seed,
                wall_s=time.perf_counter() - t0,
            )
            path.write_text(json.dumps(res, indent=1))
            C.log(f"  -> {json.dumps(res)}")


_COLUMNS = {
    "recall": [
        ("acc_far", "accuracy, d 2-16", "{:.3f}"),
        ("bits_far", "bits/answer, d 2-16", "{:.3f}"),
        ("acc_d1", "accuracy, d 1", "{:.3f}"),
        ("last_train_bits", "last train bits", "{:.3f}"),
        ("train_s", "train s", "{:.0f}"),
    ],
    "regime": [
        ("val_bpb", "val bpb", "{:.4f}"),
        ("bpb_1x", "1x bpb", "{:.4f}"),
        ("bpb_4x", "4x bpb", "{:.4f}"),
        ("bpb_16x", "16x bpb", "{:.4f}"),
        ("used_fraction", "codes used", "{:.3f}"),
        ("perplexity", "code perplexity", "{:.1f}"),
        ("train_s", "train s", "{:.0f}"),
    ],
}


def _cell(xs, fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs, ddof=1))}"


def report(out: Path) -> Path:
    rows = [json.loads(p.read_text()) for p in sorted((out / RUNS_DIR).glob("*.json"))]
    lines = C.header_lines(
        "Codebook initialisation and dead-code restart (cpu)",
        C.command_line(),
        notes=[
            "options: "
            + "; ".join(
                f"{k} = CodebookConfig({', '.join(f'{f}={getattr(v, f)!r}' for f in ('init', 'kmeans_iters', 'restart_threshold', 'restart_every'))})"
                for k, v in OPTIONS.items()
            ),
            "mean ± sample sd over the seeds listed; runs failing the benchmarks' "
            "gate (finite losses, one call == two streamed halves) are left out",
        ],
    )
    for bench in ("recall", "regime"):
        mine = [r for r in rows if r["bench"] == bench]
        if not mine:
            continue
        cols = _COLUMNS[bench]
        presets = sorted({r["preset"] for r in mine})
        for preset in presets:
            lines += ["", f"## {bench} benchmark, vq variant (preset {preset})", ""]
            lines.append("| option | seeds | " + " | ".join(c[1] for c in cols) + " |")
            lines.append("|---|---|" + "---:|" * len(cols))
            for option in OPTIONS:
                rs = [
                    r
                    for r in mine
                    if r["preset"] == preset and r["option"] == option and r["ok"]
                ]
                bad = [
                    r
                    for r in mine
                    if r["preset"] == preset and r["option"] == option and not r["ok"]
                ]
                if not rs and not bad:
                    continue
                seeds = ",".join(str(r["seed"]) for r in rs)
                if bad:
                    seeds += f" (failed: {','.join(str(r['seed']) for r in bad)})"
                cells = [_cell([r[k] for r in rs if k in r], f) for k, _, f in cols]
                lines.append(f"| {option} | {seeds} | " + " | ".join(cells) + " |")
            lines += ["", "Per run:", ""]
            lines.append("| option | seed | " + " | ".join(c[1] for c in cols) + " |")
            lines.append("|---|---:|" + "---:|" * len(cols))
            for r in sorted(
                (r for r in mine if r["preset"] == preset),
                key=lambda r: (list(OPTIONS).index(r["option"]), r["seed"]),
            ):
                cells = [f.format(r[k]) if k in r else "-" for k, _, f in cols]
                lines.append(
                    f"| {r['option']} | {r['seed']} | " + " | ".join(cells) + " |"
                )
    md = out / "codebook-init-cpu.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codebook_init")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("bench", choices=("recall", "regime"))
    r.add_argument("--preset", default="cpu")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument(
        "--options",
        nargs="+",
        default=["official", "kmeans", "kmeans_restart"],
        choices=list(OPTIONS),
    )
    r.add_argument("--out", default=str(C.RESULTS_DIR))
    rep = sub.add_parser("report")
    rep.add_argument("--out", default=str(C.RESULTS_DIR))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.cmd == "run":
        run(args.bench, args.preset, args.options, args.seeds, out)
    else:
        print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

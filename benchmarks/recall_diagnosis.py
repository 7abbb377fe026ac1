"""Codebook health of the recall benchmark's vq model during training
(issue 25, item 1: diagnose why the lookup through quantized keys is learned
slowly and by some seeds only).

    python -m benchmarks.recall_diagnosis --preset cpu --seeds 0 1 2 3 4

trains the `vq` variant of a recall preset (`benchmarks.recall.train_one`,
the same batches and initialisation as the benchmark's runs of those seeds)
and every `--every` updates measures, on a fixed probe batch of the task
(`PROBE_SEED`, distances balanced), for every attention unit (`u0`, `u1`, ...
in call order: two per layer) and head:

- `perplexity`: exp of the entropy of the code assignments of all probe keys
  (at most `n_code`);
- `dead_probe`: codes no probe key is assigned to; `dead_ema`: codes whose EMA
  count (`VectorQuantizer.codebook_count`, the codebook's running number of
  keys per training batch) is below `EMA_DEAD` times the mean count;
- `rel_err`: `sum ||k - k^||^2 / sum ||k||^2` over the probe keys (unscaled
  key space);
- `commit`: the unit's official commit term on the probe batch
  (`commit_sum / (B T)`, what `loss_fn` multiplies by `c_beta`);
- `shared_key`: fraction of the probe's queries whose key at the query's
  answer position (input = the queried key) and key at the stored pair's key
  byte get the same code;
- `value_weight`, `key_weight`: for queries whose pair lies before the
  query's window (in the compressive cache), `1 / n` with `n` the number of
  cached positions (before the window) sharing the code of the pair's value
  byte (key byte): the weight of the pair in that code's cached value mean,
  1 when the pair has its code to itself;
- `acc_far`: answer accuracy on the probe's queries beyond the window.

Per head, the report gives the mean over heads and, for the rates, the max.
The keys come from `unit_keys`, a forward pass unit by unit that equals the
model's own call (tested). Training-step `commit_loss` and `code_perplexity`
(`tvq_eqx.loss.codebook_metrics`, over the training batch) are averaged over
each interval. The final accuracy is the benchmark's (`recall.evaluate` on its
held-out set).

Writes `benchmarks/results/recall-diagnosis-<tag>.json`, `.md` and `.png`
after every seed (so a stopped run leaves the seeds it finished); `--resume`
keeps the seeds already in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import Transformer
from tvq_eqx.ops import quantize
from tvq_eqx.ops._common import gather_codes

from . import _common as C
from . import recall
from .registry import RECALL, RecallPreset

PROBE_SEED = 2**20 + 11  # neither a training seed nor the evaluation set's
PROBE_SEQS = 128
LEARNED = 0.7  # final accuracy beyond the window that counts as "learned"
# A code is dead on the EMA when its count (keys per training batch, as a
# moving average) is below this fraction of the mean count: relative, since
# the counts start at 1 and grow towards the batch's share over ~1/(1 - c_gamma)
# updates.
EMA_DEAD = 0.01
UNIT_METRICS = (
    "perplexity",
    "dead_probe",
    "dead_ema",
    "rel_err",
    "commit",
    "shared_key",
    "value_weight",
    "key_weight",
)


class AllKeysCodebook(Transformer):
    """Experiment (`--codebook-keys all`): the model ignores the `mask`
    argument, so the codebook's EMA statistics and the commit term use every
    position's key. With the benchmark's batches `loss_fn` passes the loss
    mask (1 at the answers only) as that mask, so the preset's codebook learns
    from the answer positions' keys only (one of `seq_len` per sequence); the
    LM loss still counts the answers only (`loss_fn` applies the loss mask to
    the log-probabilities itself)."""

    def __call__(self, tokens, state=None, *, mask=None, **kw):
        del mask
        return super().__call__(tokens, state, **kw)


MAKE_MODEL = {"loss_mask": Transformer, "all": AllKeysCodebook}


# ---------------------------------------------------------------------------
# Keys and codes


def unit_keys(model: Transformer, tokens):
    """(log-probabilities `[B, T, V]`, keys `[units, B, T, H, d_k]`) of one
    call from an empty state without dropout, run unit by unit so the keys
    each unit quantizes can be read off; it equals `model(tokens)` (tested).
    """
    c = model.config
    dt = c.jnp_dtype
    b, t = tokens.shape
    x = model.embedding(tokens).astype(dt)
    if model.position_embedding is not None:
        pe = model.position_embedding(jnp.arange(t)).reshape(1, t, -1)
        x = x + pe.astype(dt)
    keys = []
    for layer in model.layers:
        y = x
        for unit in layer.units:
            # The unit's own projections (what it quantizes): the keys after
            # the q/k norm, before the quantizer.
            _, k, _, _ = unit._projections(y.astype(dt))
            keys.append(k)
            res, _, _ = unit(y, unit.init_state(b))
            y = y + res
        x = y  # no LayerDrop at evaluation: both layerdrop modes add the units
    if model.out_norm is not None:
        x = model.out_norm(x)
    tied = model.embedding.weight if model.head.weight is None else None
    logp = jax.nn.log_softmax(model.head(x, tied), axis=-1)
    return logp, jnp.stack(keys)


@eqx.filter_jit
def _probe_arrays(model: Transformer, tokens):
    """Codes and per-unit, per-head sums of the probe batch."""
    logp, keys = unit_keys(model, tokens)
    units = model.attention_units()
    codes, counts, sq_err, sq_norm, commit, ema = [], [], [], [], [], []
    b, t = tokens.shape
    for k, unit in zip(keys, units, strict=True):
        q = unit.quantizer
        cb = q.codebook
        z = quantize(k, cb)  # [B, T, H]
        k32 = k.astype(jnp.float32)
        sq = jnp.sum(jnp.square(k32 - gather_codes(cb, z)), axis=-1)  # [B, T, H]
        codes.append(z)
        counts.append(
            jnp.sum(jax.nn.one_hot(z, cb.shape[1], dtype=jnp.float32), axis=(0, 1))
        )
        sq_err.append(jnp.sum(sq, axis=(0, 1)))
        sq_norm.append(jnp.sum(jnp.square(k32), axis=(0, 1, 3)))
        # The official commit term (`VectorQuantizer.statistics`).
        stats = q.statistics(k, jnp.ones((b, t), jnp.float32))
        commit.append(stats["commit_sum"] / (b * t))
        ema.append(q.codebook_count)
    return dict(
        logp=logp,
        codes=jnp.stack(codes),
        counts=jnp.stack(counts),
        sq_err=jnp.stack(sq_err),
        sq_norm=jnp.stack(sq_norm),
        commit=jnp.stack(commit),
        ema_count=jnp.stack(ema),
    )


# ---------------------------------------------------------------------------
# Probe metrics


def probe_batch(p: RecallPreset) -> dict[str, np.ndarray]:
    """The fixed probe sequences, with the positions of every query's answer
    and of its pair's key byte."""
    batch = recall.batch_of(
        p, np.random.default_rng(PROBE_SEED), PROBE_SEQS, balanced=True
    )
    rows, ans = np.nonzero(batch["loss_mask"] > 0)
    pair = np.empty_like(ans)
    for j, (i, a) in enumerate(zip(rows, ans, strict=True)):
        (where,) = np.nonzero(batch["inputs"][i, :a] == batch["inputs"][i, a])
        if len(where) != 1:  # the generator's promise (tested there)
            raise AssertionError(f"query {i},{a}: key seen {len(where)} times")
        pair[j] = where[0]
    batch.update(q_row=rows, q_ans=ans, q_pair=pair)
    return batch


def _entropy(counts: np.ndarray) -> np.ndarray:
    total = np.maximum(counts.sum(-1, keepdims=True), 1.0)
    pr = counts / total
    return -np.sum(np.where(pr > 0, pr * np.log(np.where(pr > 0, pr, 1.0)), 0.0), -1)


def probe_metrics(model: Transformer, probe: dict[str, np.ndarray]) -> dict:
    """Per unit (`u0`, `u1`, ...): each of `UNIT_METRICS` as the mean over
    heads (and `<name>_max`, the max over heads, for the rates), plus the
    probe's accuracy beyond the window `acc_far` (see the module docstring)."""
    c = model.config
    assert c.mem_len is not None  # TransformerConfig fills the default
    arr = jax.device_get(_probe_arrays(model, jnp.asarray(probe["inputs"])))
    codes = np.asarray(arr["codes"])  # [U, B, T, H]
    rows, ans, pair = probe["q_row"], probe["q_ans"], probe["q_pair"]
    dist = probe["distance"][rows, ans]
    win_start = (ans // c.block_len) * c.block_len - c.mem_len
    far = np.asarray(
        [recall.out_of_window(int(d), c.block_len, c.mem_len) for d in dist]
    )
    out: dict = {}
    correct = np.argmax(arr["logp"][rows, ans], -1) == probe["targets"][rows, ans]
    out["acc_far"] = float(correct[far].mean()) if far.any() else math.nan
    for u in range(codes.shape[0]):
        z = codes[u]
        per_head = {
            "perplexity": np.exp(_entropy(arr["counts"][u])),
            "dead_probe": (arr["counts"][u] == 0).sum(-1).astype(float),
            "dead_ema": (
                arr["ema_count"][u]
                < EMA_DEAD * arr["ema_count"][u].mean(-1, keepdims=True)
            )
            .sum(-1)
            .astype(float),
            "rel_err": arr["sq_err"][u] / np.maximum(arr["sq_norm"][u], 1e-30),
            "shared_key": (z[rows, pair] == z[rows, ans]).mean(0),
        }
        for name, off in (("key_weight", 0), ("value_weight", 1)):
            w = []
            for i, p_, s in zip(
                rows[far], pair[far] + off, win_start[far], strict=True
            ):
                # Cached positions: everything before the query's window.
                n = (z[i, :s] == z[i, p_][None, :]).sum(0)  # [H], >= 1 (p_ < s)
                w.append(1.0 / n)
            per_head[name] = np.mean(w, 0) if w else np.full(z.shape[-1], math.nan)
        for name, v in per_head.items():
            out[f"u{u}.{name}"] = float(np.mean(v))
            if name in ("shared_key", "value_weight", "key_weight"):
                out[f"u{u}.{name}_max"] = float(np.max(v))
        out[f"u{u}.commit"] = float(arr["commit"][u])
    return out


# ---------------------------------------------------------------------------
# Training with the probe


def diagnose_seed(
    p: RecallPreset,
    seed: int,
    ev,
    probe,
    *,
    every: int,
    optimizer,
    make_model=Transformer,
):
    """Train the `vq` variant from `seed`, probing every `every` updates."""
    name, config = next((n, c) for n, c in recall.variant_configs(p) if n == "vq")
    trajectory: list[dict] = []
    window: list[dict] = []
    probe_s = [0.0]

    def on_update(step, ts, metrics):
        if metrics is not None:
            window.append(
                {k: float(metrics[k]) for k in ("commit_loss", "code_perplexity")}
            )
        if step % every == 0 or step == p.steps:
            t0 = time.perf_counter()
            row = dict(step=step, **probe_metrics(ts.model, probe))
            for k in ("commit_loss", "code_perplexity"):
                row[f"train_{k}"] = (
                    float(np.mean([w[k] for w in window])) if window else math.nan
                )
            window.clear()
            trajectory.append(row)
            probe_s[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    r = recall.train_one(
        name,
        config,
        p,
        seed,
        ev,
        optimizer=optimizer,
        on_update=on_update,
        make_model=make_model,
    )
    far = [v["acc"] for d, v in r["by_distance"].items() if d >= 2]
    return dict(
        seed=seed,
        acc_far=float(np.mean(far)),
        by_distance={str(d): v for d, v in r["by_distance"].items()},
        ok=bool(r["ok"]),
        last_bits=r["curve"][-1][1],
        wall_s=time.perf_counter() - t0,
        probe_s=probe_s[0],
        trajectory=trajectory,
    )


# ---------------------------------------------------------------------------
# Report


def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _fmt_rho(rho: float) -> str:
    return "constant" if math.isnan(rho) else f"{rho:+.2f}"


def _row_at(run, step):
    return min(run["trajectory"], key=lambda r: abs(r["step"] - step))


def write_report(
    p,
    runs,
    *,
    md: Path,
    png: Path,
    command: str,
    every: int,
    tag: str,
    codebook_keys: str = "loss_mask",
):
    runs = sorted(runs, key=lambda r: r["seed"])
    n_units = 2 * p.model.n_layer
    m = p.model
    notes = [
        f"model and task: the recall preset's `vq` variant ({m.n_layer} layer, "
        f"{n_units} attention units, heads {m.n_head}, codes {m.n_code}, d_k "
        f"{m.d_k}, c_beta {m.c_beta}, c_gamma {m.c_gamma}); {p.steps} updates of "
        f"{p.batch_size} sequences of {p.seq_len} (as `recall-cpu.md`)",
        f"probe: {PROBE_SEQS} fixed sequences (seed {PROBE_SEED}, distances "
        f"balanced), measured every {every} updates; dead_ema: EMA count < "
        f"{EMA_DEAD:g} x the mean count; u0, u1: the attention units in call order",
        "final acc: the benchmark's held-out set, accuracy beyond the window (d >= 2)",
        "codebook keys: "
        + (
            "the loss mask's (the answers only: `loss_fn` passes the loss mask "
            "to the model, which weighs the codebook statistics and the commit "
            "term by it), as the benchmark's runs"
            if codebook_keys == "loss_mask"
            else "every position's (experiment: `AllKeysCodebook`, the model "
            "ignores the mask; the LM loss still counts the answers only)"
        ),
    ]
    lines = C.header_lines(f"Recall: codebook diagnosis ({tag})", command, notes)
    cols = ["perplexity", "dead_probe", "dead_ema", "rel_err", "commit", "shared_key",
            "value_weight", "key_weight"]  # fmt: skip
    steps = sorted({min(p.steps, s) for s in (50, 100, 250, p.steps)})
    for step in steps:
        lines += [f"## At update {step}", ""]
        rows = []
        for r in runs:
            row = _row_at(r, step)
            for u in range(n_units):
                rows.append(
                    [r["seed"], f"{r['acc_far']:.3f}", f"{row['acc_far']:.3f}", f"u{u}"]
                    + [f"{row[f'u{u}.{k}']:.3g}" for k in cols]
                )
        lines += C.markdown_table(
            ["seed", "final acc", "probe acc", "unit", *cols],
            rows,
            "rrrl" + "r" * len(cols),
        )
        lines += [""]
    # Rank correlation of each metric (per unit) with the final accuracy.
    if len(runs) >= 3:
        lines += [
            "## Spearman rank correlation with the final accuracy (over seeds)",
            "",
        ]
        rows = []
        for u in range(n_units):
            for k in cols:
                rows.append(
                    [f"u{u}.{k}"]
                    + [
                        _fmt_rho(
                            _spearman(
                                [_row_at(r, s)[f"u{u}.{k}"] for r in runs],
                                [r["acc_far"] for r in runs],
                            )
                        )
                        for s in steps
                    ]
                )
        for k in ("train_commit_loss", "train_code_perplexity"):
            rows.append(
                [k]
                + [
                    _fmt_rho(
                        _spearman(
                            [_row_at(r, s)[k] for r in runs],
                            [r["acc_far"] for r in runs],
                        )
                    )
                    for s in steps
                ]
            )
        lines += C.markdown_table(["metric", *[f"update {s}" for s in steps]], rows)
        lines += [""]
    lines += _separation_section(runs, cols, steps, n_units)
    lines += ["## Runs", ""]
    lines += C.markdown_table(
        ["seed", "final acc d>=2", "last train bits", "wall s", "probe s", "check"],
        [
            [
                r["seed"],
                f"{r['acc_far']:.3f}",
                f"{r['last_bits']:.3f}",
                f"{r['wall_s']:.0f}",
                f"{r['probe_s']:.0f}",
                "pass" if r["ok"] else C.CHECK_FAILED,
            ]
            for r in runs
        ],  # fmt: skip
    )
    lines += ["", f"![codebook health over training]({png.name})", ""]
    C.write_text(md, lines)
    return lines


def _separation_section(runs, cols, steps, n_units) -> list[str]:
    """Per metric and checkpoint: the ranges over the learned seeds (final
    accuracy >= `LEARNED`) and over the others, and whether they are apart."""
    good = [r for r in runs if r["acc_far"] >= LEARNED]
    bad = [r for r in runs if r["acc_far"] < LEARNED]
    if not good or not bad:
        return []
    lines = [
        f"## Separation: learned seeds (final acc >= {LEARNED}: "
        f"{', '.join(str(r['seed']) for r in good)}) against the others "
        f"({', '.join(str(r['seed']) for r in bad)})",
        "",
        "min-max over each group; apart: the ranges do not overlap.",
        "",
    ]
    rows = []
    for u in range(n_units):
        for k in cols:
            row = [f"u{u}.{k}"]
            for s in steps:
                g = [_row_at(r, s)[f"u{u}.{k}"] for r in good]
                b = [_row_at(r, s)[f"u{u}.{k}"] for r in bad]
                apart = min(g) > max(b) or max(g) < min(b)
                row.append(
                    f"{min(g):.3g}-{max(g):.3g} / {min(b):.3g}-{max(b):.3g}"
                    + (" **apart**" if apart else "")
                )
            rows.append(row)
    lines += C.markdown_table(
        ["metric", *[f"update {s}: learned / not" for s in steps]], rows
    )
    return lines + [""]


def plot(p, runs, png: Path, command: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["seed"])
    n_units = 2 * p.model.n_layer
    panels = ["acc_far", "perplexity", "dead_probe", "rel_err", "commit",
              "shared_key", "value_weight", "key_weight"]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes.ravel(), panels, strict=True):
        for j, r in enumerate(runs):
            color = cmap(j / max(1, len(runs) - 1))
            xs = [row["step"] for row in r["trajectory"]]
            keys = (
                ["acc_far"]
                if name == "acc_far"
                else [f"u{u}.{name}" for u in range(n_units)]
            )
            for u, k in enumerate(keys):
                ax.plot(
                    xs,
                    [row[k] for row in r["trajectory"]],
                    ls=("-", "--", ":", "-.")[u % 4],
                    color=color,
                    label=(
                        f"seed {r['seed']} (acc {r['acc_far']:.2f})" if u == 0 else None
                    ),
                )
        ax.set(
            title=name + ("" if name == "acc_far" else " (— u0, -- u1)"),
            xlabel="update",
        )
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(recall.CHANCE, color="gray", lw=1, ls="--")
    axes[0, 0].legend(fontsize=7)
    C.save_figure(fig, png, command)


def report(p, runs, md, png, command, args, tag):
    write_report(
        p,
        runs,
        md=md,
        png=png,
        command=command,
        every=args.every,
        tag=tag,
        codebook_keys=args.codebook_keys,
    )
    plot(p, runs, png, command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Codebook health of the recall benchmark's vq model"
    )
    ap.add_argument("--preset", default="cpu", choices=sorted(RECALL))
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the .md and .png from the .json, training nothing",
    )
    ap.add_argument(
        "--codebook-keys",
        default="loss_mask",
        choices=sorted(MAKE_MODEL),
        help="which keys train the codebook: the loss mask's (the benchmark's "
        "runs, default) or every position's (experiment; '-allkeys' files)",
    )
    args = ap.parse_args(argv)
    if args.every < 1:
        raise ValueError(f"--every must be >= 1; got {args.every}")
    p = RECALL[args.preset]
    seeds = list(p.seeds if args.seeds is None else args.seeds)
    tag = C.device_tag() + ("" if args.preset == "cpu" else f"-{args.preset}")
    if args.codebook_keys != "loss_mask":
        tag += "-allkeys"
    out = Path(args.out)
    js, md, png = (out / f"recall-diagnosis-{tag}.{e}" for e in ("json", "md", "png"))
    command = "python -m benchmarks.recall_diagnosis " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    resume = args.resume or args.report_only
    saved = json.loads(js.read_text()) if resume and js.exists() else {}
    runs = saved.get("runs", [])
    if args.report_only:
        if not runs:
            raise ValueError(f"--report-only: no runs in {js}")
        # The report says how the runs were made, not how it was rewritten.
        command, args.every = saved.get("command", command), saved["every"]
        report(p, runs, md, png, command, args, tag)
        return 0
    done = {r["seed"] for r in runs}
    ev, probe, opt = recall.eval_set(p), probe_batch(p), recall.make_optimizer(p)
    for seed in seeds:
        if seed in done:
            continue
        C.log(f"recall diagnosis: seed {seed}")
        runs.append(
            diagnose_seed(
                p,
                seed,
                ev,
                probe,
                every=args.every,
                optimizer=opt,
                make_model=MAKE_MODEL[args.codebook_keys],
            )
        )
        out.mkdir(parents=True, exist_ok=True)
        js.write_text(
            json.dumps(
                dict(preset=args.preset, every=args.every, command=command, runs=runs),
                indent=1,
            )
        )
        report(p, runs, md, png, command, args, tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

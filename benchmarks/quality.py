"""Quality benchmark: vq vs full vs window attention at identical budgets,
plus a codebook-size sweep, on a byte corpus.

Every model has the same parameter arrays and initial values (the codebook is
present in all; full attention does not use it; window attention, the
official code's `agg_cache=False` baseline, quantizes keys but has no
compressive cache and attends over a sliding window of the last `mem_len`
tokens), is trained by the library's loop (`tvq_eqx.train.fit`, the one the
command line runs) on the same `TokenStream` batches (same order, carried
attention state between batches), for the same number of updates. Reported:
validation bits per byte over the validation split with the carried state
(`tvq_eqx.train.evaluate_stream`), the learning curves, and
codebook usage on the validation split (fraction of codes used and the
perplexity of the code distribution, per attention unit, averaged).

Correctness gate: after training, each model's log-probabilities on a
validation window computed in one call must equal those computed in two
halves with the carried state (the streaming invariant that evaluation and
sampling rely on), and every loss must be finite. Ratios between models are
printed only when both models pass; otherwise the cell says CHECK FAILED.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import data, train

from . import _common as C
from .registry import QualityPreset

STREAM_TOL = 1e-4  # max |logp one call - logp streamed| (float32, CPU)


def model_configs(p: QualityPreset) -> list[tuple[str, object]]:
    """(name, TransformerConfig) of every model trained: vq, full, window,
    then the codebook sweep (sizes other than the main model's)."""
    base = p.model.replace(kv_cache_len=p.kv_cache_len)
    out = [
        ("vq", base.replace(attention="vq")),
        ("full", base.replace(attention="full")),
        ("window", base.replace(attention="window")),
    ]
    for s in p.code_sweep:
        if s != base.n_code:
            out.append((f"vq-{s}", base.replace(attention="vq", n_code=s)))
    if p.models is not None:
        out = [(n, c) for n, c in out if n in p.models]
    return out


def count_params(model) -> tuple[int, int]:
    """(trainable parameters, codebook entries) of a model."""
    labels = train.param_labels(eqx.filter(model, eqx.is_inexact_array))
    arrays = eqx.filter(model, eqx.is_inexact_array)
    main = code = 0
    for x, lab in zip(jax.tree.leaves(arrays), jax.tree.leaves(labels), strict=False):
        if lab == "codebook":
            code += x.size
        else:
            main += x.size
    return main, code


@eqx.filter_jit
def _one_vs_two(model, tokens):
    c = model.config
    b, t = tokens.shape
    half = (t // 2) // c.block_len * c.block_len or c.block_len
    one, _, _ = model(tokens, model.init_state(b))
    a, st, _ = model(tokens[:, :half], model.init_state(b))
    if half < t:
        bb, _, _ = model(tokens[:, half:], st)
        two = jnp.concatenate([a, bb], axis=1)
    else:
        two = a
    return jnp.max(jnp.abs(one - two)), jnp.all(jnp.isfinite(one))


def stream_check(model, tokens: np.ndarray) -> tuple[bool, float]:
    """One call vs two halves with the carried state on `tokens` [B, T]."""
    err, finite = _one_vs_two(model, jnp.asarray(tokens, jnp.int32))
    err = float(err)
    return bool(finite) and err <= STREAM_TOL, err


def check(model, tokens) -> tuple[bool, float]:
    """The correctness gate (module-level so tests can force a failure)."""
    return stream_check(model, tokens)


@eqx.filter_jit
def _code_counts(model, state, inputs):
    _, state, aux = model(inputs, state)
    return state, aux["vq"]["code_count"]  # [units, heads, codes]


def codebook_usage(model, batches) -> dict[str, float]:
    """Fraction of codes used and code-distribution perplexity on `batches`
    (the quantized keys of every unit, averaged over units and heads)."""
    total = None
    state = None
    for batch in batches:
        x = jnp.asarray(batch["inputs"])
        state = model.init_state(x.shape[0]) if state is None else state
        state, counts = _code_counts(model, state, x)
        total = counts if total is None else total + counts
    counts = np.asarray(total, np.float64)
    p = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return dict(
        used_fraction=float(np.mean(counts > 0)),
        perplexity=float(np.mean(np.exp(ent))),
    )


def run_config(p: QualityPreset, config) -> train.RunConfig:
    """The `RunConfig` every model of preset `p` is trained with by
    `tvq_eqx.train.fit`: one update per batch (`update_len = seq_len`),
    AdamW, the curve evaluated on the first `curve_eval_batches` validation
    windows every `eval_every` updates, the carried state emptied per
    `context_len`."""
    return train.RunConfig(
        model=config,
        data=train.DataConfig(batch_size=p.batch_size, seq_len=p.seq_len),
        optimizer=train.OptimizerConfig(
            name="adamw", learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
            weight_decay=p.weight_decay, grad_clip=p.grad_clip,
        ),
        steps=p.steps, update_len=p.seq_len, context_len=p.context_len,
        eval_every=p.eval_every, eval_batches=max(1, p.curve_eval_batches),
        log_every=1, sample_len=0, seed=p.seed,
    )  # fmt: skip


class _Recorder(train.Callback):
    """The learning curves and step times of one `fit`: compile = the first
    step, train time = the other steps (evaluations excluded); stops at a
    non-finite loss."""

    def __init__(self, name: str, log):
        self.name, self.log = name, log
        self.train_curve, self.val_curve = [], []
        self.t_train, self.t_compile = 0.0, None

    def on_start(self, **_):
        self.t_prev = time.perf_counter()

    def on_log(self, record):
        now = time.perf_counter()  # on_log follows reading the step's metrics
        if self.t_compile is None:
            self.t_compile = now - self.t_prev
        else:
            self.t_train += now - self.t_prev
        self.t_prev = now
        bpt = record["bits_per_token"]
        self.train_curve.append((record["step"], bpt))
        if not math.isfinite(bpt):
            self.log(f"  {self.name}: non-finite loss at update {record['step']}")
            raise train.StopTraining

    def on_eval(self, record):
        self.val_curve.append((record["step"], record["bits_per_token"]))
        self.t_prev = time.perf_counter()


def train_one(
    name, config, p: QualityPreset, splits, *, log=C.log, codebook=None
) -> dict:
    """Train `config` with `fit` at preset `p`'s budget and score it;
    `codebook`: a `train.CodebookConfig` for the run (None = the default)."""
    run_cfg = run_config(p, config)
    if codebook is not None:
        run_cfg = run_cfg.replace(codebook=codebook)
    ts = train.new_train_state(run_cfg)
    n_main, n_code = count_params(ts.model)
    stream = train.make_stream(run_cfg, splits["train"], train=True)
    val = train.make_stream(run_cfg, splits["validation"], train=False)
    n_val = (
        val.num_batches if p.eval_batches == 0 else min(p.eval_batches, val.num_batches)
    )
    val_batches = [val.batch(i) for i in range(n_val)]

    rec = _Recorder(name, log)
    # reset_each_batch empties the state at every training batch only; the
    # evaluations keep the preset's context_len.
    result = train.fit(
        ts, run_cfg, stream, eval_stream=val, callbacks=[rec],
        train_resets=(lambda _w: True) if p.reset_each_batch else None,
        handle_sigint=False,
    )  # fmt: skip
    model = result.train_state.model
    if result.validation is None:  # stopped early: the curve's last point
        rec.val_curve.append(
            (p.steps, train.evaluate_stream(model, val, run_cfg)["bits_per_token"])
        )
    bpb = train.evaluate_stream(model, val, run_cfg, max_batches=n_val)[
        "bits_per_token"
    ]
    bpb_reset = train.evaluate(
        model, val_batches, segment_len=p.seq_len, resets=[True] * n_val
    )["bits_per_token"]
    ok, err = check(model, val_batches[0]["inputs"])
    ok = ok and all(math.isfinite(b) for _, b in rec.train_curve) and math.isfinite(bpb)
    usage = None if config.attention == "full" else codebook_usage(model, val_batches)
    tokens = p.steps * p.batch_size * p.seq_len
    res = dict(
        name=name,
        attention=config.attention,
        n_code=config.n_code,
        params=n_main,
        codebook=n_code,
        bpb=bpb,
        bpb_reset=bpb_reset,
        ok=ok,
        stream_err=err,
        train_curve=rec.train_curve,
        val_curve=rec.val_curve,
        usage=usage,
        train_s=rec.t_train,
        compile_s=rec.t_compile,
        tokens_per_s=(tokens - p.batch_size * p.seq_len) / max(rec.t_train, 1e-9),
        val_tokens=sum(int(np.sum(b["loss_mask"])) for b in val_batches),
        model=model,  # the trained model (the regime benchmark evaluates it)
    )
    log(
        f"  {name}: val {bpb:.4f} bpb ({bpb_reset:.4f} with reset windows), train "
        f"{rec.t_train:.0f}s, check {'pass' if ok else 'FAIL'} ({err:.1e})"
    )
    return res


def run(
    p: QualityPreset,
    *,
    out_dir: Path,
    tag: str,
    command: str,
    data_path: str | None = None,
) -> dict:
    text = data.load_bytes(data_path) if data_path else data.load_bytes()
    splits = data.split_bytes(text)
    corpus = data_path or "bundled Shakespeare corpus (tvq_eqx/data/corpus)"
    results = []
    t0 = time.perf_counter()
    for name, cfg in model_configs(p):
        C.log(f"quality: training {name}")
        results.append(train_one(name, cfg, p, splits))
    wall = time.perf_counter() - t0
    by = {r["name"]: r for r in results}
    md = out_dir / f"quality-{tag}.md"
    png = out_dir / f"quality-{tag}.png"
    lines = write_report(
        p,
        results,
        by,
        md=md,
        png=png,
        command=command,
        corpus=corpus,
        n_bytes=len(text),
        wall=wall,
    )
    plot(p, results, png, command)
    return dict(results=results, markdown=md, plot=png, lines=lines)


def _ratio(by, a, b) -> str:
    if a not in by or b not in by:
        return "n/a"
    ok = by[a]["ok"] and by[b]["ok"]
    return C.gated_ratio(by[a]["bpb"], by[b]["bpb"], ok, "{:.4f}")


def write_report(p, results, by, *, md, png, command, corpus, n_bytes, wall):
    notes = _report_notes(p, results, corpus=corpus, n_bytes=n_bytes, wall=wall)
    lines = C.header_lines(f"Quality benchmark ({C.tag_of(md)})", command, notes)
    lines += _bpb_section(p, results)
    lines += _ratio_section(p, results, by)
    lines += ["", f"![learning curves]({png.name})", ""]
    C.write_text(md, lines)
    return lines


def _report_notes(p, results, *, corpus, n_bytes, wall) -> list[str]:
    """The report's setup notes: corpus, models, budget, evaluation, gate."""
    m = p.model
    notes = [
        f"corpus: {corpus}, {n_bytes:,} bytes, split 90/5/5 (`tvq_eqx.data.split_bytes`)",
        f"model: {m.n_layer} layers ({2 * m.n_layer} gated attention units), d_model "
        f"{m.d_model}, d_k {m.d_k}, d_v {m.d_v}, heads {m.n_head}, block_len "
        f"{m.block_len}, codes {m.n_code}; models trained: "
        f"{', '.join(n for n, _ in model_configs(p))}; "
        f"full: KV cache of {p.kv_cache_len} tokens + the current segment; window: "
        f"the official sliding window (`agg_cache=False`): each query sees the "
        f"last {m.mem_len} tokens (mem_len) and itself, no compressive cache",
        f"budget (every model): {p.steps} AdamW updates of {p.batch_size} x {p.seq_len} "
        f"bytes ({p.steps * p.batch_size * p.seq_len:,} training tokens), peak lr "
        f"{p.learning_rate}, warmup {p.warmup_steps}, cosine decay, weight decay "
        f"{p.weight_decay}, clip {p.grad_clip}, seed {p.seed}; "
        + (
            "attention state EMPTIED at every training batch (context <= "
            f"{p.seq_len} bytes)"
            if p.reset_each_batch
            else f"attention state carried along each row and emptied every {p.context_len} "
            "bytes (training and evaluation)"
            if p.context_len
            else "attention state carried between batches along each row (reset each epoch)"
        ),
        "validation bits per byte: summed NLL over "
        + (
            "the whole validation split"
            if p.eval_batches == 0
            else f"the first {p.eval_batches} validation windows"
        )
        + f" ({results[0]['val_tokens']:,} bytes) with the carried state, / (bytes x ln 2); "
        f"diagnostic column: the same with the attention state emptied at the start of "
        f"every {p.seq_len}-byte window (how much each model gains from longer context)",
        f"gate: one call == two streamed halves on a validation window (max |dlogp| <= "
        f"{STREAM_TOL:g}) and finite losses; ratios need both models to pass",
        f"total wall time {wall / 60:.1f} min (compile included)",
    ]
    return notes


def _bpb_section(p, results) -> list[str]:
    """The validation bits per byte of every model, with its codebook usage."""
    lines = ["## Validation bits per byte", ""]
    rows = []
    for r in results:
        u = r["usage"]
        rows.append(
            [
                r["name"],
                r["attention"],
                r["n_code"],
                f"{r['params']:,}",
                f"{r['bpb']:.4f}",
                f"{r['bpb_reset']:.4f}",
                f"{r['train_curve'][-1][1]:.3f}",
                "n/a (keys not quantized)"
                if u is None
                else f"{u['used_fraction']:.0%}",
                "n/a" if u is None else f"{u['perplexity']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                ("pass" if r["ok"] else C.CHECK_FAILED) + f" ({r['stream_err']:.1e})",
            ]
        )
    lines += C.markdown_table(
        [
            "model",
            "attention",
            "codes",
            "params (excl. codebook)",
            "val bpb",
            f"val bpb, state reset every {p.seq_len} bytes",
            "last train bpb",
            "codes used",
            "code perplexity",
            "train tokens/s",
            "check",
        ],
        rows,
        "llrrrrrrrrl",
    )
    return lines


def _ratio_section(p, results, by) -> list[str]:
    """The bits-per-byte ratios against the targets (gated on the checks)."""
    m = p.model
    lines = ["", "## Ratios (bits per byte)", ""]
    vq_full = _ratio(by, "vq", "full")
    vq_win = _ratio(by, "vq", "window")
    rows = [
        [
            "vq / full",
            vq_full,
            "<= 1.02 (vq within 2% of full)",
            _target(vq_full, lambda x: x <= 1.02),
        ],
        [
            "vq / window",
            vq_win,
            "< 1 (vq better than window)",
            _target(vq_win, lambda x: x < 1.0),
        ],
    ]
    for r in results:
        if r["name"].startswith("vq-"):
            rows.append(
                [
                    f"{r['name']} / vq ({m.n_code} codes)",
                    _ratio(by, r["name"], "vq"),
                    "",
                    "",
                ]
            )
    lines += C.markdown_table(["ratio", "value", "target", "met"], rows, "lrll")
    return lines


def _target(text: str, pred) -> str:
    try:
        return "yes" if pred(float(text)) else "no"
    except ValueError:
        return "n/a"


def plot(p, results, png, command):
    fig, (ax1, ax2) = C.new_figure(2)
    colors = {}
    for r in results:
        xs, ys = zip(*r["train_curve"], strict=False)
        k = max(1, len(xs) // 50)  # smooth: running mean over k updates
        ys_s = np.convolve(ys, np.ones(k) / k, mode="valid")
        (line,) = ax1.plot(xs[k - 1 :], ys_s, label=r["name"], lw=1.2)
        colors[r["name"]] = line.get_color()
        vx, vy = zip(*r["val_curve"], strict=False)
        ax2.plot(
            vx, vy, "o-", color=line.get_color(), label=f"{r['name']} ({r['bpb']:.3f})"
        )
    ax1.set(
        xlabel="update", ylabel="train bits per byte", title="training (running mean)"
    )
    ax2.set(
        xlabel="update",
        ylabel="validation bits per byte",
        title=f"validation (first {p.curve_eval_batches} windows; legend: whole split)",
    )
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 5.0))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    C.save_figure(fig, png, command)

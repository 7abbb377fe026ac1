"""Long-range recall benchmark: does the compressive cache carry information
from beyond the attention window, or only add noise?

Task (byte vocabulary, `make_batch`; numpy RNG, deterministic by seed). Each
sequence has `n_blocks * block_len` input positions (targets are the inputs
shifted by one) and is built from four disjoint byte alphabets:

- filler: random lowercase letters `a-z` everywhere not written below;
- `n_pairs` key-value pairs, each the triple `# key value` (keys from `A-P`,
  distinct within a sequence; values from `0-9Q-V`, independent and uniform,
  so the value alphabet has 16 symbols and chance is 1/16), each triple lying
  wholly inside one block;
- at the very end, the same keys queried in a random order, each as the
  triple `? key value`, all inside the last block. The loss mask is 1 exactly
  at the answer positions (input = the queried key, target = its value) and 0
  everywhere else: filler is incompressible and the other bytes carry nothing
  to learn, so the loss and the gradient are about recall only. The models use
  `lm_loss_average="tokens"` so the loss is the mean over answers.

Distance. A pair written in block `q - d`, queried from block `q` (the last
one), is at distance `d` blocks. Each sequence draws its pairs' distances
without repetition from `distances` (one pair per block, so they never
overlap); evaluation cycles through them so that every distance gets the same
number of queries. A query in block `q` attends directly to the last `mem_len`
keys before its block and to its own block; for `d >= 2` (with the default
`mem_len = block_len`) the whole pair lies before that window
(`(d - 1) * block_len >= mem_len`, checked), so the answer can reach a query
only through the vq model's compressive cache (per-code counts and value
means), the full model's un-quantized attention over the whole sequence, or
(for the window model and the vq model's window part) information relayed
from one filler position to the next through the stack of attention units:
each unit reaches back at most one window, so a pair more than
`window_reach` blocks back (`2 * n_layer` with the default `mem_len`) is out
of the window model's receptive field altogether. Distance 1 (pair in the
previous block, inside the window) is a control: every model can see it, so
it shows whether a model learned the task at all. The queried key occurs
exactly once before its query; the earlier queries of the same sequence ask
other keys, and values are drawn with replacement, so the already answered
queries say nothing about the current answer.

Pairs per sequence. With `n_pairs = 1` (the cpu and quick presets) the task
is "recall the marked value" (a marked span of one byte): the query need not
match the key, only find the one value-alphabet byte, so a single attention
unit can solve it and it isolates the question whether the cache carries
information across blocks. `n_pairs > 1` adds distractor pairs and needs key
matching (associative recall, an induction-like composition of two units);
in CPU-sized probes (4 pairs, block 16, 2 layers, 300 updates of 8
sequences; 1 pair, block 16, 1 layer, 200 updates of 16) not even the full
model rose above chance, while 1 pair at block 8 (136 positions) took full
and vq well above it within 400 updates of 16 sequences, so the presets use
that. Bigger budgets (a GPU) can raise `n_pairs`.

Training. Every variant (a name and changes to the preset's
`TransformerConfig`, `RecallPreset.variants`) is trained from seed `s` (model
initialisation and data stream) with the library's pieces:
`tvq_eqx.train.make_optimizer` (AdamW, warmup, cosine decay),
`init_train_state`, `make_train_step` with one update per sequence
(`update_len = seq_len`, so the gradient reaches the pair through the cache
within the same segment) and the attention state emptied at every batch
(sequences are independent). All variants of one seed see the same batches.
The full model's KV cache holds the whole sequence.

Evaluation: on `eval_per_distance` held-out queries per distance (one fixed
evaluation set for every run), accuracy (argmax of the answer position's
log-probabilities == target) and bits per answer, per distance; mean and
sample standard deviation over seeds. Correctness gate (as the quality
benchmark's): finite training losses and the vq-attention model's one-call ==
two-streamed-halves check (`benchmarks.quality.check`); a run that fails is
marked CHECK FAILED and left out of the means.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from tvq_eqx import Transformer, TransformerConfig, train

from . import _common as C
from . import quality
from .registry import RecallPreset

FILLER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
KEYS = np.frombuffer(b"ABCDEFGHIJKLMNOP", np.uint8)
VALUES = np.frombuffer(b"0123456789QRSTUV", np.uint8)
PAIR_MARK = ord("#")
QUERY_MARK = ord("?")
CHANCE = 1.0 / len(VALUES)
EVAL_SEED = 2**20 + 7  # the held-out set: a stream no training seed uses
EVAL_BATCH = 64


# ---------------------------------------------------------------------------
# Task


def check_task(
    *, block_len: int, n_blocks: int, n_pairs: int, distances, mem_len: int
) -> None:
    """ValueError naming the argument when the task cannot be laid out."""
    distances = tuple(distances)
    if n_pairs < 1 or n_pairs > len(KEYS):
        raise ValueError(f"n_pairs must be in [1, {len(KEYS)}]; got {n_pairs}")
    if len(set(distances)) != len(distances) or not distances:
        raise ValueError(f"distances must be distinct and non-empty; got {distances}")
    if n_pairs > len(distances):
        raise ValueError(
            f"n_pairs {n_pairs} > number of distances {len(distances)} (one pair "
            "per block)"
        )
    if min(distances) < 1 or max(distances) > n_blocks - 1:
        raise ValueError(
            f"distances must be in [1, n_blocks - 1 = {n_blocks - 1}]; got {distances}"
        )
    if block_len < 3:
        raise ValueError(f"block_len {block_len} cannot hold a 3-byte pair")
    if 3 * n_pairs - 1 > block_len:
        raise ValueError(
            f"{n_pairs} queries (3 bytes each, the last value only a target) do not "
            f"fit in the last block of {block_len}"
        )
    del mem_len  # distances inside the window are allowed (the d = 1 control)


def out_of_window(d: int, block_len: int, mem_len: int) -> bool:
    """Whether a pair `d` blocks back lies wholly before every query's window."""
    return (d - 1) * block_len >= mem_len


def window_reach(config: TransformerConfig) -> int:
    """Largest distance (blocks) from which information could in principle be
    relayed to the first position of the query block through the
    `2 * n_layer` stacked sliding windows (each unit sees `mem_len` keys
    before its block)."""
    L, M = config.block_len, config.mem_len
    q = 1_000  # any block far from the start
    p = q * L
    for _ in range(2 * config.n_layer):
        p = (p // L) * L - M
    # A pair in block b is reachable if its last byte (b * L + L - 1) >= p.
    return q - (p // L)


def make_batch(
    rng: np.random.Generator,
    *,
    n_seq: int,
    block_len: int,
    n_blocks: int,
    n_pairs: int,
    distances,
    balanced: bool = False,
) -> dict[str, np.ndarray]:
    """`n_seq` recall sequences of `n_blocks * block_len` positions.

    **Returns:** `inputs`, `targets` (int32 [B, T]), `loss_mask` (float32
    [B, T], 1 at answers) and `distance` (int32 [B, T], the answer's distance
    in blocks at answer positions, 0 elsewhere). `balanced`: sequence `i`
    takes distances `i * n_pairs .. i * n_pairs + n_pairs - 1` (cyclically)
    of `distances` instead of a random draw, so that every distance gets the
    same number of queries when `n_seq * n_pairs` is a multiple of their
    number.
    """
    distances = np.asarray(tuple(distances), np.int64)
    L, T, P = block_len, n_blocks * block_len, n_pairs
    tok = rng.choice(FILLER, size=(n_seq, T + 1)).astype(np.int32)
    dist = np.zeros((n_seq, T), np.int32)
    mask = np.zeros((n_seq, T), np.float32)
    q_start = T + 1 - 3 * P  # the queries fill the end of the sequence
    for i in range(n_seq):
        keys = rng.choice(KEYS, size=P, replace=False)
        values = rng.choice(VALUES, size=P)
        if balanced:
            ds = distances[(i * P + np.arange(P)) % len(distances)]
        else:
            ds = rng.choice(distances, size=P, replace=False)
        for k, v, d in zip(keys, values, ds, strict=True):
            start = (n_blocks - 1 - int(d)) * L + int(rng.integers(0, L - 2))
            tok[i, start : start + 3] = (PAIR_MARK, k, v)
        for j, m in enumerate(rng.permutation(P)):
            s = q_start + 3 * j
            tok[i, s : s + 3] = (QUERY_MARK, keys[m], values[m])
            mask[i, s + 1] = 1.0
            dist[i, s + 1] = ds[m]
    return dict(inputs=tok[:, :T], targets=tok[:, 1:], loss_mask=mask, distance=dist)


def batch_of(p: RecallPreset, rng: np.random.Generator, n_seq: int, **kw):
    return make_batch(
        rng,
        n_seq=n_seq,
        block_len=p.model.block_len,
        n_blocks=p.n_blocks,
        n_pairs=p.n_pairs,
        distances=p.distances,
        **kw,
    )


def eval_set(p: RecallPreset) -> dict[str, np.ndarray]:
    """The held-out sequences (the same for every run of preset `p`)."""
    n_seq = math.ceil(p.eval_per_distance * len(p.distances) / p.n_pairs)
    return batch_of(p, np.random.default_rng(EVAL_SEED), n_seq, balanced=True)


# ---------------------------------------------------------------------------
# Scoring


def token_scores(logp, targets):
    """(correct, nll in nats) at every position [B, T]: correct = argmax of the
    log-probabilities == target (jax arrays; jit-friendly)."""
    logp = jnp.asarray(logp)
    targets = jnp.asarray(targets)
    correct = jnp.argmax(logp, axis=-1) == targets
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return correct, nll


def select_answers(correct, nll, loss_mask, distance):
    """(distance, correct, nll) of every answer position (mask > 0), numpy."""
    sel = np.asarray(loss_mask) > 0
    return np.asarray(distance)[sel], np.asarray(correct)[sel], np.asarray(nll)[sel]


def answer_scores(
    logp, targets, loss_mask, distance
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance, correct, nll in nats) of every answer position (mask > 0):
    correct = argmax of the log-probabilities == target."""
    correct, nll = token_scores(logp, targets)
    return select_answers(correct, nll, loss_mask, distance)


def accuracy_by_distance(dist, correct, nll, distances) -> dict[int, dict]:
    """Per distance: queries `n`, accuracy `acc` and bits per answer `bits`."""
    out = {}
    for d in distances:
        m = dist == d
        n = int(m.sum())
        out[int(d)] = dict(
            n=n,
            acc=float(correct[m].mean()) if n else math.nan,
            bits=float(nll[m].mean() / math.log(2)) if n else math.nan,
        )
    return out


def mean_sd(xs) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return float(np.mean(xs)), sd


@eqx.filter_jit
def _scores(model, inputs, targets):
    logp, _, _ = model(inputs, model.init_state(inputs.shape[0]))
    return token_scores(logp, targets)


def evaluate(model, batch: dict[str, np.ndarray], distances) -> dict[int, dict]:
    """`accuracy_by_distance` of `model` on `batch`, in chunks of EVAL_BATCH
    sequences, each from an empty state."""
    parts = []
    for i in range(0, batch["inputs"].shape[0], EVAL_BATCH):
        sl = slice(i, i + EVAL_BATCH)
        correct, nll = _scores(
            model, jnp.asarray(batch["inputs"][sl]), jnp.asarray(batch["targets"][sl])
        )
        parts.append(
            select_answers(correct, nll, batch["loss_mask"][sl], batch["distance"][sl])
        )
    dist, correct, nll = (np.concatenate(x) for x in zip(*parts, strict=True))
    return accuracy_by_distance(dist, correct, nll, distances)


# ---------------------------------------------------------------------------
# Training


def variant_configs(p: RecallPreset) -> list[tuple[str, TransformerConfig]]:
    """(name, config) of every variant: the preset's model with its changes;
    the full model's KV cache covers the whole sequence."""
    base = p.model.replace(kv_cache_len=p.seq_len)
    return [(name, base.replace(**dict(changes))) for name, changes in p.variants]


def make_optimizer(p: RecallPreset):
    """The preset's optimizer; build it once per benchmark run, so that runs of
    the same variant reuse the compiled train step (it is a jit argument)."""
    return train.make_optimizer(
        "adamw",
        learning_rate=p.learning_rate,
        warmup_steps=p.warmup_steps,
        total_steps=p.steps,
        weight_decay=p.weight_decay,
        grad_clip=p.grad_clip,
    )


def train_one(
    name: str,
    config,
    p: RecallPreset,
    seed: int,
    ev,
    *,
    optimizer=None,
    log=C.log,
    codebook: train.CodebookConfig | None = None,
    on_update=None,
    make_model=Transformer,
) -> dict:
    """Train variant `name` (`config`) from `seed` and score it on `ev`.

    `codebook`: codebook init / dead-code restart before each batch, as
    `fit` does (`train.prepare_codebooks`; None = the official neither).
    `on_update(step, train_state, metrics)`, if given, is called before the
    first update (step 0, metrics None) and after every update (instruments
    such as `benchmarks.recall_diagnosis`; it must not touch the data RNG).
    `make_model(config, key=...)` builds the model (a `Transformer` subclass
    for diagnostic experiments)."""
    key = jax.random.key(seed)
    model = make_model(config, key=key)
    opt = make_optimizer(p) if optimizer is None else optimizer
    ts = train.init_train_state(
        model, opt, p.batch_size, key=jax.random.fold_in(key, 1)
    )
    step = train.make_train_step(opt, update_len=p.seq_len)
    rng = np.random.default_rng(seed)
    curve = []
    t0 = time.perf_counter()
    t_compile = None
    finite = True
    if on_update is not None:
        on_update(0, ts, None)
    for i in range(p.steps):
        batch = batch_of(p, rng, p.batch_size)
        batch.pop("distance")
        if codebook is not None:
            ts, _ = train.prepare_codebooks(
                ts, batch, codebook, update_len=p.seq_len, reset=True
            )
        ts, metrics = step(ts, batch, reset=True)
        bits = float(metrics["bits_per_token"])
        curve.append((i + 1, bits))
        if t_compile is None:
            t_compile = time.perf_counter() - t0
        if on_update is not None:
            on_update(i + 1, ts, metrics)
        if not math.isfinite(bits):
            log(f"  {name} seed {seed}: non-finite loss at update {i + 1}")
            finite = False
            break
    t_train = time.perf_counter() - t0 - t_compile
    model = ts.model
    by_d = evaluate(model, ev, p.distances)
    ok, err = quality.check(model, ev["inputs"][: min(4, len(ev["inputs"]))])
    ok = ok and finite and all(math.isfinite(r["bits"]) for r in by_d.values())
    far = [r["acc"] for d, r in by_d.items() if d >= 2]
    log(
        f"  {name} seed {seed}: train {t_train:.0f}s (+{t_compile:.0f}s compile), "
        f"last loss {curve[-1][1]:.3f} bits, acc d>=2 {np.mean(far) if far else 0:.3f}"
        f", check {'pass' if ok else 'FAIL'} ({err:.1e})"
    )
    return dict(
        name=name,
        seed=seed,
        by_distance=by_d,
        curve=curve,
        ok=ok,
        stream_err=err,
        train_s=t_train,
        compile_s=t_compile,
    )


def summarize(p: RecallPreset, runs: list[dict]) -> dict[str, dict[int, dict]]:
    """variant -> distance -> mean/sd of accuracy and bits over the seeds
    whose runs passed the gate (`n_ok` of them)."""
    out = {}
    for name, _ in p.variants:
        good = [r for r in runs if r["name"] == name and r["ok"]]
        out[name] = {}
        for d in p.distances:
            acc = mean_sd([r["by_distance"][d]["acc"] for r in good])
            bits = mean_sd([r["by_distance"][d]["bits"] for r in good])
            out[name][d] = dict(acc=acc, bits=bits, n_ok=len(good))
    return out


def run(p: RecallPreset, *, out_dir: Path, tag: str, command: str) -> dict:
    for _name, cfg in variant_configs(p):  # fail early on a bad layout
        check_task(
            block_len=cfg.block_len,
            n_blocks=p.n_blocks,
            n_pairs=p.n_pairs,
            distances=p.distances,
            mem_len=cfg.mem_len,
        )
    ev = eval_set(p)
    opt = make_optimizer(p)
    runs = []
    t0 = time.perf_counter()
    for name, cfg in variant_configs(p):
        for seed in p.seeds:
            C.log(f"recall: training {name} seed {seed}")
            runs.append(train_one(name, cfg, p, seed, ev, optimizer=opt))
    wall = time.perf_counter() - t0
    summary = summarize(p, runs)
    md = Path(out_dir) / f"recall-{tag}.md"
    png = Path(out_dir) / f"recall-{tag}.png"
    lines = write_report(
        p, runs, summary, ev, md=md, png=png, command=command, wall=wall
    )
    plot(p, summary, png, command)
    return dict(runs=runs, summary=summary, markdown=md, plot=png, lines=lines)


# ---------------------------------------------------------------------------
# Report


def _cell(ms: tuple[float, float], n_ok: int, fmt: str) -> str:
    if n_ok == 0:
        return C.CHECK_FAILED
    m, s = ms
    return (fmt.format(m) + " ± " + fmt.format(s)) if n_ok > 1 else fmt.format(m)


def write_report(p, runs, summary, ev, *, md, png, command, wall):
    notes = _report_notes(p, runs, ev, wall=wall)
    lines = C.header_lines(
        f"Long-range recall benchmark ({C.tag_of(md)})", command, notes
    )
    lines += _accuracy_section(p, runs, summary)
    lines += _bits_section(p, summary)
    lines += _runs_section(runs)
    lines += ["", f"![accuracy vs distance]({png.name})", ""]
    C.write_text(md, lines)
    return lines


def _report_notes(p, runs, ev, *, wall) -> list[str]:
    """The report's setup notes: task, sequence, model, budget, evaluation."""
    m = p.model
    reach = window_reach(m)
    n_q = {d: int(np.sum(ev["distance"] == d)) for d in p.distances}
    train_s = [r["train_s"] for r in runs]
    notes = [
        "task: filler `a-z`; "
        f"{p.n_pairs} pair{'s' * (p.n_pairs > 1)} `# key value` (keys `A-P` "
        "distinct, values `0-9Q-V` "
        f"uniform) at distinct distances from {list(p.distances)} blocks before "
        "the last block, where the keys are queried as `? key value` in random "
        "order; loss and accuracy only on the answer positions (`? key` -> value); "
        f"chance {CHANCE:.4f} (1/{len(VALUES)})",
        f"sequence: {p.n_blocks} blocks x {m.block_len} = {p.seq_len} positions; "
        f"window: each query sees the {m.mem_len} positions before its block and "
        f"its block, so distance >= "
        f"{min(d for d in range(1, p.n_blocks) if out_of_window(d, m.block_len, m.mem_len))}"
        " is outside it (distance 1: in-window control); through the "
        f"{2 * m.n_layer} stacked windows information could be relayed from at most "
        f"{reach} blocks back (the window model's receptive field)",
        f"model: {m.n_layer} layers ({2 * m.n_layer} gated attention units), d_model "
        f"{m.d_model}, d_k {m.d_k}, d_v {m.d_v}, heads {m.n_head}, codes {m.n_code}, "
        f"block_len {m.block_len}, mem_len {m.mem_len}, loss averaged over answers; "
        "variants: "
        + "; ".join(
            f"{n} ({', '.join(f'{k}={v!r}' for k, v in ch) or 'preset model'})"
            for n, ch in p.variants
        )
        + f"; full: KV cache of {p.seq_len} (the whole sequence)",
        f"budget per run: {p.steps} AdamW updates of {p.batch_size} fresh sequences "
        f"({p.steps * p.batch_size * p.n_pairs:,} answers), peak lr {p.learning_rate}, "
        f"warmup {p.warmup_steps}, cosine decay, weight decay {p.weight_decay}, clip "
        f"{p.grad_clip}; one update per sequence, state emptied per batch; seeds "
        f"{list(p.seeds)} (initialisation and data; the same batches for every "
        "variant)",
        f"evaluation: {sum(n_q.values()):,} held-out queries "
        f"({min(n_q.values())}-{max(n_q.values())} per distance), the same for every "
        "run; mean ± sample sd over seeds",
        f"gate: finite losses and one call == two streamed halves (max |dlogp| <= "
        f"{quality.STREAM_TOL:g}); failed runs are left out of the means",
        f"train time per run {min(train_s):.0f}-{max(train_s):.0f} s (+ compile); "
        f"total wall time {wall / 60:.1f} min",
    ]
    return notes


def _accuracy_section(p, runs, summary) -> list[str]:
    """Answer accuracy per distance and variant, and its means beyond the
    window and beyond what the stacked windows could relay."""
    m = p.model
    reach = window_reach(m)
    names = [n for n, _ in p.variants]
    lines = ["## Accuracy by distance (blocks)", ""]
    rows = []
    for d in p.distances:
        rows.append(
            [d, "in window" if not out_of_window(d, m.block_len, m.mem_len) else ""]
            + [
                _cell(summary[n][d]["acc"], summary[n][d]["n_ok"], "{:.3f}")
                for n in names
            ]
        )
    far = [d for d in p.distances if out_of_window(d, m.block_len, m.mem_len)]
    beyond = [d for d in far if d > reach]
    for label, ds in (
        (f"mean, {min(far)}-{max(far)}" if far else None, far),
        (
            f"mean, {min(beyond)}-{max(beyond)} (beyond relay)" if beyond else None,
            beyond,
        ),
    ):
        if label is None:
            continue
        row = [label, ""]
        for n in names:
            good = [r for r in runs if r["name"] == n and r["ok"]]
            per_seed = [np.mean([r["by_distance"][d]["acc"] for d in ds]) for r in good]
            row.append(_cell(mean_sd(per_seed), len(good), "{:.3f}"))
        rows.append(row)
    lines += C.markdown_table(["distance", "", *names], rows, "rl" + "r" * len(names))
    return lines


def _bits_section(p, summary) -> list[str]:
    """Bits per answer per distance and variant."""
    names = [n for n, _ in p.variants]
    lines = ["", f"chance: {CHANCE:.4f}", "", "## Bits per answer by distance", ""]
    rows = [
        [
            d,
            *(
                _cell(summary[n][d]["bits"], summary[n][d]["n_ok"], "{:.3f}")
                for n in names
            ),
        ]
        for d in p.distances
    ]
    lines += C.markdown_table(["distance", *names], rows)
    lines += [
        "",
        f"chance: {math.log2(len(VALUES)):.3f} bits (uniform over the values)",
        "",
    ]
    return lines


def _runs_section(runs) -> list[str]:
    """Every run: its last training loss, times and check."""
    rows = [
        [
            r["name"],
            r["seed"],
            f"{r['curve'][-1][1]:.3f}",
            f"{r['train_s']:.0f}",
            f"{r['compile_s']:.0f}",
            ("pass" if r["ok"] else C.CHECK_FAILED) + f" ({r['stream_err']:.1e})",
        ]
        for r in runs
    ]
    return ["## Runs", ""] + C.markdown_table(
        ["variant", "seed", "last train bits/answer", "train s", "compile s", "check"],
        rows,
        "lrrrrl",
    )


def plot(p, summary, png, command):
    fig, (ax,) = C.new_figure(1, width=7.0)
    m = p.model
    xs = np.asarray(p.distances)
    for name, _ in p.variants:
        rows = [summary[name][d] for d in p.distances]
        if rows[0]["n_ok"] == 0:
            continue
        mean = np.asarray([r["acc"][0] for r in rows])
        sd = np.asarray([r["acc"][1] for r in rows])
        (line,) = ax.plot(xs, mean, "o-", label=f"{name} ({rows[0]['n_ok']} seeds)")
        ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    ax.axhline(CHANCE, color="gray", ls="--", lw=1, label=f"chance ({CHANCE:.3f})")
    reach = window_reach(m)
    if reach < max(xs):
        ax.axvline(reach + 0.5, color="gray", ls=":", lw=1, label="window relay limit")
    ax.set(
        xlabel=f"distance between pair and query (blocks of {m.block_len})",
        ylabel="answer accuracy",
        title=f"long-range recall: mean ± sd over seeds {list(p.seeds)}",
        ylim=(-0.02, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    C.save_figure(fig, png, command)

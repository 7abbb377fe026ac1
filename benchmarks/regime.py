"""Regime benchmark: does the compressive cache pay off?

Each variant (vq: compressive cache; full: un-quantized attention over a KV
cache; window: the official `agg_cache=False` sliding window; more in
`registry.REGIME_VARIANTS`) is trained in the paper's regime by the quality
benchmark's training (`quality.train_one`: `tvq_eqx.train.fit`, independent
sequences of `context_len` bytes split into update segments of `seq_len`,
the state carried inside a sequence and emptied between sequences), once per
seed. Reported per variant: mean and sample standard deviation over seeds of
the validation bits per byte, and of the bits per byte per position bucket
inside held-out sequences of 1x, 4x, 16x ... the training length (state
carried from an empty start throughout), with the pairwise differences that
exceed the seed spread.

Correctness gate: `quality.check` (one call == two streamed halves) and
finite losses in training and in every evaluation; a variant with a failed
run shows CHECK FAILED instead of differences.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tvq_eqx import data

from . import _common as C
from . import quality
from .registry import RegimePreset

LINUX_DOC_PACKAGE = "linux-doc-6.1"
DEFAULT_CACHE = Path.home() / ".cache" / "tvq-eqx"
_DOC_ROOT = Path("usr/share/doc") / LINUX_DOC_PACKAGE / "Documentation"


# ---------------------------------------------------------------------------
# Corpora


def doc_order(relative_path: str) -> str:
    """Sort key of a documentation file: the SHA-1 of its relative path. A
    fixed pseudo-random order mixes the subsystems, so the contiguous
    train / validation / test splits of the capped corpus share a
    distribution (in path order the last 10% of 2 MiB would be one folder's
    device tables)."""
    return hashlib.sha1(relative_path.encode()).hexdigest()


def rst_corpus(doc_root: Path, cap_bytes: int) -> bytes:
    """The English reST files under `doc_root` (`*.rst`, `*.rst.gz`
    decompressed; `translations/` left out), in `doc_order`, joined by a
    newline and cut at `cap_bytes`."""
    doc_root = Path(doc_root)
    files = sorted(
        (
            p
            for p in doc_root.rglob("*")
            if p.is_file()
            and (p.name.endswith(".rst") or p.name.endswith(".rst.gz"))
            and p.relative_to(doc_root).parts[0] != "translations"
        ),
        key=lambda p: doc_order(p.relative_to(doc_root).as_posix()),
    )
    if not files:
        raise FileNotFoundError(f"no .rst or .rst.gz files under {str(doc_root)!r}")
    pieces, size = [], 0
    for path in files:
        raw = path.read_bytes()
        text = gzip.decompress(raw) if path.name.endswith(".gz") else raw
        pieces.append(text)
        size += len(text) + 1
        if size >= cap_bytes:
            break
    return b"\n".join(pieces)[:cap_bytes]


def _download_linux_doc(workdir: Path) -> Path:
    """`apt-get download` + `dpkg-deb -x` of the Debian package into
    `workdir`; the Documentation folder."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"the linux-doc corpus needs {tool} (a Debian-like system) to fetch "
                f"{LINUX_DOC_PACKAGE}; none found: pass --data PATH to use another "
                "corpus"
            )
    try:
        subprocess.run(
            ["apt-get", "download", LINUX_DOC_PACKAGE],
            cwd=workdir, check=True, capture_output=True, text=True,
        )  # fmt: skip
        (deb,) = workdir.glob(f"{LINUX_DOC_PACKAGE}_*.deb")
        subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(workdir / "x")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    except (subprocess.CalledProcessError, ValueError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise RuntimeError(
            f"could not download and unpack {LINUX_DOC_PACKAGE} with apt-get "
            f"download / dpkg-deb -x: {detail.strip()}"
        ) from e
    return workdir / "x" / _DOC_ROOT


def linux_doc_corpus(
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
    *,
    cap_bytes: int = 2**21,
    source_dir: str | os.PathLike[str] | None = None,
) -> bytes:
    """The linux-doc byte corpus: `rst_corpus` of Debian's linux-doc-6.1
    Documentation (downloaded with apt-get unless `source_dir` is that
    folder), cached as `cache_dir/linux-doc-6.1-rst-mixed-<cap>.bin`."""
    cache = Path(cache_dir) / f"{LINUX_DOC_PACKAGE}-rst-mixed-{cap_bytes}.bin"
    if cache.is_file():
        return cache.read_bytes()
    if source_dir is not None:
        text = rst_corpus(Path(source_dir), cap_bytes)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            text = rst_corpus(_download_linux_doc(Path(tmp)), cap_bytes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    part = cache.with_name(cache.name + ".part")
    part.write_bytes(text)
    os.replace(part, cache)
    return text


def load_corpus(p: RegimePreset, data_path: str | None = None):
    """(uint8 array, description) of the preset's corpus (`data_path`
    overrides it)."""
    if data_path:
        return data.load_bytes(data_path), str(data_path)
    if p.corpus == "linux-doc":
        text = np.frombuffer(linux_doc_corpus(cap_bytes=p.linux_doc_bytes), np.uint8)
        return text, (
            f"Debian {LINUX_DOC_PACKAGE} (`apt-get download`, `dpkg-deb -x`): the "
            f"`*.rst(.gz)` files under /{_DOC_ROOT} except translations/, "
            "decompressed, ordered by the SHA-1 of their relative path (a fixed mix "
            "of subsystems), joined by newlines, first "
            f"{p.linux_doc_bytes:,} bytes (cached in {DEFAULT_CACHE})"
        )
    return data.load_bytes(), "bundled Shakespeare corpus (tvq_eqx/data/corpus)"


# ---------------------------------------------------------------------------
# Models and per-position evaluation


def variant_configs(p: RegimePreset) -> list[tuple[str, object]]:
    """(name, TransformerConfig) of every variant: the quality model with
    the preset's `kv_cache_len`, then the variant's changes."""
    base = p.quality.model.replace(kv_cache_len=p.quality.kv_cache_len)
    return [(name, base.replace(**dict(changes))) for name, changes in p.variants]


def heldout_sequences(text, length: int, max_bytes: int = 0):
    """(inputs, targets) int32 [N, length]: `text` cut into the N
    non-overlapping sequences that fit (in `max_bytes` bytes when > 0),
    targets the next byte."""
    text = np.asarray(text)
    if max_bytes:
        text = text[: max_bytes + 1]
    n = (len(text) - 1) // length
    if n < 1:
        raise ValueError(
            f"held-out text of {len(text):,} bytes is shorter than one sequence "
            f"of {length:,} (+1) bytes"
        )
    x = np.asarray(text[: n * length + 1], np.int32)
    return x[:-1].reshape(n, length), x[1:].reshape(n, length)


@eqx.filter_jit
def _segment_nll(
    model, inputs: Int[Array, "b t"], targets: Int[Array, "b t"], state
) -> tuple[Float[Array, "b t"], object]:
    logprobs, state, _ = model(inputs, state)
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return nll, state


def per_token_nll(model, inputs, targets, *, segment_len: int, batch: int):
    """Per-token NLL (nats) [N, T] of `model` on the rows of `inputs`, each
    row started from an empty state and run `segment_len` tokens at a time
    with the state carried; `batch` rows per call (the last group padded by
    repeating rows, so every call has one shape and compiles once)."""
    n, t = inputs.shape
    out = np.empty((n, t), np.float64)
    for r0 in range(0, n, batch):
        idx = np.arange(r0, r0 + batch)
        rows = np.where(idx < n, idx, n - 1)
        x, y = jnp.asarray(inputs[rows]), jnp.asarray(targets[rows])
        state = model.init_state(batch)
        parts = []
        for s in range(0, t, segment_len):
            nll, state = _segment_nll(
                model, x[:, s : s + segment_len], y[:, s : s + segment_len], state
            )
            parts.append(np.asarray(nll))
        k = min(batch, n - r0)
        out[r0 : r0 + k] = np.concatenate(parts, axis=1)[:k]
    return out


def buckets_for(length: int, block_len: int, edges) -> list[tuple[int, int]]:
    """The `[lo, hi)` block buckets of `edges` that a sequence of `length`
    tokens reaches (the last one cut at the sequence's end)."""
    n_blocks = length // block_len
    return [
        (lo, min(hi, n_blocks)) for lo, hi in itertools.pairwise(edges) if lo < n_blocks
    ]


def bucket_bpb(nll, block_len: int, edges) -> list[tuple[int, int, float]]:
    """(lo, hi, bits per byte) per block bucket of a per-token NLL array
    [N, T] (nats): the mean NLL of the tokens at positions
    `[lo * block_len, hi * block_len)`, / ln 2."""
    nll = np.asarray(nll, np.float64)
    out = []
    for lo, hi in buckets_for(nll.shape[1], block_len, edges):
        chunk = nll[:, lo * block_len : hi * block_len]
        out.append((lo, hi, float(chunk.mean() / math.log(2))))
    return out


def eval_config(config, length: int):
    """The config a trained model is evaluated with on sequences of
    `length`: full's KV cache grows to hold the whole sequence (its
    parameters do not depend on `kv_cache_len`; the relative biases cover
    distances <= mem_len only, older keys are scored by content)."""
    if config.attention == "full" and config.kv_cache_len < length:
        return dict(kv_cache_len=length)
    return {}


def evaluate_positions(model, config, p: RegimePreset, heldout) -> dict:
    """{multiple: dict(buckets=[(lo, hi, bpb)], bpb, sequences, finite,
    kv_cache_len)} on the held-out text."""
    out = {}
    for m in p.extrapolation:
        length = m * p.sequence_len
        inputs, targets = heldout_sequences(heldout, length, p.eval_bytes)
        changes = eval_config(config, length)
        m_model = model.with_config(**changes) if changes else model
        # Fewer rows than eval_batch: no padded rows (full's cost at 16x is
        # its whole cache per segment, whatever it holds).
        batch = min(p.eval_batch, inputs.shape[0])
        nll = per_token_nll(
            m_model, inputs, targets, segment_len=p.quality.seq_len, batch=batch
        )
        out[m] = dict(
            buckets=bucket_bpb(nll, config.block_len, p.bucket_edges),
            bpb=float(nll.mean() / math.log(2)),
            sequences=int(inputs.shape[0]),
            finite=bool(np.all(np.isfinite(nll))),
            kv_cache_len=changes.get("kv_cache_len"),
        )
    return out


# ---------------------------------------------------------------------------
# Statistics


def mean_sd(xs) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None with one value)."""
    xs = [float(x) for x in xs]
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def spread_test(a, b) -> tuple[float, float | None, bool | None]:
    """(mean(a) - mean(b), threshold, exceeds) for two sets of per-seed
    values: exceeds = |difference| > 2 sqrt(sd_a^2 / n_a + sd_b^2 / n_b)
    (twice the standard error of the difference); None without two seeds
    on each side."""
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    if sa is None or sb is None:
        return ma - mb, None, None
    thr = 2.0 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return ma - mb, thr, abs(ma - mb) > thr


def paired_test(a, b) -> tuple[float, float | None, bool | None]:
    """(mean of a_i - b_i, threshold, exceeds) for per-seed values in the
    same seed order: exceeds = |mean| > 2 sd(a_i - b_i) / sqrt(n). Runs of
    one seed share the initial parameters and the data order, so the seed's
    own effect cancels; None with one seed."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths; got {len(a)} and {len(b)}")
    d, sd = mean_sd([x - y for x, y in zip(a, b, strict=True)])
    if sd is None:
        return d, None, None
    thr = 2.0 * sd / math.sqrt(len(a))
    return d, thr, abs(d) > thr


def _pm(xs) -> str:
    m, s = mean_sd(xs)
    return f"{m:.4f}" if s is None else f"{m:.4f} ± {s:.4f}"


# ---------------------------------------------------------------------------
# Run


def run(
    p: RegimePreset,
    *,
    out_dir: Path,
    tag: str,
    command: str,
    data_path: str | None = None,
) -> dict:
    text, corpus = load_corpus(p, data_path)
    splits = data.split_bytes(text)
    heldout = np.concatenate([splits[s] for s in p.eval_splits])
    runs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for (name, cfg), seed in itertools.product(variant_configs(p), p.seeds):
        C.log(f"regime: training {name}, seed {seed}")
        q = dataclasses.replace(p.quality, seed=seed)
        res = quality.train_one(name, cfg, q, splits)
        t_eval = time.perf_counter()
        res["positions"] = evaluate_positions(res.pop("model"), cfg, p, heldout)
        res["eval_s"] = time.perf_counter() - t_eval
        res["seed"] = seed
        res["ok"] = res["ok"] and all(e["finite"] for e in res["positions"].values())
        C.log(
            f"  {name} seed {seed}: "
            + ", ".join(f"{m}x {e['bpb']:.4f}" for m, e in res["positions"].items())
            + f" bpb (eval {res['eval_s']:.0f}s)"
        )
        runs.append(res)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    md = out_dir / f"regime-{tag}.md"
    png = out_dir / f"regime-{tag}.png"
    lines = write_report(
        p, runs, md=md, png=png, command=command, corpus=corpus,
        n_bytes=len(text), n_heldout=len(heldout), wall=wall, cpu=cpu,
    )  # fmt: skip
    plot(p, runs, png, command)
    return dict(results=runs, markdown=md, plot=png, lines=lines)


def _by_variant(p: RegimePreset, runs) -> dict[str, list[dict]]:
    return {name: [r for r in runs if r["name"] == name] for name, _ in p.variants}


def _label(lo: int, hi: int) -> str:
    return f"{lo}–{hi - 1}"


def _bucket_values(rs, m: int) -> list[list[float]]:
    """Per bucket of multiple `m`: the per-seed bpb values."""
    return [
        list(v)
        for v in zip(
            *[[b for _, _, b in r["positions"][m]["buckets"]] for r in rs], strict=True
        )
    ]


def _diff_cell(a_runs, b_runs, a_vals, b_vals, found: list[str], where: str) -> str:
    """A table cell for mean(a) - mean(b); `found` collects `where` with the
    difference when it exceeds the seed spread."""
    if not all(r["ok"] for r in a_runs + b_runs):
        return C.CHECK_FAILED
    d, thr, exceeds = spread_test(a_vals, b_vals)
    if exceeds is None:
        return f"{d:+.4f} (1 seed: no spread)"
    _, pthr, pexceeds = paired_test(a_vals, b_vals)
    if exceeds:
        found.append(f"{where}: {d:+.4f} (threshold {thr:.4f})")
    elif pexceeds:
        found.append(f"{where}: {d:+.4f} (paired only: threshold {pthr:.4f})")
    return (
        f"{d:+.4f} (2se {thr:.4f}) {_yes(exceeds)}; paired {pthr:.4f} {_yes(pexceeds)}"
    )


def _yes(flag: bool | None) -> str:
    return "**yes**" if flag else "no"


def write_report(p, runs, *, md, png, command, corpus, n_bytes, n_heldout, wall, cpu):
    notes = _report_notes(
        p, runs, corpus=corpus, n_bytes=n_bytes, n_heldout=n_heldout, wall=wall, cpu=cpu
    )
    header = C.header_lines(f"Regime benchmark ({C.tag_of(md)})", command, notes)
    by = _by_variant(p, runs)
    found: list[str] = []  # differences that exceed the seed spread
    lines = _runs_section(p, runs)
    lines += _mean_section(p, by)
    pairs = list(itertools.combinations(by, 2))
    for m in p.extrapolation:
        lines += _bucket_section(p, runs, by, pairs, m, found)
    lines += _validation_differences(by, pairs, found)
    lines += ["", f"![bits per byte per bucket]({png.name})", ""]
    lines = header + _summary(p, lines, found) + lines
    C.write_text(md, lines)
    return lines


def _report_notes(p, runs, *, corpus, n_bytes, n_heldout, wall, cpu) -> list[str]:
    """The report's setup notes: corpus, model, regime, budget, evaluation,
    the spread rule, the gate and the time."""
    q, m0 = p.quality, p.quality.model
    L = p.sequence_len
    budget = (
        f"{q.steps} AdamW updates of {q.batch_size} x {q.seq_len} bytes "
        f"({q.steps * q.batch_size * q.seq_len:,} training tokens), peak lr "
        f"{q.learning_rate}, warmup {q.warmup_steps}, cosine decay, weight decay "
        f"{q.weight_decay}, clip {q.grad_clip}"
    )
    variants = "; ".join(
        f"{n}: " + (", ".join(f"{k}={v!r}" for k, v in ch) or "the base model")
        for n, ch in p.variants
    )
    mean_train = statistics.fmean(r["train_s"] + (r["compile_s"] or 0) for r in runs)
    notes = [
        f"corpus: {corpus}; {n_bytes:,} bytes, split 90/5/5 (`tvq_eqx.data.split_bytes`)",
        f"model: {m0.n_layer} layers, d_model {m0.d_model}, d_k {m0.d_k}, d_v {m0.d_v}, "
        f"heads {m0.n_head}, block_len {m0.block_len}, codes {m0.n_code}, mem_len "
        f"{m0.mem_len}; variants: {variants}; full: KV cache of {q.kv_cache_len} "
        "tokens in training",
        f"regime: independent sequences of {L:,} bytes ({L // m0.block_len} blocks): "
        f"each row's attention state is carried over {L // q.seq_len} update segments "
        f"of {q.seq_len} bytes and emptied every {L:,} bytes (training and the "
        "validation bpb)",
        f"budget per run: {budget}; {len(p.seeds)} seed(s) {list(p.seeds)} per variant. "
        "The seed sets the initial parameters (`jax.random.key(seed)`) and the data "
        "order (each epoch's rotation and row permutation of the training stream); "
        "the models have no dropout",
        f"validation bpb: the quality benchmark's (`quality.train_one`): the whole "
        f"validation split ({runs[0]['val_tokens']:,} bytes) as parallel rows, "
        f"state emptied every {L:,} bytes"
        if q.eval_batches == 0
        else f"validation bpb: the first {q.eval_batches} validation windows",
        f"per-position evaluation: the {' + '.join(p.eval_splits)} split(s) "
        f"concatenated ({n_heldout:,} contiguous bytes"
        + (f", first {p.eval_bytes:,} used" if p.eval_bytes else "")
        + "), cut into non-overlapping sequences of m x "
        f"{L:,} bytes (m = {', '.join(map(str, p.extrapolation))}); each sequence starts "
        f"from an empty state and is run {q.seq_len} bytes at a time with the state "
        "carried throughout; bits per byte = mean NLL over the bytes of a bucket of "
        "block indices (position // block_len) / ln 2. Every variant and seed scores "
        "the same bytes; the buckets of one multiple hold different bytes (and few "
        "sequences at 16x), so compare variants within a bucket",
        "extrapolation: vq and window run unchanged (their state is bounded); full's "
        "KV cache is enlarged at evaluation to the whole sequence "
        "(`Transformer.with_config(kv_cache_len=...)`: no parameter depends on it; the "
        f"relative biases cover distances <= mem_len = {m0.mem_len} only, older keys are "
        f"scored by content alone, as in training beyond {m0.mem_len})",
        "spread rule: a difference of means 'exceeds the seed spread' when "
        "|mean_a - mean_b| > 2 sqrt(sd_a^2/n_a + sd_b^2/n_b) (sample sd, n-1), i.e. "
        "twice the standard error of the difference; 'paired': the same test on the "
        "per-seed differences, |mean(a_i - b_i)| > 2 sd(a_i - b_i)/sqrt(n) (runs of "
        "one seed share initial parameters and data order, so the seed's own effect "
        "cancels; listed when only it holds)",
        f"gate: one call == two streamed halves (max |dlogp| <= {quality.STREAM_TOL:g}), "
        "finite training losses and evaluation NLLs; differences need every run of "
        "both variants to pass",
        f"time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (all threads) in total; "
        f"training {mean_train:.0f} s per run on average (compile included)",
    ]
    return notes


def _runs_section(p, runs) -> list[str]:
    """Every run: its validation bpb and bpb at each multiple of the length."""
    lines = ["## Runs", ""]
    rows = []
    for r in runs:
        rows.append(
            [r["name"], r["seed"], f"{r['bpb']:.4f}"]
            + [f"{r['positions'][m]['bpb']:.4f}" for m in p.extrapolation]
            + [f"{r['train_s']:.0f}", f"{r['eval_s']:.0f}",
               ("pass" if r["ok"] else C.CHECK_FAILED) + f" ({r['stream_err']:.1e})"]
        )  # fmt: skip
    lines += C.markdown_table(
        ["variant", "seed", "val bpb"]
        + [f"{m}x bpb ({r0['positions'][m]['sequences']} seq)" for m, r0 in
           ((m, runs[0]) for m in p.extrapolation)]
        + ["train s", "eval s", "check"],
        rows,
        "lr" + "r" * (1 + len(p.extrapolation)) + "rrl",
    )  # fmt: skip

    return lines


def _mean_section(p, by) -> list[str]:
    """Per variant: mean ± sd over seeds."""
    lines = ["", "## Mean ± sd over seeds", ""]
    rows = [
        [n, len(rs), _pm([r["bpb"] for r in rs])]
        + [_pm([r["positions"][m]["bpb"] for r in rs]) for m in p.extrapolation]
        for n, rs in by.items()
    ]
    lines += C.markdown_table(
        ["variant", "seeds", "val bpb"] + [f"{m}x bpb" for m in p.extrapolation], rows
    )

    return lines


def _bucket_section(p, runs, by, pairs, m: int, found: list[str]) -> list[str]:
    """Multiple `m` of the sequence length: bpb per position bucket and the
    differences of every pair of variants (those exceeding the seed spread
    are added to `found`)."""
    m0 = p.quality.model
    L = p.sequence_len
    lines: list[str] = []
    length = m * L
    bks = buckets_for(length, m0.block_len, p.bucket_edges)
    kv = next((r["positions"][m]["kv_cache_len"] for r in runs
               if r["positions"][m]["kv_cache_len"]), None)  # fmt: skip
    lines += [
        "",
        f"## Bits per byte per position bucket, {m}x ({length:,} bytes, "
        f"{length // m0.block_len} blocks)",
        "",
    ]
    if kv:
        lines += [f"full evaluated with a KV cache of {kv:,} tokens.", ""]
    rows = [
        [n] + [_pm(v) for v in _bucket_values(rs, m)]
        + [_pm([r["positions"][m]["bpb"] for r in rs])]
        for n, rs in by.items()
    ]  # fmt: skip
    cols = ["variant"] + [f"blocks {_label(lo, hi)}" for lo, hi in bks] + ["all"]
    lines += C.markdown_table(cols, rows)
    lines += ["", f"Differences (row: a − b), {m}x; cell: difference (2se "
              "threshold) exceeds the seed spread?; paired (threshold) exceeds?",
              ""]  # fmt: skip
    rows = []
    for a, b in pairs:
        va, vb = _bucket_values(by[a], m), _bucket_values(by[b], m)
        rows.append(
            [f"{a} − {b}"]
            + [_diff_cell(by[a], by[b], x, y, found,
                          f"{a} − {b}, {m}x, blocks {_label(lo, hi)}")
               for x, y, (lo, hi) in zip(va, vb, bks, strict=True)]
            + [_diff_cell(by[a], by[b], [r["positions"][m]["bpb"] for r in by[a]],
                          [r["positions"][m]["bpb"] for r in by[b]], found,
                          f"{a} − {b}, {m}x, whole sequence")]
        )  # fmt: skip
    lines += C.markdown_table(["pair (a − b)"] + cols[1:], rows)

    return lines


def _validation_differences(by, pairs, found: list[str]) -> list[str]:
    """The difference of validation bpb of every pair of variants."""
    lines = ["", "## Differences of validation bpb", ""]
    rows = [
        [f"{a} − {b}",
         _diff_cell(by[a], by[b], [r["bpb"] for r in by[a]], [r["bpb"] for r in by[b]],
                    found, f"{a} − {b}, validation bpb")]
        for a, b in pairs
    ]  # fmt: skip
    lines += C.markdown_table(
        ["pair (a − b)", "val bpb difference (2se) exceeds?; paired exceeds?"], rows
    )
    return lines


def _summary(p, lines, found: list[str]) -> list[str]:
    """The differences that exceed the seed spread, counted against the
    difference cells of `lines`."""
    summary = ["## Differences that exceed the seed spread", ""]
    if len(p.seeds) < 2:
        summary += ["None can be judged: one seed per variant (no spread).", ""]
    else:
        cells = sum(len(re.findall(r"; paired \d", ln)) for ln in lines)
        n = len(p.seeds)
        summary += [
            f"{len(found)} of {cells} differences (cells below) are listed. With "
            f"{n} seeds either rule is a t-test at |t| > 2 on few degrees of freedom "
            f"(about {2 * n - 2} unpaired, {n - 1} paired), so a few listings are "
            "expected by chance alone when there is no difference; a difference "
            "that holds across neighbouring buckets and multiples is the stronger "
            "sign.",
            "",
        ]
        summary += [f"- {f}" for f in found] or ["None."]
        summary += [""]
    return summary


def plot(p: RegimePreset, runs, png, command):
    by = _by_variant(p, runs)
    fig, axes = C.new_figure(len(p.extrapolation), width=5.0)
    for ax, m in zip(axes, p.extrapolation, strict=True):
        bks = buckets_for(m * p.sequence_len, p.quality.model.block_len, p.bucket_edges)
        xs = np.arange(len(bks))
        for n, rs in by.items():
            vals = _bucket_values(rs, m)
            stats = [mean_sd(v) for v in vals]
            mu = np.array([s[0] for s in stats])
            (line,) = ax.plot(xs, mu, "o-", label=f"{n} ({len(rs)} seeds)", lw=1.2)
            if len(rs) > 1:
                sd = np.array([s[1] for s in stats])
                ax.fill_between(xs, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)
        ax.set_xticks(xs, [_label(lo, hi) for lo, hi in bks], rotation=30, fontsize=8)
        ax.set(
            xlabel="position bucket (blocks)",
            ylabel="bits per byte",
            title=f"{m}x training length ({m * p.sequence_len:,} bytes)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    C.save_figure(fig, png, command)

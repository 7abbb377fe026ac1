"""The regime benchmark (benchmarks/regime.py): the runner end to end on the
micro preset, the per-position bucket averaging, the seed-spread rule, the
full model's longer evaluation cache and the linux-doc corpus builder."""

import dataclasses
import gzip
import hashlib
import itertools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# `benchmarks/` is a top-level folder: make it importable however pytest runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import regime, registry, run
from tvq_eqx import Transformer


def _initialised(name, config, p, splits, *, log=None):
    """`quality.train_one`'s result for a model that is only initialised
    (from `p.seed`): training itself is the quality benchmark's (smoke-tested
    in test_benchmarks.py) and costs a compile per variant."""
    assert (
        p.context_len == registry.REGIME["micro"].sequence_len and splits["train"].size
    )
    return dict(
        name=name, attention=config.attention, bpb=8.0 + 0.01 * p.seed, ok=True,
        stream_err=0.0, train_s=0.0, compile_s=0.0, val_tokens=128,
        model=Transformer(config, key=jax.random.key(p.seed)),
    )  # fmt: skip


def test_runner_end_to_end(tmp_path, monkeypatch, capsys):
    # Two variants x two seeds: every table and the plot, real evaluation.
    p = dataclasses.replace(
        registry.REGIME["micro"], variants=registry.REGIME_VARIANTS[:2]
    )
    monkeypatch.setitem(registry.REGIME, "micro", p)
    monkeypatch.setattr(regime.quality, "train_one", _initialised)
    assert run.main(["regime", "--preset", "micro", "--out", str(tmp_path)]) == 0
    md = tmp_path / "regime-cpu-micro.md"
    text = md.read_text()
    assert (tmp_path / "regime-cpu-micro.png").stat().st_size > 0
    assert "python -m benchmarks.run regime --preset micro" in text
    for heading in (
        "## Runs",
        "## Mean ± sd over seeds",
        "per position bucket, 1x (128 bytes, 8 blocks)",
        "per position bucket, 2x (256 bytes, 16 blocks)",
        "full evaluated with a KV cache of 256 tokens",
        "## Differences of validation bpb",
        "## Differences that exceed the seed spread",
    ):
        assert heading in text
    assert "CHECK FAILED" not in text and "nan" not in text
    runs = [ln for ln in text.splitlines() if ln.startswith(("| vq |", "| full |"))]
    assert len(runs) == 4 + 2 * 3  # 4 runs, then a row per variant in 3 tables
    # 2x: buckets 0-1, 2-3, 4-7, 8-15 and the whole sequence, per variant.
    assert "| blocks 0–1 | blocks 2–3 | blocks 4–7 | blocks 8–15 | all |" in text
    assert text.count("| vq − full |") == 3  # 1x, 2x, validation
    assert "wrote" in capsys.readouterr().out


def test_bucket_bpb_known_means():
    block = 4
    # Block b of every row holds NLL (b + 1) * ln 2, so bucket [lo, hi) has
    # mean (lo + hi + 1) / 2 bits; row 1 adds 2 ln 2 everywhere (+1 bit).
    blocks = np.repeat(np.arange(10, dtype=np.float64) + 1, block)
    nll = np.stack([blocks, blocks + 2]) * math.log(2)
    got = regime.bucket_bpb(nll, block, (0, 2, 4, 8, 16))
    want = [(0, 2, 1.5 + 1), (2, 4, 3.5 + 1), (4, 8, 6.5 + 1), (8, 10, 9.5 + 1)]
    assert [(lo, hi) for lo, hi, _ in got] == [(lo, hi) for lo, hi, _ in want]
    np.testing.assert_allclose([b for *_, b in got], [b for *_, b in want], rtol=1e-12)
    assert regime.buckets_for(8 * block, block, (0, 2, 4, 8, 16)) == [
        (0, 2),
        (2, 4),
        (4, 8),
    ]


def test_spread_rule():
    a, b = [1.0, 1.1, 0.9], [1.2, 1.3, 1.1]  # sd 0.1 each, n 3: threshold 0.1633
    d, thr, exceeds = regime.spread_test(a, b)
    assert d == pytest.approx(-0.2) and thr == pytest.approx(2 * math.sqrt(0.02 / 3))
    assert exceeds
    d, thr, exceeds = regime.spread_test(a, [x + 0.15 for x in a])
    assert d == pytest.approx(-0.15) and not exceeds
    assert regime.spread_test([1.0], [2.0]) == (-1.0, None, None)  # one seed
    assert regime.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    # Paired: a shared seed effect cancels (differences 0.1, 0.12, 0.08).
    d, thr, exceeds = regime.paired_test(a, [1.1, 1.22, 0.98])
    assert d == pytest.approx(-0.1) and thr == pytest.approx(2 * 0.02 / math.sqrt(3))
    assert exceeds and regime.paired_test([1.0], [2.0]) == (-1.0, None, None)


def _synthetic_runs(p, offsets, jitter, ok):
    """Runs whose every bpb is `1 + offset + 0.01 * seed + jitter[seed]`."""
    runs = []
    for (name, _), seed in itertools.product(p.variants, p.seeds):
        v = 1.0 + offsets[name] + 0.01 * seed + jitter[name][seed]
        positions = {
            m: dict(
                buckets=[(lo, hi, v) for lo, hi in regime.buckets_for(
                    m * p.sequence_len, p.quality.model.block_len, p.bucket_edges)],
                bpb=v, sequences=1, finite=True, kv_cache_len=None,
            )
            for m in p.extrapolation
        }  # fmt: skip
        runs.append(
            dict(name=name, seed=seed, bpb=v, ok=ok[name], stream_err=0.0,
                 train_s=1.0, compile_s=1.0, eval_s=1.0, val_tokens=10,
                 positions=positions)
        )  # fmt: skip
    return runs


@pytest.mark.parametrize("full_ok", [True, False])
def test_report_lists_differences_beyond_the_spread(tmp_path, full_ok):
    # The three baseline variants (the counts below are for three).
    p = dataclasses.replace(
        registry.REGIME["micro"], seeds=(0, 1, 2), variants=registry.REGIME_VARIANTS[:3]
    )
    # vq and window: sd 0.01, 2se of their difference 0.0163; full - vq:
    # per-seed differences 0.005 + (0, 0.002, -0.002), within the unpaired
    # spread but beyond the paired one (2 x 0.002 / sqrt 3 = 0.0023).
    offsets = dict(vq=0.0, full=0.005, window=0.1)
    jitter = dict(vq=(0, 0, 0), full=(0, 0.002, -0.002), window=(0, 0, 0))
    ok = dict(vq=True, full=full_ok, window=True)
    kw = dict(command="c", corpus="x", n_bytes=1, n_heldout=1, wall=1.0, cpu=1.0)
    text = "\n".join(
        regime.write_report(
            p, _synthetic_runs(p, offsets, jitter, ok),
            md=tmp_path / "regime-t.md", png=tmp_path / "regime-t.png", **kw,
        )
    )  # fmt: skip
    summary = text.split("## Differences that exceed")[1].split("## Runs")[0]
    listed = [ln for ln in summary.splitlines() if ln.startswith("- ")]
    # vq - window and full - window exceed, in 3 + 1 + 4 + 1 + 1 = 10 cells
    # each (1x buckets and whole, 2x buckets and whole, validation); vq - full
    # only paired; a failed full run removes its pairs.
    paired = [ln for ln in listed if "paired only" in ln]
    assert all("window" in ln for ln in listed if ln not in paired)
    assert len(listed) - len(paired) == (20 if full_ok else 10)
    assert len(paired) == (10 if full_ok else 0)
    assert f"{len(listed)} of {30 if full_ok else 10} differences" in summary
    assert all(ln.startswith("- vq − full") for ln in paired)
    assert "- vq − window, validation bpb: -0.1000 (threshold 0.0163)" in listed
    if full_ok:
        thr = 2 * 0.002 / math.sqrt(3)
        assert (
            f"- vq − full, validation bpb: -0.0050 (paired only: threshold {thr:.4f})"
            in listed
        )
    assert ("CHECK FAILED" in text) != full_ok


def test_per_token_nll_streams_padded_batches():
    # 3 sequences in groups of 2 (the last padded), 2 segments each, equal
    # the model's one call per sequence from an empty state; full's evaluation
    # cache grows to the sequence and changes nothing inside its training one.
    cfg = registry.REGIME["micro"].quality.model.replace(
        attention="full", kv_cache_len=16
    )
    model = Transformer(cfg, key=jax.random.key(0))
    text = np.random.default_rng(0).integers(0, 256, 3 * 64 + 1).astype(np.uint8)
    x, y = regime.heldout_sequences(text, 64)
    assert x.shape == (3, 64) and (x[1:, 0] == y[:-1, -1]).all()
    big = model.with_config(**regime.eval_config(cfg, 64))
    assert big.config.kv_cache_len == 64
    got = regime.per_token_nll(big, x, y, segment_len=32, batch=2)
    logp, _, _ = big(jnp.asarray(x), big.init_state(3))
    want = -np.take_along_axis(np.asarray(logp), y[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shorter than one sequence"):
        regime.heldout_sequences(text[:64], 64)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(seeds=(0, 0)), "seeds"),
        (dict(variants=(("vq", ()), ("vq", ()))), "variants"),
        (dict(extrapolation=(0,)), "extrapolation"),
        (dict(bucket_edges=(1, 2)), "bucket_edges"),
        (dict(corpus="enwik8"), "corpus"),
    ],
)
def test_preset_rejects_bad_fields(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(registry.REGIME["micro"], **changes)


def test_linux_doc_builder_from_a_folder(tmp_path):
    docs = tmp_path / "Documentation"
    (docs / "a").mkdir(parents=True)
    (docs / "translations" / "zh").mkdir(parents=True)
    (docs / "b.rst").write_bytes(b"B text")
    (docs / "a" / "x.rst.gz").write_bytes(gzip.compress(b"A text"))
    (docs / "a" / "notes.txt").write_bytes(b"not reST")
    (docs / "translations" / "zh" / "y.rst").write_bytes(b"translated")
    cache = tmp_path / "cache"
    got = regime.linux_doc_corpus(cache, cap_bytes=100, source_dir=docs)
    # Ordered by the SHA-1 of the relative path, joined by a newline.
    a_first = (
        hashlib.sha1(b"a/x.rst.gz").hexdigest() < hashlib.sha1(b"b.rst").hexdigest()
    )
    want = b"A text\nB text" if a_first else b"B text\nA text"
    assert got == want
    assert regime.linux_doc_corpus(cache, cap_bytes=9, source_dir=docs) == want[:9]
    # Cached: read back without the source.
    (docs / "b.rst").unlink()
    assert regime.linux_doc_corpus(cache, cap_bytes=100) == got
    with pytest.raises(FileNotFoundError, match=r"no \.rst"):
        regime.rst_corpus(tmp_path / "cache", 100)

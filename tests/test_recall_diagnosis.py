"""The recall benchmark's codebook diagnosis (benchmarks/recall_diagnosis.py):
its unit-by-unit forward equals the model's call, its probe statistics equal
the quantizer's own, and a micro run writes finite numbers."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import recall, recall_diagnosis, registry
from tvq_eqx import Transformer

MICRO = registry.RECALL["micro"]


def _model(**changes):
    config = recall.variant_configs(MICRO)[0][1].replace(**changes)
    return Transformer(config, key=jax.random.key(3))


def test_unit_keys_equal_the_models_call_and_its_statistics():
    model = _model(n_layer=2, n_head=2)
    tokens = jnp.asarray(recall.batch_of(MICRO, np.random.default_rng(0), 3)["inputs"])
    logp, keys = recall_diagnosis.unit_keys(model, tokens)
    ref, _, aux = model(tokens)
    np.testing.assert_allclose(logp, ref, atol=1e-5)
    assert keys.shape == (4, *tokens.shape, 2, model.config.d_k)
    # The keys' codes and errors reproduce the scanned call's own statistics.
    arr = recall_diagnosis._probe_arrays(model, tokens)
    vq = aux["vq"]
    np.testing.assert_array_equal(arr["counts"], vq["code_count"])
    np.testing.assert_allclose(arr["sq_err"].sum(-1), vq["sq_err"], rtol=1e-5)
    np.testing.assert_allclose(arr["sq_norm"].sum(-1), vq["sq_norm"], rtol=1e-5)
    n = tokens.shape[0] * tokens.shape[1]
    np.testing.assert_allclose(arr["commit"], vq["commit_sum"] / n, rtol=1e-5)


def test_probe_metrics_by_hand():
    model = _model()
    probe = recall_diagnosis.probe_batch(MICRO)
    rows, ans, pair = probe["q_row"], probe["q_ans"], probe["q_pair"]
    np.testing.assert_array_equal(
        probe["inputs"][rows, ans], probe["inputs"][rows, pair]
    )
    np.testing.assert_array_equal(probe["inputs"][rows, pair - 1], recall.PAIR_MARK)
    m = recall_diagnosis.probe_metrics(model, probe)
    _, keys = recall_diagnosis.unit_keys(model, jnp.asarray(probe["inputs"]))
    c = model.config
    for u, unit in enumerate(model.attention_units()):
        cb = np.asarray(unit.quantizer.codebook[0])  # one head
        k = np.asarray(keys[u, ..., 0, :])
        z = np.argmin(((k[..., None, :] - cb) ** 2).sum(-1), -1)  # [B, T]
        assert m[f"u{u}.shared_key"] == np.mean(z[rows, pair] == z[rows, ans])
        usage = np.bincount(z.ravel(), minlength=c.n_code) / z.size
        nz = usage[usage > 0]
        assert math.isclose(
            m[f"u{u}.perplexity"], np.exp(-(nz * np.log(nz)).sum()), rel_tol=1e-5
        )
        assert m[f"u{u}.dead_probe"] == np.sum(usage == 0)
        err = ((k - cb[z]) ** 2).sum() / (k**2).sum()
        assert math.isclose(m[f"u{u}.rel_err"], err, rel_tol=1e-4)
        # The pair's weight in its value byte's cached code mean.
        w = []
        for i, a, p in zip(rows, ans, pair, strict=True):
            s = (a // c.block_len) * c.block_len - c.mem_len
            if p + 1 < s:
                w.append(1.0 / np.sum(z[i, :s] == z[i, p + 1]))
        assert w and math.isclose(m[f"u{u}.value_weight"], np.mean(w), rel_tol=1e-6)
    # A fresh codebook: every EMA count is 1, none dead.
    assert m["u0.dead_ema"] == 0


@pytest.mark.slow  # trains (two updates) and compiles the train step
def test_micro_run_writes_finite_diagnostics(tmp_path, monkeypatch):
    p = dataclasses.replace(MICRO, steps=2, seeds=(0,))
    monkeypatch.setitem(registry.RECALL, "micro", p)
    monkeypatch.setattr(recall_diagnosis, "RECALL", registry.RECALL)
    argv = ["--preset", "micro", "--every", "1", "--out", str(tmp_path)]
    assert recall_diagnosis.main(argv) == 0
    data = json.loads((tmp_path / "recall-diagnosis-cpu-micro.json").read_text())
    (run,) = data["runs"]
    assert [r["step"] for r in run["trajectory"]] == [0, 1, 2]
    expect = {"acc_far", "train_commit_loss", "train_code_perplexity"} | {
        f"u{u}.{k}" for u in (0, 1) for k in recall_diagnosis.UNIT_METRICS
    }
    for row in run["trajectory"]:
        assert expect <= set(row)
        finite = {k: v for k, v in row.items() if not k.startswith("train_")}
        assert all(math.isfinite(v) for v in finite.values()), row
    assert all(math.isfinite(run["trajectory"][-1][k]) for k in expect)
    assert 0 <= run["acc_far"] <= 1 and run["ok"]
    text = (tmp_path / "recall-diagnosis-cpu-micro.md").read_text()
    assert "## At update 2" in text and "| 0 |" in text
    assert (tmp_path / "recall-diagnosis-cpu-micro.png").stat().st_size > 0
    # The report is rewritten from the JSON alone, with the command of the runs.
    (tmp_path / "recall-diagnosis-cpu-micro.md").unlink()
    assert (
        recall_diagnosis.main(
            ["--preset", "micro", "--report-only", "--out", str(tmp_path)]
        )
        == 0
    )
    again = (tmp_path / "recall-diagnosis-cpu-micro.md").read_text()
    assert "`python -m benchmarks.recall_diagnosis --preset micro --every 1" in again
    assert again.split("## Runs")[1] == text.split("## Runs")[1]


def test_all_keys_codebook_counts_every_key_and_the_same_loss():
    from tvq_eqx import loss

    b = recall.batch_of(MICRO, np.random.default_rng(0), 3)
    b.pop("distance")
    b = {k: jnp.asarray(v) for k, v in b.items()}
    cfg = recall.variant_configs(MICRO)[0][1]
    plain = Transformer(cfg, key=jax.random.key(0))
    every = recall_diagnosis.AllKeysCodebook(cfg, key=jax.random.key(0))
    (_, a1), (_, a2) = loss.loss_fn(plain, b), loss.loss_fn(every, b)
    m1, m2 = a1["metrics"], a2["metrics"]
    assert float(m1["lm_loss"]) == float(m2["lm_loss"])
    # The loss mask (answers only) weighs the plain model's codebook statistics.
    _, _, s1 = plain(b["inputs"], mask=b["loss_mask"])
    _, _, s2 = every(b["inputs"], mask=b["loss_mask"])
    n_answers = float(b["loss_mask"].sum())
    np.testing.assert_array_equal(s1["vq"]["code_count"].sum((1, 2)), n_answers)
    np.testing.assert_array_equal(s2["vq"]["code_count"].sum((1, 2)), b["inputs"].size)
    assert float(m2["commit_loss"]) > float(m1["commit_loss"])

"""The long-range recall benchmark: its task generator, its scoring and one
end-to-end micro run (with a forced gate failure)."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import recall, registry, run
from tvq_eqx import TransformerConfig

LAYOUTS = [  # block_len, n_blocks, n_pairs, distances, mem_len
    (16, 17, 4, tuple(range(1, 17)), 16),
    (8, 6, 2, (2, 3, 4, 5), 8),
    (8, 10, 3, (3, 5, 9), 16),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generator_places_answers_at_stated_distance(layout):
    L, n_blocks, n_pairs, distances, mem_len = layout
    kw = dict(block_len=L, n_blocks=n_blocks, n_pairs=n_pairs, distances=distances)
    recall.check_task(mem_len=mem_len, **kw)
    b = recall.make_batch(np.random.default_rng(3), n_seq=24, **kw)
    T = n_blocks * L
    for k in ("inputs", "targets", "loss_mask", "distance"):
        assert b[k].shape == (24, T)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert np.all(b["loss_mask"].sum(1) == n_pairs)
    np.testing.assert_array_equal(b["distance"] > 0, b["loss_mask"] > 0)
    seen = set()
    for i, a in zip(*np.nonzero(b["loss_mask"]), strict=True):
        x = b["inputs"][i]
        key, value, d = x[a], b["targets"][i, a], b["distance"][i, a]
        assert x[a - 1] == recall.QUERY_MARK and key in recall.KEYS
        assert value in recall.VALUES and d in distances
        assert a // L == n_blocks - 1  # every query is in the last block
        (where,) = np.nonzero(x[:a] == key)
        assert len(where) == 1  # the pair's key, once, before the query
        p = int(where[0])
        assert x[p - 1] == recall.PAIR_MARK and x[p + 1] == value
        assert (p - 1) // L == (p + 1) // L == a // L - d  # whole pair, d blocks back
        if recall.out_of_window(int(d), L, mem_len):
            assert p + 1 < (a // L) * L - mem_len  # before the query's window
        else:
            assert p + 1 >= (a // L) * L - mem_len
        seen.add(int(d))
    assert seen <= set(distances)
    filler = ~np.isin(
        b["inputs"], [*recall.KEYS, *recall.VALUES, recall.PAIR_MARK, recall.QUERY_MARK]
    )
    assert np.all(np.isin(b["inputs"][filler], recall.FILLER))


def test_generator_is_deterministic_and_balanced():
    kw = dict(block_len=8, n_blocks=6, n_pairs=2, distances=(1, 2, 3, 4))
    a = recall.make_batch(np.random.default_rng(5), n_seq=6, **kw)
    b = recall.make_batch(np.random.default_rng(5), n_seq=6, **kw)
    c = recall.make_batch(np.random.default_rng(6), n_seq=6, **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"])
    bal = recall.make_batch(np.random.default_rng(0), n_seq=6, balanced=True, **kw)
    counts = np.bincount(bal["distance"][bal["loss_mask"] > 0], minlength=5)
    np.testing.assert_array_equal(counts[1:], [3, 3, 3, 3])
    assert len(recall.KEYS) == len(set(recall.KEYS.tolist()))
    alphabets = [set(recall.FILLER.tolist()), set(recall.KEYS.tolist())]
    alphabets += [set(recall.VALUES.tolist()), {recall.PAIR_MARK, recall.QUERY_MARK}]
    assert sum(map(len, alphabets)) == len(set().union(*alphabets))  # disjoint


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(n_pairs=0), "n_pairs"),
        (dict(distances=(2, 2)), "distinct"),
        (dict(distances=(1, 6)), "n_blocks - 1"),
        (dict(n_pairs=3, distances=(1, 2)), "one pair per block"),
        (dict(block_len=4, n_pairs=2), "do not fit"),
    ],
)
def test_check_task_rejects_bad_layouts(change, match):
    kw = dict(block_len=8, n_blocks=6, n_pairs=2, distances=(1, 2, 3), mem_len=8)
    with pytest.raises(ValueError, match=match):
        recall.check_task(**(kw | change))


def test_window_reach():
    c = TransformerConfig(block_len=8, n_layer=1)
    assert recall.window_reach(c) == 2
    assert recall.window_reach(c.replace(n_layer=2)) == 4
    assert recall.window_reach(c.replace(mem_len=16)) == 4
    assert recall.window_reach(c.replace(mem_len=0)) == 0
    assert recall.out_of_window(2, 8, 8) and not recall.out_of_window(1, 8, 8)
    assert not recall.out_of_window(2, 8, 9)


def test_scoring_on_synthetic_log_probs():
    targets = np.array([[3, 1, 2, 0], [1, 1, 2, 3]])
    mask = np.array([[0, 1, 1, 0], [1, 0, 1, 1]], np.float32)
    dist = np.array([[0, 2, 5, 0], [2, 0, 5, 2]])
    logp = np.full((2, 4, 4), math.log(0.1))
    pred = np.array([[0, 1, 3, 0], [1, 0, 2, 0]])  # right at (0,1), (1,0), (1,2)
    np.put_along_axis(logp, pred[..., None], math.log(0.7), axis=-1)
    d, correct, nll = recall.answer_scores(logp, targets, mask, dist)
    np.testing.assert_array_equal(d, [2, 5, 2, 5, 2])
    np.testing.assert_array_equal(correct, [True, False, True, True, False])
    by = recall.accuracy_by_distance(d, correct, nll, (2, 5, 7))
    assert by[2]["n"] == 3 and by[2]["acc"] == pytest.approx(2 / 3)
    assert by[5]["acc"] == pytest.approx(0.5)
    bits2 = (2 * -math.log(0.7) - math.log(0.1)) / 3 / math.log(2)
    assert by[2]["bits"] == pytest.approx(bits2)
    assert by[7]["n"] == 0 and math.isnan(by[7]["acc"])
    assert recall.mean_sd([0.2, 0.4, math.nan]) == pytest.approx((0.3, 0.1414214))


def test_micro_run_end_to_end_with_failed_gate(tmp_path, monkeypatch):
    # Two variants with the same config share every compiled program; the
    # second one's gate is made to fail, so its column must say CHECK FAILED.
    p = dataclasses.replace(
        registry.RECALL["micro"],
        variants=(("vq", ()), ("vq_again", (("attention", "vq"),))),
    )
    monkeypatch.setitem(registry.RECALL, "micro", p)
    real_check, calls = recall.quality.check, []

    def check(model, tokens):
        ok, err = real_check(model, tokens)
        calls.append(ok)
        return ok and len(calls) <= len(p.seeds), err

    monkeypatch.setattr(recall.quality, "check", check)
    assert run.main(["recall", "--preset", "micro", "--out", str(tmp_path)]) == 0
    assert calls == [True] * 4
    md = tmp_path / "recall-cpu-micro.md"
    assert (tmp_path / "recall-cpu-micro.png").stat().st_size > 0
    text = md.read_text()
    assert "python -m benchmarks.run recall --preset micro" in text
    assert "chance: 0.0625" in text and "total wall time" in text
    assert "vq_again (attention='vq')" in text
    acc_row = next(ln for ln in text.splitlines() if ln.startswith("| 3 |")).split("|")
    assert "±" in acc_row[3] and acc_row[4].strip() == "CHECK FAILED"
    assert text.count("pass (") == 2 and text.count("CHECK FAILED (") == 2

"""Codebook k-means initialisation and dead-code restart
(`tvq_eqx.train.CodebookConfig`, `kmeans_init`, `restart_dead_codes`,
`prepare_codebooks`): exact against a numpy Lloyd reference, exact with the
EMA rule, deterministic, checkpointed, no NaN on empty codes."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _runs import TINY_RUN

import tvq_eqx
from tvq_eqx import train
from tvq_eqx.cli import main

# One layer: two attention units, so the k-means init's unit-by-unit order
# (the second unit's keys depend on the first unit's codebook) is exercised.
CFG = tvq_eqx.TransformerConfig(
    n_vocab=64, d_model=16, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1, block_len=8
)
KEY = jax.random.key(7)


def _model(cfg=CFG, seed=0):
    return tvq_eqx.Transformer(cfg, key=jax.random.key(seed))


def _inputs(b=4, t=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.n_vocab)


@eqx.filter_jit
def _vq_stats(model, x):
    return model(x)[2]["vq"]


def _rel_errors(model, x):
    """Per unit: squared quantization error / squared key norm on `x`."""
    vq = _vq_stats(model, x)
    return np.asarray(vq["sq_err"]) / np.asarray(vq["sq_norm"])


def _np_lloyd(keys, w, init, iters):
    """Plain weighted Lloyd per head (float64; ties to the lowest index)."""
    keys, w, c = (np.asarray(a, np.float64) for a in (keys, w, init))
    n_head, n_code, _ = c.shape
    count = np.zeros((n_head, n_code))
    for _ in range(iters):
        new = c.copy()
        for h in range(n_head):
            d = ((keys[:, h, None, :] - c[h][None]) ** 2).sum(-1)  # [N, S]
            z = d.argmin(-1)
            for s in range(n_code):
                ws = w * (z == s)
                count[h, s] = ws.sum()
                if count[h, s] > 0:
                    new[h, s] = (ws[:, None] * keys[:, h]).sum(0) / count[h, s]
        c = new
    return c, count


def _quantizers(model):
    return [u.quantizer for u in model.attention_units()]


def test_kmeans_lowers_the_first_batch_quantization_error():
    m, x = _model(), _inputs()
    m2 = train.kmeans_init(m, x, key=KEY, iters=5)
    before, after = _rel_errors(m, x), _rel_errors(m2, x)
    assert np.all(after < 0.8 * before), (before, after)


def test_kmeans_codebook_equals_numpy_lloyd_on_the_same_keys():
    m, x = _model(), _inputs()
    w = np.ones(x.shape, np.float32)
    w[0, :5] = 0.0  # masked-out positions carry no weight
    iters = 4
    m2 = train.kmeans_init(m, x, key=KEY, iters=iters, weights=jnp.asarray(w))
    # A unit's keys depend only on the units before it, so the finished
    # model gives every unit exactly the keys it was fitted on.
    keys, wf = train.unit_keys(m2, x, jnp.asarray(w))
    h, s = CFG.n_head, CFG.n_code
    for u, q in enumerate(_quantizers(m2)):
        idx, valid = train.sample_tokens(jax.random.fold_in(KEY, u), wf, h, s)
        idx = np.asarray(idx)
        assert np.all(valid) and all(len(set(row)) == s for row in idx)
        assert np.all(np.asarray(wf)[idx] > 0)  # seeds are weighted tokens
        k = np.asarray(keys[u])
        init = k[idx, np.arange(h)[:, None]]
        ref, count = _np_lloyd(k, wf, init, iters)
        np.testing.assert_allclose(q.codebook, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(q.codebook_count, np.maximum(count, 1.0), rtol=1e-6)
        np.testing.assert_allclose(
            q.codebook_sum,
            np.maximum(count, 1.0)[..., None] * ref,
            rtol=1e-5,
            atol=1e-6,
        )
        assert float(q.ema_tally) == 1.0


def test_kmeans_is_the_ema_fixed_point_of_its_batch():
    """The next EMA step on the same batch moves the codebook only by the
    change of assignment after the last Lloyd step (none once converged)."""
    m, x = _model(), _inputs()
    m2 = train.kmeans_init(m, x, key=KEY, iters=30)
    keys, w = train.unit_keys(m2, x, jnp.ones(x.shape))
    b, t = x.shape
    for u, q in enumerate(_quantizers(m2)):
        st = q.statistics(keys[u].reshape(b, t, *keys.shape[2:]), w.reshape(b, t))
        q2 = q.ema_update(st["code_count"], st["code_key_sum"])
        used = np.asarray(st["code_count"]) > 0
        np.testing.assert_allclose(
            np.asarray(q2.codebook)[used], np.asarray(q.codebook)[used], atol=1e-5
        )


def _with_counts(model, u, counts):
    j, layer = u % 2, u // 2
    q = model.layers.stacked.units[j].quantizer
    return eqx.tree_at(
        lambda m: m.layers.stacked.units[j].quantizer.codebook_count,
        model,
        q.codebook_count.at[layer].set(jnp.asarray(counts, jnp.float32)),
    )


def test_restart_replaces_exactly_the_dead_codes():
    m, x = _model(), _inputs()
    counts = np.full((CFG.n_head, CFG.n_code), 4.0, np.float32)
    counts[0, [1, 5]] = [0.01, 0.3]  # dead at threshold 0.1 of the mean
    counts[1, 2] = 0.5  # above 0.1 x mean: alive
    m = _with_counts(m, 1, counts)
    before = _quantizers(m)
    m2, n = train.restart_dead_codes(m, x, key=KEY, threshold=0.1)
    keys, _ = train.unit_keys(m, x, jnp.ones(x.shape))
    fair = counts.mean(-1, keepdims=True)
    dead = counts < 0.1 * fair
    assert int(n) == int(dead.sum()) == 2
    for u, (q0, q1) in enumerate(zip(before, _quantizers(m2), strict=True)):
        s0, s1 = np.asarray(q0.codebook_sum), np.asarray(q1.codebook_sum)
        c0, c1 = np.asarray(q0.codebook_count), np.asarray(q1.codebook_count)
        d = dead if u == 1 else np.zeros_like(dead)
        # Every other code bit-identical.
        assert s0[~d].tobytes() == s1[~d].tobytes()
        assert c0[~d].tobytes() == c1[~d].tobytes()
        for h, sidx in zip(*np.nonzero(d), strict=True):
            m_h = float(np.float32(fair[h, 0]))
            assert c1[h, sidx] == pytest.approx(m_h, rel=1e-6)
            codeword = s1[h, sidx] / c1[h, sidx]
            # The codeword is one of this unit's keys of this head.
            dist = np.abs(np.asarray(keys[u][:, h]) - codeword).max(-1)
            assert dist.min() < 1e-5


def test_restart_then_ema_follows_the_documented_rule():
    """After a restart, one train step moves the codebook by the EMA rule:
    sum <- g sum + (1 - g) key_sum, count <- g count + (1 - g) n, from the
    re-seeded values."""
    cfg = CFG
    m, x = _model(), _inputs()
    counts = np.full((cfg.n_head, cfg.n_code), 4.0, np.float32)
    counts[:, :3] = 0.0  # three dead codes per head
    m = _with_counts(m, 0, counts)
    m, n = train.restart_dead_codes(m, x, key=KEY, threshold=0.1)
    assert int(n) == 2 * 3
    b, t = x.shape
    keys, w = train.unit_keys(m, x, jnp.ones(x.shape))
    opt = train.make_optimizer(warmup_steps=1, total_steps=4)
    ts = train.init_train_state(m, opt, b, key=KEY)
    batch = dict(inputs=x, targets=x, loss_mask=jnp.ones(x.shape))
    ts2, _ = train.train_step(ts, batch, optimizer=opt, update_len=t)
    g = cfg.c_gamma
    for u, (q, q2) in enumerate(
        zip(_quantizers(m), _quantizers(ts2.model), strict=True)
    ):
        st = q.statistics(keys[u].reshape(b, t, *keys.shape[2:]), w.reshape(b, t))
        np.testing.assert_allclose(
            q2.codebook_sum,
            g * q.codebook_sum + (1 - g) * st["code_key_sum"],
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            q2.codebook_count,
            g * q.codebook_count + (1 - g) * st["code_count"],
            rtol=1e-6,
        )


def test_no_nan_with_empty_codes_or_too_few_keys():
    m, x = _model(), _inputs()
    w = jnp.zeros(x.shape).at[0, :3].set(1.0)  # 3 weighted keys, 8 codes
    m2 = train.kmeans_init(m, x, key=KEY, weights=w)
    m3, n = train.restart_dead_codes(m2, x, key=KEY, threshold=0.9, weights=w)
    for q in _quantizers(m2) + _quantizers(m3):
        for a in (q.codebook, q.codebook_sum, q.codebook_count):
            assert np.all(np.isfinite(np.asarray(a)))
    # Nothing weighted: the codebooks stay what they were (count 1 = the
    # official count), nothing is restarted.
    none = jnp.zeros(x.shape)
    m4 = train.kmeans_init(m, x, key=KEY, weights=none)
    for q0, q1 in zip(_quantizers(m), _quantizers(m4), strict=True):
        np.testing.assert_allclose(q1.codebook, q0.codebook, rtol=1e-6)
    m5, n5 = train.restart_dead_codes(
        _with_counts(m, 0, np.zeros((2, 8))), x, key=KEY, threshold=0.5, weights=none
    )
    assert int(n5) == 0


def test_sampling_is_deterministic_given_the_key():
    m, x = _model(), _inputs()
    m = _with_counts(m, 0, np.where(np.arange(8) < 4, 0.0, 5.0)[None].repeat(2, 0))
    a, _ = train.restart_dead_codes(m, x, key=KEY, threshold=0.1)
    b, _ = train.restart_dead_codes(m, x, key=KEY, threshold=0.1)
    c, _ = train.restart_dead_codes(m, x, key=jax.random.key(8), threshold=0.1)
    qa, qb, qc = (_quantizers(t)[0].codebook_sum for t in (a, b, c))
    assert np.asarray(qa).tobytes() == np.asarray(qb).tobytes()
    assert np.asarray(qa).tobytes() != np.asarray(qc).tobytes()


def test_config_checks_and_flags(capsys):
    assert not train.CodebookConfig().active  # official default: neither
    assert train.RunConfig().codebook == train.CodebookConfig()
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(init="random"), "init"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(restart_threshold=1.5), "restart_threshold"),
        (dict(restart_threshold=-0.1), "restart_threshold"),
        (dict(restart_every=0), "restart_every"),
    ]
    for bad, field in cases:  # a wrong literal: jaxtyping's TypeError or ours
        with pytest.raises((ValueError, TypeError), match=field):
            train.CodebookConfig(**bad)
    run = train.RunConfig().replace(codebook=dict(init="kmeans"))
    assert train.RunConfig.from_dict(run.to_dict()) == run
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--codebook.init {official,kmeans}",
        "--codebook.kmeans-iters INT",
        "--codebook.restart-threshold FLOAT",
        "--codebook.restart-every INT",
    ):
        assert flag in out, flag


def _stream(run):
    toks = (np.arange(4000) * 7 % 251).astype(np.int32)
    return train.make_stream(run, toks[:3000], train=True)


def _state_bytes(ts):
    return [
        np.asarray(x).tobytes() for x in jax.tree.leaves(eqx.filter(ts, eqx.is_array))
    ]


def test_fit_applies_both_and_a_resume_equals_the_uninterrupted_run(tmp_path):
    run = TINY_RUN.replace(
        steps=8,
        save_every=4,
        codebook=dict(init="kmeans", restart_threshold=0.5, restart_every=1),
    )
    full = train.fit(train.new_train_state(run), run, _stream(run),
                     handle_sigint=False)  # fmt: skip
    plain_run = run.replace(codebook=dict(init="official", restart_threshold=0.0))
    plain = train.fit(train.new_train_state(plain_run), plain_run, _stream(run),
                      handle_sigint=False)  # fmt: skip
    assert _state_bytes(full.train_state) != _state_bytes(plain.train_state)
    # The restart checks ran before batches 1, 2, 3 (logged every 2 updates).
    logged = [r for r in full.history if r["split"] == "train"]
    assert all("restarted_codes" in r for r in logged)
    # Stopped after update 4 (2 batches), resumed from its checkpoint: the
    # k-means init is not redone (step > 0), the restarts draw the same keys.
    stopped = train.fit(train.new_train_state(run), run, _stream(run), stop_at=4,
                        checkpoint_dir=tmp_path, handle_sigint=False)  # fmt: skip
    assert stopped.step == 4
    like = eqx.filter_eval_shape(train.new_train_state, run)
    ts, _ = train.load_checkpoint(tmp_path, like)
    resumed = train.fit(ts, run, _stream(run), checkpoint_dir=tmp_path,
                        handle_sigint=False)  # fmt: skip
    assert resumed.step == 8
    assert _state_bytes(resumed.train_state) == _state_bytes(full.train_state)


def test_benchmark_report_means_over_seeds(tmp_path):
    """`benchmarks/codebook_init.py report`: mean ± sample sd per option over
    the runs that passed the gate; a failed run is named, not averaged."""
    import json

    from benchmarks import codebook_init as cb

    runs = tmp_path / cb.RUNS_DIR
    runs.mkdir()
    for option, seed, acc, ok in (
        ("official", 0, 0.5, True),
        ("official", 1, 0.7, True),
        ("kmeans", 0, 0.9, True),
        ("kmeans", 1, 0.1, False),
    ):
        row = dict(bench="recall", preset="cpu", option=option, seed=seed, ok=ok,
                   acc_far=acc, bits_far=1.0, acc_d1=acc, last_train_bits=1.0,
                   train_s=1.0)  # fmt: skip
        (runs / f"{option}-{seed}.json").write_text(json.dumps(row))
    text = cb.report(tmp_path).read_text()
    sd = float(np.std([0.5, 0.7], ddof=1))
    assert f"| official | 0,1 | 0.600 ± {sd:.3f} |" in text
    assert "| kmeans | 0 (failed: 1) | 0.900 |" in text


def test_fit_with_grad_accum_equals_the_whole_batch():
    """The codebook hooks run on the whole batch before the train step, and
    grad_accum splits only the step: with k-means init and the restart on,
    `fit` with 2 micro-batches equals `fit` with 1 (to float rounding)."""
    run = TINY_RUN.replace(
        steps=6,
        codebook=dict(init="kmeans", restart_threshold=0.5, restart_every=1),
    )
    runs = [run, run.replace(grad_accum=2)]
    ends = [
        train.fit(train.new_train_state(r), r, _stream(r), handle_sigint=False)
        for r in runs
    ]
    assert all(e.step == 6 for e in ends)
    one, two = (
        jax.tree.leaves(eqx.filter(e.train_state.model, eqx.is_inexact_array))
        for e in ends
    )
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

"""Gradient accumulation: `train_step`'s `grad_accum` (`--grad-accum`) and
`with_ema_codebook(optax.MultiSteps(opt, k))` each equal one update on the
whole (concatenated) batch: trainable parameters, codebook (EMA sums,
counts, tally), optimizer state, carried attention state and metrics."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import TINY_RUN

import tvq_eqx
from tvq_eqx import train

CFG = tvq_eqx.TransformerConfig(
    n_vocab=32, d_model=32, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1, block_len=8
)


def _batch(key, b=4, t=32, vocab=32):
    toks = jax.random.randint(key, (b, t + 1), 0, vocab)
    # Padding in one row only: the micro-batches hold different token counts
    # (which a per-micro-batch mean over tokens would weigh wrongly).
    mask = jnp.ones((b, t), jnp.float32).at[1, t // 3 :].set(0.0)
    starts = (jnp.arange(t)[None, :] % 12 == 0) | (jnp.arange(b)[:, None] == 2)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=mask,
        doc_starts=jnp.broadcast_to(starts, (b, t)),
    )


def _assert_trees_close(a, b, *, rtol, atol, what):
    a_leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(a, eqx.is_array))
    b_leaves = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(a_leaves) == len(b_leaves), what
    for (path, x), y in zip(a_leaves, b_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what}{jax.tree_util.keystr(path)}",
        )


# A smooth optimizer with state (momentum) and a whole-tree transformation
# (clipping): Adam's first steps, `g / (|g| + 1e-9)`, would turn rounding
# differences of near-zero gradients into differences of the learning rate.
SGD = train.with_ema_codebook(
    optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.2, momentum=0.9))
)


@pytest.mark.parametrize(
    "grad_accum, average, doc_masking",
    [(2, "positions", False), (4, "tokens", True)],
)
def test_train_step_grad_accum_equals_the_whole_batch(
    grad_accum, average, doc_masking, getkey
):
    """Two batches (the state carried from the first into the second), each
    of two update segments: with `grad_accum` micro-batches everything
    equals the whole batch's step."""
    model = tvq_eqx.Transformer(CFG.replace(lm_loss_average=average), key=getkey())
    ts = train.init_train_state(model, SGD, 4, key=getkey())
    batches = [_batch(getkey()), _batch(getkey())]

    def two_steps(n):
        step = jax.jit(
            lambda ts, b: train.train_step(
                ts,
                b,
                optimizer=SGD,
                update_len=16,
                doc_masking=doc_masking,
                skip_nonfinite=True,  # the skip's selection runs (nothing skipped)
                grad_accum=n,
            )
        )
        out, history = ts, []
        for b in batches:
            out, metrics = step(out, b)
            history.append(metrics)
        return out, history

    whole, whole_metrics = two_steps(1)
    accum, accum_metrics = two_steps(grad_accum)
    assert int(accum.step) == int(whole.step) == 4
    _assert_trees_close(accum.model, whole.model, rtol=1e-5, atol=1e-6, what="model")
    _assert_trees_close(
        accum.opt_state, whole.opt_state, rtol=1e-5, atol=1e-6, what="opt_state"
    )
    _assert_trees_close(
        accum.attn_state, whole.attn_state, rtol=1e-5, atol=1e-5, what="attn_state"
    )
    for q_acc, q_whole in zip(
        accum.model.attention_units(), whole.model.attention_units(), strict=True
    ):
        # The EMA step once per update, on the whole batch's statistics.
        assert float(q_acc.quantizer.ema_tally) == 5.0  # 1 + four updates
        assert float(q_whole.quantizer.ema_tally) == 5.0
    # The parameters moved: the comparison is not of two initial states.
    assert not np.allclose(whole.model.embedding.weight, model.embedding.weight)
    for m_acc, m_whole in zip(accum_metrics, whole_metrics, strict=True):
        assert set(m_acc) == set(m_whole)
        for k in m_whole:
            np.testing.assert_allclose(
                m_acc[k], m_whole[k], rtol=1e-5, atol=1e-6, err_msg=k
            )
        assert float(m_acc["skipped_updates"]) == 0.0


def test_grad_accum_micro_batches_are_strided_rows_with_their_state():
    from tvq_eqx.train._steps import _micro_rows, _whole_rows

    x = jnp.arange(3 * 6 * 2).reshape(3, 6, 2)  # [layers, batch, ...]
    micro = _micro_rows(x, 3, 1)
    assert micro.shape == (3, 3, 2, 2)
    # Micro-batch i holds rows i, i + 3: with the batch split over devices in
    # contiguous blocks, each micro-batch has rows on every device.
    np.testing.assert_array_equal(micro[1], x[:, 1::3])
    np.testing.assert_array_equal(_whole_rows(micro, 1), x)


def test_grad_accum_skips_the_whole_update_when_a_micro_batch_is_nonfinite(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    # Token 31's embedding is NaN: only the rows holding it (micro-batch 1 of
    # 2: rows 1 and 3) give a NaN loss.
    model = eqx.tree_at(
        lambda m: m.embedding.weight, model, model.embedding.weight.at[31].set(jnp.nan)
    )
    ts = train.init_train_state(model, SGD, 4, key=getkey())
    batch = _batch(getkey(), t=16, vocab=31)
    batch["inputs"] = batch["inputs"].at[3, 5].set(31)
    new, metrics = train.make_train_step(
        SGD, update_len=16, donate=False, skip_nonfinite=True, grad_accum=2
    )(ts, {k: np.asarray(v) for k, v in batch.items()})
    assert float(metrics["skipped_updates"]) == 1.0
    _assert_trees_close(new.model, ts.model, rtol=0, atol=0, what="model")
    _assert_trees_close(new.attn_state, ts.attn_state, rtol=0, atol=0, what="attn")


def test_grad_accum_must_divide_the_batch(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    ts = train.init_train_state(model, SGD, 4, key=getkey())
    batch = _batch(getkey(), t=16)
    with pytest.raises(
        ValueError, match=r"grad_accum=3 \(--grad-accum\) must divide the batch size 4"
    ):
        train.train_step(ts, batch, optimizer=SGD, update_len=16, grad_accum=3)
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="grad_accum .*positive int"):
            train.make_train_step(SGD, update_len=16, grad_accum=bad)
    with pytest.raises(
        ValueError, match=r"grad_accum=3 \(--grad-accum\).*data.batch_size=2"
    ):
        TINY_RUN.replace(grad_accum=3)
    with pytest.raises(ValueError, match="RunConfig.grad_accum must be a positive"):
        TINY_RUN.replace(grad_accum=0)
    assert TINY_RUN.replace(grad_accum=2).grad_accum == 2


def test_grad_accum_must_divide_each_devices_rows(getkey):
    mesh = train.make_mesh()  # 4 CPU devices (conftest.py)
    run = TINY_RUN.replace(data=dict(batch_size=8), grad_accum=4)
    with pytest.raises(ValueError, match=r"2 rows per device.*multiple of 4 x 4"):
        train.mesh_for_run(run, data=4)
    assert train.mesh_for_run(run.replace(grad_accum=2), data=4) is not None
    model = tvq_eqx.Transformer(CFG, key=getkey())
    ts = train.shard_train_state(
        train.init_train_state(model, SGD, 8, key=getkey()), mesh
    )
    step = train.make_train_step(SGD, update_len=16, mesh=mesh, grad_accum=4)
    batch = {k: np.asarray(v) for k, v in _batch(getkey(), b=8, t=16).items()}
    with pytest.raises(ValueError, match=r"grad_accum=4 \(--grad-accum\).*per device"):
        step(ts, batch)


def test_resume_may_change_grad_accum():
    meta = dict(path="ckpt", step=2)
    train.runs.check_resume(TINY_RUN, TINY_RUN.replace(grad_accum=2), meta)


@jax.jit
def _grads(model, batch):
    return eqx.filter_grad(lambda m: tvq_eqx.loss_fn(m, batch)[0])(model)


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_multisteps_inside_with_ema_codebook_equals_the_concatenated_batch(
    use_grad_mean, getkey
):
    """`with_ema_codebook(optax.MultiSteps(opt, 2))` over two micro-batches,
    twice == `with_ema_codebook(opt)` on the two concatenated, twice: the
    main optimizer on the mean gradient, the codebook's EMA step on the
    summed statistics (as the train step's `grad_accum`). Summed gradients
    (`use_grad_mean=False`) are twice the mean: the main optimizer is then
    SGD with half the learning rate."""
    model = tvq_eqx.Transformer(CFG, key=getkey())
    params = lambda m: eqx.filter(m, eqx.is_inexact_array)
    if use_grad_mean:
        inner, whole_opt = optax.adamw(1e-2), optax.adamw(1e-2)
        every_k = 2
    else:
        inner, whole_opt = optax.sgd(0.05), optax.sgd(0.1)
        every_k = lambda step: jnp.full((), 2, jnp.int32)  # a schedule
    accumulating = train.with_ema_codebook(
        optax.MultiSteps(inner, every_k, use_grad_mean=use_grad_mean)
    )
    whole = train.with_ema_codebook(whole_opt)
    batches = [
        {k: v for k, v in _batch(getkey(), t=16).items() if k != "doc_starts"}
        for _ in range(2)
    ]

    ref, ref_state = model, whole.init(params(model))
    acc, acc_state = model, accumulating.init(params(model))
    for batch in batches:
        u, ref_state = whole.update(_grads(ref, batch), ref_state, params(ref))
        ref = eqx.apply_updates(ref, u)
        for i in range(2):
            micro = {k: v[2 * i : 2 * i + 2] for k, v in batch.items()}
            u, acc_state = accumulating.update(
                _grads(acc, micro), acc_state, params(acc)
            )
            if i == 0:  # accumulating: no update yet
                assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
            acc = eqx.apply_updates(acc, u)
    _assert_trees_close(acc, ref, rtol=1e-5, atol=1e-6, what="model")
    for unit in acc.attention_units():
        assert float(unit.quantizer.ema_tally) == 3.0  # 1 + two EMA steps
    acc(batches[0]["inputs"])  # the tally is whole: the model runs


def test_multisteps_keeps_its_settings_and_the_chain_guard():
    skip = optax.skip_not_finite
    opt = train.with_ema_codebook(
        optax.MultiSteps(optax.sgd(0.1), 3, should_skip_update_fn=skip)
    )
    with pytest.raises(train.CodebookRoutingError):
        optax.chain(optax.clip_by_global_norm(1.0), opt)
    model = tvq_eqx.Transformer(CFG, key=jax.random.key(0))
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    assert isinstance(state, optax.MultiStepsState)
    assert state.skip_state != ()  # skip_not_finite's state: the setting kept
    # A routed optimizer inside MultiSteps inside with_ema_codebook: the
    # inner one would be chained behind the guard, which it refuses.
    with pytest.raises(train.CodebookRoutingError):
        train.with_ema_codebook(
            optax.MultiSteps(train.with_ema_codebook(optax.sgd(0.1)), 2)
        )


def test_fit_with_grad_accum_equals_fit_without(tmp_path):
    run = dataclasses.replace(TINY_RUN, steps=4, save_every=0, eval_batches=1)
    toks = (np.arange(2000) * 7 % 251).astype(np.int32)
    stream = train.make_stream(run, toks, train=True)

    def fitted(grad_accum):
        r = run.replace(grad_accum=grad_accum)
        ts = train.init_train_state(
            tvq_eqx.Transformer(r.model, key=jax.random.key(0)),
            SGD,
            r.data.batch_size,
            key=jax.random.key(1),
        )
        return train.fit(ts, r, stream, optimizer=SGD, handle_sigint=False)

    one, two = fitted(1), fitted(2)
    assert one.status == two.status == "completed" and two.step == 4
    _assert_trees_close(
        two.train_state, one.train_state, rtol=1e-5, atol=1e-5, what="train_state"
    )
    assert [r["lm_loss"] for r in two.history] == pytest.approx(
        [r["lm_loss"] for r in one.history], rel=1e-5
    )

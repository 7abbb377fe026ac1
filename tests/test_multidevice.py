"""Data parallelism: a 4-device step equals the 1-device step on the same
global batch (loss, gradients, new codebook), every device holding the same
codebook.

The four CPU devices come from `jax_num_cpu_devices` in conftest.py.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tvq_eqx
from tvq_eqx import train


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 4, jax.devices()
    cfg = tvq_eqx.TransformerConfig(
        n_vocab=64, d_model=32, d_k=8, d_v=16, n_head=2, n_code=8, n_layer=1,
        block_len=8,
    )  # fmt: skip
    model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 33), 0, 64), np.int32)
    mask = np.ones((8, 32), np.float32)
    mask[5, 20:] = 0.0  # padding on one device's rows only
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=mask)
    return model, batch, train.make_mesh()


def _max_abs_diff(tree1, tree2) -> float:
    leaves1, leaves2 = jax.tree.leaves(tree1), jax.tree.leaves(tree2)
    assert len(leaves1) == len(leaves2)
    return max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves1, leaves2, strict=True)
    )


def test_four_device_gradients_equal_one_device(setup):
    model, batch, mesh = setup

    @eqx.filter_jit
    def grads(model, b):
        f = lambda m: tvq_eqx.loss_fn(m, b, m.init_state(8))
        (loss, _), g = eqx.filter_value_and_grad(f, has_aux=True)(model)
        return loss, g

    loss1, g1 = grads(model, {k: jnp.asarray(v) for k, v in batch.items()})
    loss4, g4 = grads(model, train.shard_batch(batch, mesh))
    assert abs(float(loss1) - float(loss4)) < 1e-6
    assert _max_abs_diff(g1, g4) < 1e-6


def test_four_device_train_steps_equal_one_device(setup):
    model, batch, mesh = setup
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=4)

    def run(mesh):
        ts = train.init_train_state(model, opt, 8, key=jax.random.key(2))
        if mesh is not None:
            ts = train.shard_train_state(ts, mesh)
        step = train.make_train_step(opt, update_len=16, mesh=mesh)
        ts, _ = step(ts, batch, reset=True)
        return step(ts, batch)

    ts1, m1 = run(None)
    ts4, m4 = run(mesh)
    params = lambda ts: eqx.filter(ts.model, eqx.is_inexact_array)
    assert _max_abs_diff(params(ts1), params(ts4)) < 1e-5
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
    units1, units4 = ts1.model.attention_units(), ts4.model.attention_units()
    for u1, u4 in zip(units1, units4, strict=True):
        for a, b in (
            (u1.quantizer.codebook_sum, u4.quantizer.codebook_sum),
            (u1.quantizer.codebook_count, u4.quantizer.codebook_count),
        ):
            assert float(jnp.max(jnp.abs(a - b))) < 1e-5
            # The EMA codebook is replicated and identical on every device.
            assert b.sharding.is_fully_replicated
            shards = [np.asarray(s.data) for s in b.addressable_shards]
            assert len(shards) == 4
            for s in shards[1:]:
                np.testing.assert_array_equal(shards[0], s)
    # The carried attention state is split over the batch, not replicated.
    assert not ts4.attn_state.stacked[0].cache_mean.sharding.is_fully_replicated


def test_four_device_grad_accum_equals_one_device_whole_batch(setup):
    """grad_accum=2 on 4 devices (2 rows per device, each micro-batch one
    row on every device) == the whole batch on one device."""
    model, batch, mesh = setup
    opt = train.with_ema_codebook(optax.sgd(0.1, momentum=0.9))

    def run(mesh, grad_accum):
        ts = train.init_train_state(model, opt, 8, key=jax.random.key(2))
        if mesh is not None:
            ts = train.shard_train_state(ts, mesh)
        step = train.make_train_step(
            opt, update_len=16, mesh=mesh, grad_accum=grad_accum
        )
        ts, _ = step(ts, batch, reset=True)
        return step(ts, batch)

    ts1, m1 = run(None, 1)
    ts4, m4 = run(mesh, 2)
    assert (
        _max_abs_diff(eqx.filter(ts1, eqx.is_array), eqx.filter(ts4, eqx.is_array))
        < 1e-5
    )
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
    # The carried state stays split over the batch.
    assert not ts4.attn_state.stacked[0].cache_mean.sharding.is_fully_replicated

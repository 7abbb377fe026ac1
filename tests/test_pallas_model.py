"""The model gives the same loss, gradients and carried state with the Pallas
kernels (interpret mode on CPU) as with the xla form."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err

import tvq_eqx

LOSS_TOL = 1e-5
GRAD_TOL = 1e-5  # whole-gradient relative error (float32)
LEAF_TOL = 1e-4  # per parameter array (small arrays carry more relative rounding)


def _loss_and_grads(model, batch, state):
    (loss, aux), grads = eqx.filter_value_and_grad(tvq_eqx.loss_fn, has_aux=True)(
        model, batch, state
    )
    return loss, aux["state"], grads


def _run_segments(model, impl, tokens, b, t, step, results):
    m = model.with_config(implementation=impl)
    state = m.init_state(b)
    outs = []
    for seg in range(2):  # two segments: the second starts from a real state
        x = tokens[:, seg * t : (seg + 1) * t + 1]
        batch = {
            "inputs": x[:, :-1],
            "targets": x[:, 1:],
            "loss_mask": jnp.ones((b, t), jnp.float32).at[0, :3].set(0.0),
        }
        loss, state, grads = step(m, batch, state)
        outs.append((loss, grads))
    results[impl] = (outs, state)


@pytest.mark.parametrize(
    "attention", ["vq", pytest.param("window", marks=pytest.mark.slow)]
)
def test_model_pallas_equals_xla(attention):
    config = tvq_eqx.TransformerConfig(
        n_vocab=32,
        d_model=32,
        d_k=8,
        d_v=16,
        n_head=2,
        n_code=8,
        n_layer=1,
        block_len=8,
        mem_len=8,  # the kernels' window is one previous block
        attention=attention,
        implementation="xla",
    )
    model = tvq_eqx.Transformer(config, key=jax.random.key(0))
    b, t = 2, 24
    tokens = jax.random.randint(jax.random.key(1), (b, 2 * t + 1), 0, config.n_vocab)
    step = eqx.filter_jit(_loss_and_grads)
    results = {}
    for impl in ("xla", "pallas"):
        _run_segments(model, impl, tokens, b, t, step, results)

    (ref_outs, ref_state), (got_outs, got_state) = results["xla"], results["pallas"]
    for (ref_loss, ref_g), (got_loss, got_g) in zip(ref_outs, got_outs, strict=True):
        assert got_loss.shape == () and got_loss.dtype == ref_loss.dtype
        assert abs(float(got_loss) - float(ref_loss)) <= LOSS_TOL * abs(float(ref_loss))
        ref_leaves = jax.tree.leaves(eqx.filter(ref_g, eqx.is_inexact_array))
        got_leaves = jax.tree.leaves(eqx.filter(got_g, eqx.is_inexact_array))
        assert [x.shape for x in ref_leaves] == [x.shape for x in got_leaves]
        flat = lambda leaves: jnp.concatenate([x.ravel() for x in leaves])
        assert rel_err(flat(ref_leaves), flat(got_leaves)) <= GRAD_TOL
        for r, g in zip(ref_leaves, got_leaves, strict=True):
            if float(jnp.linalg.norm(r)) > 0:
                assert rel_err(r, g) <= LEAF_TOL
    for r, g in zip(
        jax.tree.leaves(ref_state), jax.tree.leaves(got_state), strict=True
    ):
        assert r.shape == g.shape and r.dtype == g.dtype
        if jnp.issubdtype(r.dtype, jnp.floating):
            assert rel_err(r, g) <= GRAD_TOL
        else:
            assert bool(jnp.all(r == g))


def test_model_passes_its_pallas_config():
    """`TransformerConfig(pallas=...)` reaches the kernels: a query tile of 8
    does not divide block_len 12 and the kernels' tile check rejects it."""
    config = tvq_eqx.TransformerConfig(
        n_vocab=16,
        d_model=16,
        d_k=4,
        d_v=8,
        n_code=4,
        n_layer=1,
        block_len=12,
        implementation="pallas",
    )
    model = tvq_eqx.Transformer(config, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 25), 0, config.n_vocab)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": jnp.ones((1, 24), jnp.float32),
    }
    loss, _ = tvq_eqx.loss_fn(model, batch, model.init_state(1))
    assert bool(jnp.isfinite(loss))
    bad = model.with_config(
        pallas=tvq_eqx.PallasConfig(tvq_eqx.ops.BlockSizes(block_q=8))
    )
    with pytest.raises(ValueError, match="multiple of the query tile"):
        tvq_eqx.loss_fn(bad, batch, bad.init_state(1))

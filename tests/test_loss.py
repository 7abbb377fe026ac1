"""loss_fn: the objective, its gradients, the EMA codebook rule, masking."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import tvq_eqx
from tvq_eqx.nn import VectorQuantizer, rms_norm

CFG = dict(
    d_model=32, d_k=8, d_v=12, n_head=2, n_code=16, n_layer=1, block_len=8, c_gamma=0.9
)

value_and_grad = eqx.filter_jit(
    eqx.filter_value_and_grad(tvq_eqx.loss_fn, has_aux=True)
)


def make_batch(getkey, b=2, t=32, masked=0):
    x = jax.random.randint(getkey(), (b, t + 1), 0, 256)
    mask = jnp.ones((b, t)).at[:, t - masked :].set(0.0)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], loss_mask=mask)


def first_unit_keys(model, inputs):
    """Keys of layer 0, unit 0, recomputed by hand (no abs PE, no dropout):
    RMS norm with gain and bias on the input, RMS norm without centring on k."""
    unit = model.layers[0].units[0]
    c = model.config
    x = model.embedding.weight[inputs]
    xt = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
    xt = xt * unit.norm.weight[None, None] + unit.norm.bias[None, None]
    k = (xt @ unit.w_kvg)[..., : c.n_head * c.d_k]
    return rms_norm(k.reshape(*inputs.shape, c.n_head, c.d_k))


def test_loss_is_jittable_finite_and_reports_metrics(getkey):
    model = tvq_eqx.Transformer(
        tvq_eqx.TransformerConfig(**{**CFG, "n_layer": 2}), key=getkey()
    )
    batch = make_batch(getkey)
    (loss, aux), grads = value_and_grad(model, batch, model.init_state(2), key=getkey())
    assert loss.shape == () and np.isfinite(loss)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    m = aux["metrics"]
    for name in (
        "loss",
        "lm_loss",
        "lm_loss_sum",
        "token_count",
        "bits_per_token",
        "mask_fraction",
        "commit_loss",
        "codebook_loss",
        "code_entropy",
        "code_perplexity",
        "dead_code_fraction",
        "quant_rel_error",
    ):
        assert m[name].shape == () and m[name].dtype == jnp.float32, name
    assert isinstance(aux["state"], tvq_eqx.TransformerState)
    # The codebook surrogate enters with value 0: loss = lm + c_beta * commit
    # (no padding here, so the per-position and per-token LM means agree).
    np.testing.assert_allclose(
        loss, m["lm_loss"] + model.config.c_beta * m["commit_loss"], rtol=1e-6
    )
    assert float(m["commit_loss"]) > 0
    # An untrained byte model is near uniform: ~8 bits per token.
    assert 6.0 < float(m["bits_per_token"]) < 10.0


def test_lm_loss_equals_explicit_masked_nll(getkey):
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey, masked=5)
    _, aux = tvq_eqx.loss_fn(model, batch, model.init_state(2))
    logprobs, _, _ = model(batch["inputs"], model.init_state(2))
    nll = -np.take_along_axis(
        np.asarray(logprobs), np.asarray(batch["targets"])[..., None], -1
    )[..., 0]
    mask = np.asarray(batch["loss_mask"])
    np.testing.assert_allclose(
        aux["metrics"]["lm_loss"], (nll * mask).sum() / mask.sum(), rtol=1e-5
    )
    assert float(aux["metrics"]["mask_fraction"]) == pytest.approx(54 / 64)
    # The objective's LM term: over all B * T positions (official) or over
    # the unmasked tokens.
    commit = model.config.c_beta * aux["metrics"]["commit_loss"]
    np.testing.assert_allclose(
        aux["metrics"]["loss"] - commit, (nll * mask).sum() / mask.size, rtol=1e-5
    )
    per_token = model.with_config(lm_loss_average="tokens")
    _, aux_t = tvq_eqx.loss_fn(per_token, batch, per_token.init_state(2))
    np.testing.assert_allclose(
        aux_t["metrics"]["loss"] - commit, (nll * mask).sum() / mask.sum(), rtol=1e-5
    )
    assert float(aux_t["metrics"]["lm_loss"]) == float(aux["metrics"]["lm_loss"])
    # Targets under the mask do not matter.
    other = dict(batch, targets=batch["targets"].at[:, -5:].set(7))
    _, aux2 = tvq_eqx.loss_fn(model, other, model.init_state(2))
    assert float(aux2["metrics"]["lm_loss"]) == float(aux["metrics"]["lm_loss"])


@pytest.mark.parametrize("masked", [0, 11])
def test_sgd_step_on_codebook_is_exactly_the_ema(getkey, masked):
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey, masked=masked)
    (_, _), grads = value_and_grad(model, batch, model.init_state(2))
    unit, g_unit = model.layers[0].units[0], grads.layers[0].units[0]

    # Explicit EMA target from hand-computed keys and codes, unmasked tokens only.
    keys = np.asarray(first_unit_keys(model, batch["inputs"]), np.float64)  # [B,T,H,K]
    codebook = np.asarray(unit.quantizer.codebook, np.float64)  # [H,S,K]
    keep = np.asarray(batch["loss_mask"]) > 0
    gamma = model.config.c_gamma
    want_sum = gamma * np.asarray(unit.quantizer.codebook_sum, np.float64)
    want_count = gamma * np.asarray(unit.quantizer.codebook_count, np.float64)
    for h in range(codebook.shape[0]):
        k = keys[..., h, :][keep]  # [n, K]
        codes = np.argmin(((k[:, None, :] - codebook[h][None]) ** 2).sum(-1), axis=1)
        for s in range(codebook.shape[1]):
            want_sum[h, s] += (1 - gamma) * k[codes == s].sum(0)
            want_count[h, s] += (1 - gamma) * (codes == s).sum()

    q, gq = unit.quantizer, g_unit.quantizer
    assert_close(want_sum, q.codebook_sum - gq.codebook_sum, 1e-5, name="sum")
    assert_close(want_count, q.codebook_count - gq.codebook_count, 1e-6, name="count")


def test_ema_update_method_matches_surrogate_step(getkey):
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey, masked=3)
    _, _, aux = model(batch["inputs"], model.init_state(2), mask=batch["loss_mask"])
    (_, _), grads = value_and_grad(model, batch, model.init_state(2))
    q = model.layers[0].units[1].quantizer
    new = q.ema_update(aux["vq"]["code_count"][1], aux["vq"]["code_key_sum"][1])
    g = grads.layers[0].units[1].quantizer
    assert_close(q.codebook_sum - g.codebook_sum, new.codebook_sum, 1e-6)
    assert_close(q.codebook_count - g.codebook_count, new.codebook_count, 1e-6)


def test_masked_tokens_do_not_touch_codebook_statistics(getkey):
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey, masked=8)
    _, _, aux = model(batch["inputs"], model.init_state(2), mask=batch["loss_mask"])
    # Change the masked inputs: the last block only, so earlier keys are unchanged.
    changed = batch["inputs"].at[:, -8:].set((batch["inputs"][:, -8:] + 5) % 256)
    _, _, aux2 = model(changed, model.init_state(2), mask=batch["loss_mask"])
    for name in ("code_count", "code_key_sum", "commit_sum"):
        assert_close(aux["vq"][name][0], aux2["vq"][name][0], 1e-6, name=name)
    assert float(aux["vq"]["code_count"][0].sum()) == 2 * 24 * 2  # B * T_kept * H


def test_gradients_reach_keys_via_straight_through_only(getkey):
    # c_beta = 0: the only path from the loss to W_k is the straight-through
    # estimator through attention (the cache holds codewords).
    model = tvq_eqx.Transformer(
        tvq_eqx.TransformerConfig(**{**CFG, "c_beta": 0.0}), key=getkey()
    )
    batch = make_batch(getkey)
    (_, _), grads = value_and_grad(model, batch, model.init_state(2))
    hk = CFG["n_head"] * CFG["d_k"]
    g_wk = np.asarray(grads.layers[0].units[0].w_kvg)[:, :hk]
    assert np.abs(g_wk).max() > 0


def test_commit_loss_equals_explicit(getkey):
    # Official definition: per unit, sum over heads of ||k' - c'||^2 in the
    # pre-scaled space k' = k d_k^-1/4 (= d_k^-1/2 ||k - c||^2 here), times
    # the mask, summed; loss_fn divides by all B * T positions and sums units.
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey, masked=4)
    _, _, aux = model(batch["inputs"], model.init_state(2), mask=batch["loss_mask"])
    keys = np.asarray(first_unit_keys(model, batch["inputs"]), np.float64)
    cb = np.asarray(model.layers[0].units[0].quantizer.codebook, np.float64)
    scale = CFG["d_k"] ** -0.25
    d = (((keys[..., None, :] - cb[None, None]) * scale) ** 2).sum(-1)  # [B,T,H,S]
    per_position = d.min(-1).sum(-1)  # sum over heads
    want = (per_position * np.asarray(batch["loss_mask"])).sum()
    np.testing.assert_allclose(aux["vq"]["commit_sum"][0], want, rtol=1e-4)
    _, out = tvq_eqx.loss_fn(model, batch, model.init_state(2))
    np.testing.assert_allclose(
        out["metrics"]["commit_loss"],
        np.asarray(aux["vq"]["commit_sum"], np.float64).sum() / batch["loss_mask"].size,
        rtol=1e-5,
    )


def test_commit_sum_hand_computed_in_prescaled_space(getkey):
    # d_k = 4, so keys and codewords are compared after scaling by 4^-1/4.
    vq = VectorQuantizer(2, 2, 4, c_gamma=0.9, key=getkey())
    codebook = jnp.array(
        [[[1.0, 0, 0, 0], [0, 1.0, 0, 0]], [[0, 0, 2.0, 0], [0, 0, 0, -2.0]]]
    )
    vq = eqx.tree_at(lambda q: q.codebook_sum, vq, codebook)  # counts are 1
    key = jnp.array(
        [[[[3.0, 0, 0, 0], [0, 0, 0, -1.0]]], [[[0, 2, 0, 1.0], [1, 1, 1, 1.0]]]]
    )
    mask = jnp.array([[1.0], [0.5]])
    # Row 0: head 0 -> code 0, ||(2,0,0,0)||^2 = 4; head 1 -> code 1, 1.
    # Row 1: head 0 -> code 1, ||(0,1,0,1)||^2 = 2; head 1 -> code 0, 1+1+1+1 = 4.
    want = (1.0 * (4 + 1) + 0.5 * (2 + 4)) / 2.0  # d_k^-1/2 = 1/2
    got = vq.statistics(key, mask)["commit_sum"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Its gradient pulls each key towards its codeword: 2 (k - c) d_k^-1/2 mask.
    g = jax.grad(lambda k: vq.statistics(k, mask)["commit_sum"])(key)
    np.testing.assert_allclose(g[0, 0, 0], [2.0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(g[1, 0, 1], [0.5, 0.5, -0.5, 0.5], rtol=1e-6)


def test_defaults_no_state_and_all_ones_mask(getkey):
    """`loss_fn(model, batch)`: no history, every position counted."""
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey)
    ones = dict(batch, loss_mask=jnp.ones(batch["inputs"].shape, jnp.float32))
    want, _ = tvq_eqx.loss_fn(model, ones, model.init_state(2))
    bare = {k: batch[k] for k in ("inputs", "targets")}
    got, aux = tvq_eqx.loss_fn(model, bare)
    assert float(got) == float(want)
    assert float(aux["metrics"]["mask_fraction"]) == 1.0


def test_rejects_bad_batch(getkey):
    model = tvq_eqx.Transformer(tvq_eqx.TransformerConfig(**CFG), key=getkey())
    batch = make_batch(getkey)
    state = model.init_state(2)
    with pytest.raises(ValueError, match=r"batch is missing \['targets'\]"):
        tvq_eqx.loss_fn(model, {"inputs": batch["inputs"]}, state)
    with pytest.raises(ValueError, match=r"batch\['targets'\] has shape \(2, 31\)"):
        tvq_eqx.loss_fn(model, dict(batch, targets=batch["targets"][:, 1:]), state)
    with pytest.raises(Exception, match=r"targets'\] ids must be in"):
        tvq_eqx.loss_fn(
            model, dict(batch, targets=batch["targets"].at[0, 0].set(999)), state
        )

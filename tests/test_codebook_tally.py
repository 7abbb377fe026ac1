"""The codebook's EMA tally: an optimizer other than the EMA rule on the
codebook (a plain `optax.adamw` over the whole model, weight decay, a clip, a
learning rate other than 1) makes the next model call raise, while every
routed path (`make_optimizer`, `with_ema_codebook`, `split_codebook` by
hand, `ema_update`) counts whole EMA steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _inputs import sampling_config

import tvq_eqx
from tvq_eqx import train

CFG = sampling_config()
_ROWS = jax.random.randint(jax.random.key(5), (4, 17), 0, CFG.n_vocab)
BATCH = {
    "inputs": _ROWS[:, :-1],
    "targets": _ROWS[:, 1:],
    "loss_mask": jnp.ones((4, 16), jnp.float32),
}
LOUD = "ema_tally is not a whole number"


@pytest.fixture(scope="module")
def model():
    return tvq_eqx.Transformer(CFG, key=jax.random.key(0))


def library_loss(model):
    return tvq_eqx.loss_fn(model, BATCH, None)


def own_loss(model):
    """A user's own LM loss: no codebook term, so the codebook's gradient is
    zero and only weight decay can move it."""
    logprobs, _, _ = model(BATCH["inputs"])
    picked = jnp.take_along_axis(logprobs, BATCH["targets"][..., None], axis=-1)
    return -jnp.mean(picked), None


def train_steps(model, optimizer, objective, n):
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def step(model, opt_state):
        grads, _ = eqx.filter_grad(objective, has_aux=True)(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes
        for _ in range(n):
            model, opt_state = step(model, opt_state)
    return model


@eqx.filter_jit
def forward(model):
    return model(BATCH["inputs"])[0]


def tallies(model):
    return np.concatenate(
        [np.asarray(u.quantizer.ema_tally) for u in model.layers.stacked.units]
    )


@pytest.mark.parametrize(
    "name",
    ["adamw_whole_model", "weight_decay_only", "sgd_half", "clip_whole_tree"],
)
def test_optimizer_other_than_the_ema_rule_on_the_codebook_is_loud(model, name):
    optimizer, objective = {
        "adamw_whole_model": (optax.adamw(1e-3), library_loss),
        "weight_decay_only": (optax.adamw(1e-3, weight_decay=1e-2), own_loss),
        "sgd_half": (optax.sgd(0.5), library_loss),
        "clip_whole_tree": (
            optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0)),
            library_loss,
        ),
    }[name]
    trained = train_steps(model, optimizer, objective, 1)
    assert not np.all(tallies(trained) == np.round(tallies(trained)))
    with pytest.raises(Exception, match=LOUD) as info:
        jax.block_until_ready(forward(trained))
    assert "with_ema_codebook" in str(info.value)
    # The loss (which calls the model) is loud too.
    with pytest.raises(Exception, match=LOUD):
        jax.block_until_ready(eqx.filter_jit(library_loss)(trained)[0])


def test_routed_optimizers_count_whole_ema_steps(model):
    n = 3
    for optimizer in (
        train.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10),
        train.with_ema_codebook(optax.adamw(1e-3)),
    ):
        trained = train_steps(model, optimizer, library_loss, n)
        np.testing.assert_array_equal(tallies(trained), 1.0 + n)
        assert np.all(np.isfinite(forward(trained)))
    # A user's loss without the codebook term, routed: the codebook stays put.
    trained = train_steps(
        model, train.with_ema_codebook(optax.adamw(1e-3)), own_loss, 1
    )
    np.testing.assert_array_equal(tallies(trained), 1.0)
    for before, after in zip(
        model.attention_units(), trained.attention_units(), strict=True
    ):
        np.testing.assert_array_equal(
            before.quantizer.codebook_sum, after.quantizer.codebook_sum
        )
    # The EMA step applied directly counts too.
    q = model.attention_units()[0].quantizer
    stepped = q.ema_update(q.codebook_count, q.codebook_sum)
    assert float(stepped.ema_tally) == float(q.ema_tally) + 1.0

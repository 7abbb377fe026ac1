"""Context parallelism in the model and the train step: a (data=2, seq=2)
mesh of the test process's 4 devices gives the 1-device forward, carried
state, gradients and train steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import train

CFG = tvq_eqx.TransformerConfig(
    n_vocab=16, d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=2,
    block_len=4, abs_pe=True,
)  # fmt: skip
CP = dict(seq_axis="seq", batch_axis="data")
BYTES = CFG.replace(n_vocab=256)  # a RunConfig's (byte) data needs 256 ids


def _tokens(key, shape=(4, 32)):
    return jax.random.randint(key, shape, 0, CFG.n_vocab)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_model_forward_state_and_gradients_equal_one_device(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    sharded = model.with_config(**CP)
    mesh = train.make_mesh(seq=2)
    tokens = _tokens(getkey())
    _, state, _ = model(_tokens(getkey(), (4, 8)), model.init_state(4))  # a history

    forward = eqx.filter_jit(lambda m, x, s: m(x, s)[:2])
    want, want_state = forward(model, tokens, state)
    with jax.set_mesh(mesh):
        got, got_state = forward(sharded, tokens, state)
    assert _rel(got, want) < 1e-5
    for a, b in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True
    ):
        assert _rel(a, b) < 1e-5

    batch = dict(
        inputs=tokens,
        targets=jnp.roll(tokens, -1, axis=1),
        loss_mask=jnp.ones(tokens.shape, jnp.float32),
    )
    grad = eqx.filter_jit(
        eqx.filter_grad(lambda m: tvq_eqx.loss_fn(m, batch, state)[0])
    )
    g_want = grad(model)
    with jax.set_mesh(mesh):
        g_got = grad(sharded)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert _rel(a, b) < 1e-5


def test_packed_documents_on_a_seq_mesh_equal_one_device(getkey):
    """doc_starts through the sharded model and loss: starts in each chunk,
    one in a chunk's last block (the next device's window is cut short)."""
    model = tvq_eqx.Transformer(CFG, key=getkey())
    mesh = train.make_mesh(seq=2)
    tokens = _tokens(getkey())
    starts = np.zeros(tokens.shape, bool)
    starts[0, [5, 14]] = starts[1, 16] = starts[3, [2, 30]] = True
    batch = dict(
        inputs=tokens,
        targets=jnp.roll(tokens, -1, axis=1),
        loss_mask=jnp.ones(tokens.shape, jnp.float32),
        doc_starts=jnp.asarray(starts),
    )
    value_and_grad = eqx.filter_jit(
        eqx.filter_value_and_grad(lambda m: tvq_eqx.loss_fn(m, batch, None)[0])
    )
    want, g_want = value_and_grad(model)
    with jax.set_mesh(mesh):
        got, g_got = value_and_grad(model.with_config(**CP))
    assert _rel(got, want) < 1e-5
    plain = tvq_eqx.loss_fn(
        model, {k: batch[k] for k in batch if k != "doc_starts"}, None
    )[0]
    assert abs(float(plain) - float(want)) > 1e-4  # the documents matter
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_train_steps_on_a_data_seq_mesh_equal_one_device(grad_accum):
    """With grad_accum=2 too: micro-batches of one row per data shard, each
    split over the seq axis."""
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)

    def build(cfg):
        model = tvq_eqx.Transformer(cfg, key=jax.random.key(0))
        return train.init_train_state(model, opt, 4, key=jax.random.key(1))

    rng = np.random.default_rng(0)
    batches = [
        dict(
            inputs=rng.integers(0, 16, (4, 32)),
            targets=rng.integers(0, 16, (4, 32)),
            loss_mask=np.ones((4, 32), np.float32),
        )
        for _ in range(2)
    ]
    one, step_one = build(BYTES), train.make_train_step(opt, update_len=16)
    mesh = train.make_mesh(seq=2)
    assert dict(mesh.shape) == {"data": 2, "seq": 2}
    run = train.RunConfig(model=BYTES)
    run, _ = train.for_mesh(run, None, mesh)
    assert (run.model.seq_axis, run.model.batch_axis) == ("seq", "data")
    four = train.shard_train_state(build(run.model), mesh)
    step_four = train.make_train_step(
        opt, update_len=16, mesh=mesh, grad_accum=grad_accum
    )
    for b in batches:
        one, m_one = step_one(one, b)
        four, m_four = step_four(four, b)
        assert abs(float(m_one["loss"]) - float(m_four["loss"])) < 1e-5
    # Four Adam updates: differences of float rounding order stay ~1e-6.
    for a, b in zip(
        jax.tree.leaves(eqx.filter(one, eqx.is_array)),
        jax.tree.leaves(eqx.filter(four, eqx.is_array)),
        strict=True,
    ):
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) < 5e-5


def test_for_mesh_rebuilds_a_state_around_the_same_arrays():
    run = train.RunConfig(model=BYTES.replace(**CP))
    ts = train.new_train_state(run)
    off, ts_off = train.for_mesh(run, ts, None)  # no mesh: context parallelism off
    assert ts_off is not None
    assert (off.model.seq_axis, ts_off.model.config.seq_axis) == (None, None)
    for a, b in zip(jax.tree.leaves(ts_off), jax.tree.leaves(ts), strict=True):
        assert a is b


def test_context_parallel_config_rules():
    with pytest.raises(ValueError, match="seq_axis='seq'.*attention='vq'"):
        CFG.replace(attention="window", **CP)
    with pytest.raises(ValueError, match="seq=3 must be a positive int dividing"):
        train.make_mesh(seq=3)


def test_context_parallel_benchmark_micro(tmp_path):
    from benchmarks import context_parallel as bench

    out = bench.run(bench.PRESETS["micro"], out_dir=tmp_path, tag="micro", command="c")
    by = {(r["t"], r["n"]): r for r in out["results"]}
    one, four = by[(128, 1)], by[(128, 4)]
    assert one["mem"] and four["mem"] and four["mem"] < one["mem"]
    assert four["grad_err"] is not None and four["grad_err"] < 1e-5
    text = out["markdown"].read_text()
    assert "memory per device" in text and out["plot"].exists()

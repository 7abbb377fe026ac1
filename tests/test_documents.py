"""Document masking (`doc_starts`): the linear-time form equals the quadratic
definition with documents, streaming equals one call, a document's outputs do
not depend on other documents in its row, and a packed document gives what it
gives alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tvq_eqx.ops import vq_attention, vq_attention_with_state

B, T, H, K, V, S, L = 2, 48, 2, 8, 8, 4, 8
STARTS = {0: (0, 5, 21, 30), 1: (17, 40)}  # row -> document starts


def _inputs(getkey):
    q, k = (jax.random.normal(getkey(), (B, T, H, K)) for _ in range(2))
    v = jax.random.normal(getkey(), (B, T, H, V))
    codebook = jax.random.normal(getkey(), (H, S, K))
    return q, k, v, codebook


def _doc_starts(starts=STARTS, t=T):
    d = np.zeros((B, t), bool)
    for row, cols in starts.items():
        d[row, list(cols)] = True
    return jnp.asarray(d)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_linear_form_equals_definition_with_documents(getkey, decay):
    q, k, v, codebook = _inputs(getkey)
    docs = _doc_starts()
    kw = dict(block_len=L, cache_decay=decay, doc_starts=docs)

    def run(impl):
        def f(q, k, v):
            return vq_attention(q, k, v, codebook, implementation=impl, **kw)

        return f

    want = run("quadratic")(q, k, v)
    plain = vq_attention(q, k, v, codebook, block_len=L, cache_decay=decay)
    assert _rel(want, plain) > 1e-2  # the masking is visible
    assert _rel(run("xla")(q, k, v), want) < 1e-5
    w = jax.random.normal(getkey(), want.shape)
    for a, b in zip(
        jax.grad(lambda q, v: jnp.sum(run("xla")(q, k, v) * w), argnums=(0, 1))(q, v),
        jax.grad(lambda q, v: jnp.sum(run("quadratic")(q, k, v) * w), argnums=(0, 1))(
            q, v
        ),
        strict=True,
    ):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("mem_len, split", [(8, 24), (12, 32), (4, 8)])
def test_streamed_documents_equal_one_call(getkey, mem_len, split):
    """Splits inside a document and right before a start (32 in row 1 ... 30
    in row 0); the state carries only the last document."""
    q, k, v, codebook = _inputs(getkey)
    docs = _doc_starts()
    kw = dict(block_len=L, mem_len=mem_len, implementation="xla")
    whole, s_whole = vq_attention_with_state(
        q, k, v, codebook, None, doc_starts=docs, **kw
    )
    first, state = vq_attention_with_state(
        q[:, :split], k[:, :split], v[:, :split], codebook, None,
        doc_starts=docs[:, :split], **kw,
    )  # fmt: skip
    second, s_two = vq_attention_with_state(
        q[:, split:], k[:, split:], v[:, split:], codebook, state,
        doc_starts=docs[:, split:], **kw,
    )  # fmt: skip
    assert _rel(jnp.concatenate([first, second], axis=1), whole) < 1e-6
    # Two segments sum the cache in another order than one: float32 means of
    # magnitude up to a few differ by a few ulp (relative ~1e-7 each), so the
    # bound is relative, with atol for entries near 0.
    for a, b in zip(jax.tree.leaves(s_two), jax.tree.leaves(s_whole), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-6
        )


def test_a_document_ignores_the_others_and_equals_itself_alone(getkey):
    q, k, v, codebook = _inputs(getkey)
    docs = _doc_starts()
    out = vq_attention(q, k, v, codebook, block_len=L, doc_starts=docs)
    # Row 0, document [21, 30): perturb every other position's key and value.
    lo, hi = 21, 30
    other = np.ones((B, T, 1, 1), np.float32)
    other[0, lo:hi] = 0.0
    noise = jnp.asarray(other) * jax.random.normal(getkey(), k.shape)
    moved = vq_attention(
        q, k + 3.0 * noise, v - 2.0 * noise, codebook, block_len=L, doc_starts=docs
    )
    np.testing.assert_allclose(moved[0, lo:hi], out[0, lo:hi], rtol=1e-6, atol=1e-6)
    assert _rel(moved[0, :lo], out[0, :lo]) > 1e-2  # the perturbation is real
    # ... and it is what the document gives alone (from an empty history).
    alone = vq_attention(
        q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi], codebook, block_len=1
    )
    np.testing.assert_allclose(out[:1, lo:hi], alone, rtol=1e-5, atol=1e-6)


def test_a_start_at_a_call_boundary_drops_the_history(getkey):
    q, k, v, codebook = _inputs(getkey)
    _, state = vq_attention_with_state(
        q[:, :16], k[:, :16], v[:, :16], codebook, None, block_len=L
    )
    fresh = jnp.zeros((B, 32), bool).at[:, 0].set(True)
    got, _ = vq_attention_with_state(
        q[:, 16:], k[:, 16:], v[:, 16:], codebook, state, block_len=L,
        doc_starts=fresh,
    )  # fmt: skip
    want = vq_attention(q[:, 16:], k[:, 16:], v[:, 16:], codebook, block_len=L)
    assert _rel(got, want) < 1e-6


def test_bad_doc_starts_are_named(getkey):
    q, k, v, codebook = _inputs(getkey)
    with pytest.raises(ValueError, match=r"doc_starts must have shape \(2, 48\)"):
        vq_attention(
            q, k, v, codebook, block_len=L, doc_starts=jnp.zeros((2, 40), bool)
        )
    with pytest.raises(TypeError, match="doc_starts must be a bool array"):
        vq_attention(q, k, v, codebook, block_len=L, doc_starts=jnp.zeros((2, 48)))


# ---- the model and the loss ---------------------------------------------------


def test_packed_documents_give_each_document_its_own_log_probs(getkey):
    import tvq_eqx

    cfg = tvq_eqx.TransformerConfig(
        n_vocab=16, d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=2,
        block_len=4,
    )  # fmt: skip
    model = tvq_eqx.Transformer(cfg, key=getkey())
    forward = jax.jit(lambda m, x, d: m(x, None, doc_starts=d)[0])
    row = jax.random.randint(getkey(), (1, 32), 0, 16)
    starts = jnp.zeros((1, 32), bool).at[0, jnp.array([0, 13])].set(True)
    packed = forward(model, row, starts)
    for lo, hi in ((0, 13), (13, 32)):
        n = -(-(hi - lo) // 4) * 4  # alone, padded to whole blocks at the end
        alone_row = jnp.zeros((1, n), row.dtype).at[:, : hi - lo].set(row[:, lo:hi])
        alone = jax.jit(lambda m, x: m(x, None)[0])(model, alone_row)
        np.testing.assert_allclose(
            packed[:, lo:hi], alone[:, : hi - lo], rtol=1e-5, atol=1e-5
        )
    # The loss reads batch["doc_starts"]; without it the documents mix.
    batch = dict(
        inputs=row,
        targets=jnp.roll(row, -1, axis=1),
        loss_mask=jnp.ones((1, 32), jnp.float32),
    )
    with_docs = tvq_eqx.loss_fn(model, dict(batch, doc_starts=starts), None)[0]
    mixed = tvq_eqx.loss_fn(model, batch, None)[0]
    assert abs(float(with_docs) - float(mixed)) > 1e-6
    with pytest.raises(ValueError, match="doc_starts must have the tokens' shape"):
        model(row, None, doc_starts=starts[:, :16])
    with pytest.raises(ValueError, match="doc_starts .* needs attention"):
        model.with_config(attention="full")(row, None, doc_starts=starts)
    # Bool only, as the op: ints (document ids, say) are not read as starts.
    with pytest.raises(TypeError, match="doc_starts must be a bool array"):
        model(row, None, doc_starts=starts.astype(jnp.int32))

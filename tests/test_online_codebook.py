"""The online codebook (OVQ-style option, `codebook_mode="online"`): the
slot rule by hand, the linear scan form against the dense definition (values
and gradients), streaming exactness, causality, and the model option."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import train
from tvq_eqx.ops import (
    OnlineVQState,
    VQAttentionState,
    assign_slots,
    online_vq_attention_quadratic,
    online_vq_attention_with_state,
)

B, H, DK, DV = 2, 2, 4, 3


def _inputs(key, t, *, rel=True, m_len=4):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (B, t, H, DK))
    k = jax.random.normal(ks[1], (B, t, H, DK))
    v = jax.random.normal(ks[2], (B, t, H, DV))
    if not rel:
        return q, k, v, None, None
    rq = 0.3 * jax.random.normal(ks[3], (B, t, H, DK))
    rt = jax.random.normal(ks[4], (m_len + 1, H, DK))
    return q, k, v, rq, rt


def _linear(q, k, v, rq, rt, *, codes, block_len, mem_len, state=None):
    if state is None:
        state = OnlineVQState.empty(
            B, heads=H, codes=codes, d_k=DK, d_v=DV, mem_len=mem_len
        )
    return online_vq_attention_with_state(
        q, k, v, state, block_len=block_len, scale=0.5, rel_query=rq, rel_table=rt
    )


def test_assign_slots_by_hand():
    # One slot used (centroid at the origin, 2 keys), 3 slots in all.
    centroid = jnp.array([[0.0, 0.0], [7.0, 7.0], [7.0, 7.0]])
    count = jnp.array([2.0, 0.0, 0.0])
    keys = jnp.array([[9.0, 9.0], [5.0, 5.0], [0.1, 0.0], [4.0, 5.0], [0.2, 0.0]])
    valid = jnp.array([False, True, True, True, True])
    slots = assign_slots(keys, valid, centroid, count)
    # Key 0 is masked; keys 1 and 2 take the two free slots in order; key 3 is
    # nearest the new slot 1 ([5, 5]); key 4 nearest slot 2 ([0.1, 0]), not
    # the stale value of the free slot.
    assert slots[1:].tolist() == [1, 2, 1, 2]
    # Full dictionary: nearest of the used centroids only.
    full = jnp.array([2.0, 1.0, 1.0])
    cen = jnp.array([[0.0, 0.0], [5.0, 5.0], [-3.0, 0.0]])
    got = assign_slots(keys, jnp.ones(5, bool), cen, full)
    assert got.tolist() == [1, 1, 0, 1, 0]  # [0.2, 0] nearer 0 than [-3, 0]


def test_running_means_by_hand():
    # One head, S = 2, no window (mem_len 0), blocks of 2: after the first
    # block keys k0, k1 fill both slots; the second block's keys then go to
    # their nearest slot, whose centroid becomes the plain mean.
    k = jnp.array([[0.0, 0.0], [10.0, 0.0], [9.0, 1.0], [1.0, -1.0]])
    v = jnp.array([[1.0], [2.0], [4.0], [8.0]])
    q = jnp.zeros_like(k)
    state = OnlineVQState.empty(1, heads=1, codes=2, d_k=2, d_v=1, mem_len=0)
    _, state = online_vq_attention_with_state(
        q[None, :, None], k[None, :, None], v[None, :, None], state,
        block_len=2, scale=1.0,
    )  # fmt: skip
    np.testing.assert_allclose(state.count[0, 0], [2.0, 2.0])
    np.testing.assert_allclose(state.centroid[0, 0], [[0.5, -0.5], [9.5, 0.5]])
    np.testing.assert_allclose(state.value_mean[0, 0], [[4.5], [3.0]])


@pytest.mark.parametrize(
    "block_len,mem_len,codes",
    [(1, 0, 3), (2, 2, 3), (4, 4, 5), (4, 7, 3), (8, 3, 6), (4, 2, 40)],
)
def test_linear_equals_definition(getkey, block_len, mem_len, codes):
    t = 24
    q, k, v, rq, rt = _inputs(getkey(), t, m_len=mem_len)
    want = online_vq_attention_quadratic(
        q, k, v, codes=codes, block_len=block_len, mem_len=mem_len, scale=0.5,
        rel_query=rq, rel_table=rt,
    )  # fmt: skip
    got, state = _linear(q, k, v, rq, rt, codes=codes, block_len=block_len,
                         mem_len=mem_len)  # fmt: skip
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    # Every key older than the last window entered the dictionary once.
    old = t - mem_len
    np.testing.assert_array_equal(np.sum(state.count, -1), old)
    assert np.all(np.sum(state.count > 0, -1) == min(codes, old))


def test_big_dictionary_is_exact_attention(getkey):
    # With a slot for every old key, each centroid is its key (count 1): the
    # online memory is plain causal softmax attention over the raw keys.
    t = 16
    q, k, v, _, _ = _inputs(getkey(), t, rel=False)
    got, _ = _linear(q, k, v, None, None, codes=t, block_len=4, mem_len=4)
    s = 0.5 * jnp.einsum("bihk,bjhk->bhij", q, k, precision="highest")
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    want = jnp.einsum("bhij,bjhv->bihv", jax.nn.softmax(s, -1), v, precision="highest")
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("splits", [(4, 8, 12), (12, 12), (20, 4)])
def test_streaming_segments_equal_one_call(getkey, splits):
    q, k, v, rq, rt = _inputs(getkey(), 24, m_len=6)
    kw = dict(codes=5, block_len=4, mem_len=6)
    whole, whole_state = _linear(q, k, v, rq, rt, **kw)
    state, outs, lo = None, [], 0
    for n in splits:
        sl = slice(lo, lo + n)
        out, state = _linear(q[:, sl], k[:, sl], v[:, sl], rq[:, sl], rt,
                             state=state, **kw)  # fmt: skip
        outs.append(out)
        lo += n
    np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, atol=1e-6, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole_state), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_causal(getkey):
    t = 12
    q, k, v, rq, rt = _inputs(getkey(), t, m_len=2)

    def f(q, k, v):
        out, _ = _linear(q, k, v, rq, rt, codes=3, block_len=2, mem_len=2)
        return out[0, :, 0, 0]

    future = np.arange(t)[None, :] > np.arange(t)[:, None]  # [t_out, t_in]
    for jac in jax.jacrev(f, argnums=(0, 1, 2))(q, k, v):
        dep = np.abs(np.asarray(jac)[:, 0]).sum(axis=(-2, -1))  # [t_out, t_in]
        assert np.all(dep[future] == 0.0)
        assert np.any(dep[~future] > 0.0)


def test_gradients_of_both_forms_agree(getkey):
    t = 16
    q, k, v, rq, rt = _inputs(getkey(), t, m_len=4)
    w = jax.random.normal(getkey(), (B, t, H, DV))
    kw = dict(codes=3, block_len=4, mem_len=4)

    def lin(*args):
        return jnp.sum(_linear(*args, **kw)[0] * w)

    def dense(q, k, v, rq, rt):
        out = online_vq_attention_quadratic(
            q, k, v, scale=0.5, rel_query=rq, rel_table=rt, **kw
        )
        return jnp.sum(out * w)

    args = (q, k, v, rq, rt)
    g_lin = jax.grad(lin, argnums=range(5))(*args)
    g_dense = jax.grad(dense, argnums=range(5))(*args)
    for name, a, b in zip(
        ("q", "k", "v", "rel_query", "rel_table"), g_lin, g_dense, strict=True
    ):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)
    # Gradient reaches old keys through the centroids (not only the window).
    assert float(jnp.abs(g_lin[1][:, :4]).sum()) > 0.0


CFG = tvq_eqx.TransformerConfig(
    n_vocab=32, d_model=32, d_k=8, d_v=16, n_head=2, n_code=4, n_layer=1,
    block_len=8, codebook_mode="online",
)  # fmt: skip


def test_default_is_the_ema_codebook():
    assert tvq_eqx.TransformerConfig().codebook_mode == "ema"
    model = tvq_eqx.Transformer(CFG.replace(codebook_mode="ema"), key=jax.random.key(0))
    assert isinstance(model.init_state(1).unit(0), VQAttentionState)


def test_model_streams_and_trains_one_step(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    assert isinstance(model.init_state(2).unit(0), OnlineVQState)
    toks = jax.random.randint(getkey(), (2, 33), 0, 32)
    logits, _, _ = model(toks[:, :32])
    first, state, _ = model(toks[:, :16])
    second, _, _ = model(toks[:, 16:32], state)
    np.testing.assert_allclose(
        jnp.concatenate([first, second], 1), logits, atol=1e-5, rtol=1e-5
    )
    opt = train.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=2)
    ts = train.init_train_state(model, opt, 2, key=getkey())
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=jnp.ones((2, 32)))
    new, metrics = train.make_train_step(opt, update_len=16, donate=False)(ts, batch)
    assert np.isfinite(float(metrics["lm_loss"]))
    assert np.isfinite(float(metrics["grad_norm"]))
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        ts.model.attention_units()[0].w_kvg,
        new.model.attention_units()[0].w_kvg,
    )
    assert moved


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(implementation="pallas"), "Pallas"),
        (dict(attention="window"), "attention='vq'"),
        (dict(cache_decay=0.9), "cache_decay=1.0"),
        (dict(grad_thru_cache=False), "grad_thru_cache=True"),
    ],
)
def test_bad_options_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**changes)


def test_unknown_codebook_mode_raises():
    # beartype checks the Literal annotation first when it is on (the test
    # suite), the config's own check otherwise; both name the field.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="codebook_mode"):
        CFG.replace(codebook_mode="lloyd")


def test_model_refuses_partial_blocks_and_documents(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    with pytest.raises(ValueError, match="codebook_mode='online'"):
        model(jnp.zeros((1, 12), jnp.int32))
    starts = jnp.zeros((1, 16), bool).at[:, 0].set(True)
    with pytest.raises(ValueError, match="codebook_mode='online'"):
        model(jnp.zeros((1, 16), jnp.int32), doc_starts=starts)
    # An EMA model's state is refused by the online model, by name.
    ema_state = tvq_eqx.Transformer(
        CFG.replace(codebook_mode="ema"), key=getkey()
    ).init_state(1)
    with pytest.raises(TypeError, match="OnlineVQState"):
        model(jnp.zeros((1, 16), jnp.int32), ema_state)


def test_op_errors(getkey):
    q, k, v, rq, rt = _inputs(getkey(), 8)
    with pytest.raises(ValueError, match="multiple of block_len=3"):
        _linear(q, k, v, rq, rt, codes=3, block_len=3, mem_len=4)
    vq_state = VQAttentionState.empty(B, heads=H, codes=3, d_k=DK, d_v=DV, mem_len=4)
    with pytest.raises(TypeError, match="OnlineVQState"):
        _linear(q, k, v, rq, rt, codes=3, block_len=4, mem_len=4, state=vq_state)
    small = OnlineVQState.empty(B, heads=H, codes=3, d_k=DK, d_v=DV + 1, mem_len=4)
    with pytest.raises(ValueError, match="state.window_value"):
        _linear(q, k, v, rq, rt, codes=3, block_len=4, mem_len=4, state=small)


def test_run_config_needs_whole_block_updates():
    data = train.DataConfig(seq_len=24, batch_size=2)
    model = CFG.replace(n_vocab=256)
    run = train.RunConfig(model=model, data=data, update_len=8, steps=3)
    assert run.model.codebook_mode == "online"
    with pytest.raises(ValueError, match=r"update_len=12: .*codebook_mode='online'"):
        run.replace(update_len=12, steps=2)


def test_greedy_sampling_equals_the_full_call(getkey):
    # Sampling re-runs the current block (padded) from the state of the last
    # completed block: with the online dictionary too it is exact.
    from tvq_eqx import sampling

    model = tvq_eqx.Transformer(CFG, key=getkey())
    prompt = jax.random.randint(getkey(), (1, 13), 0, 32)
    out = sampling.sample(model, prompt, steps=11, key=getkey(), temperature=0.0)
    logprobs, _, _ = model(jnp.concatenate([prompt, out], 1))
    np.testing.assert_array_equal(out, jnp.argmax(logprobs[:, 12:-1], -1))


def test_one_token_blocks_are_the_per_token_rule(getkey):
    # block_len 1, no window: a plain numpy loop of the per-token rule (read,
    # then the key takes a free slot or moves its nearest centroid by 1/n).
    t, s, scale = 20, 3, 0.5
    q, k, v, _, _ = _inputs(getkey(), t, rel=False)
    got, _ = _linear(q, k, v, None, None, codes=s, block_len=1, mem_len=0)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    want = np.zeros((B, t, H, DV))
    for b in range(B):
        for h in range(H):
            cen, cnt, val = [], [], []
            for i in range(t):
                logits = [scale * qn[b, i, h] @ kn[b, i, h]]
                logits += [
                    scale * qn[b, i, h] @ c + np.log(n)
                    for c, n in zip(cen, cnt, strict=True)
                ]
                p = np.exp(np.array(logits) - max(logits))
                rows = np.stack([vn[b, i, h], *val]) if val else vn[b, i, h][None]
                want[b, i, h] = p @ rows / p.sum()
                if len(cen) < s:
                    cen.append(kn[b, i, h].copy())
                    cnt.append(1.0)
                    val.append(vn[b, i, h].copy())
                else:
                    j = int(np.argmin([np.sum((kn[b, i, h] - c) ** 2) for c in cen]))
                    cnt[j] += 1.0
                    cen[j] += (kn[b, i, h] - cen[j]) / cnt[j]
                    val[j] += (vn[b, i, h] - val[j]) / cnt[j]
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)

"""The Transformer-VQ model: invariances, causality, streaming, bad input."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

import tvq_eqx
from tvq_eqx.nn import (
    LayerStack,
    OutputHead,
    RMSNorm,
    TransformerLayer,
    VectorQuantizer,
    layer_norm,
    rms_norm,
    sinusoids,
)

SMALL = dict(d_model=32, d_k=8, d_v=12, n_head=2, n_code=16, n_layer=2, block_len=8)


def make(getkey, **overrides):
    cfg = tvq_eqx.TransformerConfig(**{**SMALL, **overrides})
    return tvq_eqx.Transformer(cfg, key=getkey())


def tokens(getkey, b, t, vocab=256):
    return jax.random.randint(getkey(), (b, t), 0, vocab)


@eqx.filter_jit
def run(model, toks, state):
    return model(toks, state)


def test_output_shapes_dtypes_and_normalisation(getkey):
    model = make(getkey)
    x = tokens(getkey, 3, 24)
    logprobs, state, aux = run(model, x, model.init_state(3))
    assert logprobs.shape == (3, 24, 256) and logprobs.dtype == jnp.float32
    np.testing.assert_allclose(jnp.exp(logprobs).sum(-1), 1.0, rtol=1e-5)
    assert int(state.position) == 24 and len(state.units()) == 4
    assert state.n_layer == 2 and state.stacked[0].length.shape == (2, 3)
    assert aux["vq"]["code_count"].shape == (4, 2, 16)


@pytest.mark.parametrize(
    "extra,block_lens",
    [
        (dict(), (12, 16, 48)),
        (dict(abs_pe=True, tie_embeddings=True), (24,)),
        (dict(output_norm=False, n_head=1), (16,)),
    ],
    ids=["default", "abspe-tied", "nonorm-1head"],
)
def test_block_length_invariance_at_fixed_mem_len(getkey, extra, block_lens):
    model = make(getkey, mem_len=8, **extra)
    x = tokens(getkey, 2, 48)
    ref, _, _ = run(model, x, model.init_state(2))
    for block_len in block_lens:
        other = model.with_config(block_len=block_len)
        out, _, _ = run(other, x, other.init_state(2))
        assert_close(ref, out, 1e-5, name=f"block_len={block_len}")


@pytest.mark.parametrize("splits", [(8, 40), (24, 24), (16, 8, 16, 8)])
def test_streaming_equals_one_call(getkey, splits):
    model = make(getkey, abs_pe=True, mem_len=5)
    x = tokens(getkey, 2, 48)
    ref, ref_state, _ = run(model, x, model.init_state(2))
    state, outs, start = model.init_state(2), [], 0
    for n in splits:
        out, state, _ = run(model, x[:, start : start + n], state)
        outs.append(out)
        start += n
    assert_close(ref, jnp.concatenate(outs, 1), 1e-5, name="streamed logprobs")
    assert int(state.position) == 48
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state), strict=True):
        assert_close(a, b, 1e-5)


def test_causality_jacobian(getkey):
    # Distinct token ids, so the gradient w.r.t. embedding row tokens[s] is the
    # gradient w.r.t. the input at position s.
    t = 24
    model = make(getkey, n_vocab=64, d_model=16, mem_len=4)
    x = jax.random.permutation(getkey(), 64)[:t][None]
    weights = jax.random.normal(getkey(), (64,))

    def per_position(table):
        m = eqx.tree_at(lambda m: m.embedding.weight, model, table)
        logprobs, _, _ = m(x, m.init_state(1))
        return logprobs[0] @ weights  # [t]

    jac = jax.jit(jax.jacrev(per_position))(model.embedding.weight)  # [t, vocab, d]
    dep = np.abs(np.asarray(jac)[:, np.asarray(x[0]), :]).sum(-1)  # [out t, in s]
    assert np.all(np.triu(dep, 1) == 0), "a position depends on a future token"
    assert np.all(dep[np.tril_indices(t)] > 0), "a position ignores a past token"
    # Older than two blocks (block_len 8): reached only through the cache.
    assert dep[t - 1, 0] > 0


def test_window_attention_forgets_old_tokens_vq_does_not(getkey):
    # One layer = two units; each unit reaches back one block, so with the
    # cache off a change in block 0 cannot reach block 3 or later.
    x = tokens(getkey, 1, 40)
    y = x.at[0, 0].set((x[0, 0] + 1) % 256)
    for attention, reaches in (("window", False), ("vq", True)):
        model = make(getkey, n_layer=1, attention=attention)
        a, _, _ = run(model, x, model.init_state(1))
        b, _, _ = run(model, y, model.init_state(1))
        diff = np.abs(np.asarray(a - b)).max(-1)[0]  # [T]
        assert diff[:24].max() > 0
        assert (diff[24:].max() > 0) == reaches, attention


def test_bf16_activations_run_and_are_close(getkey):
    model = make(getkey)
    x = tokens(getkey, 2, 32)
    ref, _, _ = run(model, x, model.init_state(2))
    low = model.with_config(dtype="bfloat16")
    out, state, _ = run(low, x, low.init_state(2))
    # The carried cache stays float32 with bf16 activations (long streams).
    assert out.dtype == jnp.float32 and state.stacked[0].cache_mean.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    # bf16 activations (8-bit mantissa) through 4 units: a few percent of the
    # log-prob spread.
    assert float(jnp.mean(jnp.abs(jnp.exp(ref) - jnp.exp(out)))) < 2e-3


def test_rmsnorm_gain_and_bias_and_layer_norm(getkey):
    x = jnp.arange(12.0).reshape(3, 4) - 5
    norm = RMSNorm(4)
    np.testing.assert_allclose(jnp.mean(norm(x) ** 2, -1), 1.0, rtol=1e-4)
    # Gain and bias (official LayerNorm defaults): y = rms(x) * g + b.
    g, b = jax.random.normal(getkey(), (2, 4))
    norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm, (g, b))
    want = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)
    assert_close(want * g[None] + b[None], norm(x), 1e-6)
    z = layer_norm(x)
    np.testing.assert_allclose(jnp.mean(z, -1), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.mean(z**2, -1), 1.0, rtol=1e-4)


def test_qk_rms_norm_is_not_centred(getkey):
    # The official q/k norm has no centring: shifting a row by a constant
    # changes it (the centred layer norm would not notice).
    x = jax.random.normal(getkey(), (5, 8))
    shifted = x + 3.0
    assert np.abs(np.asarray(rms_norm(shifted) - rms_norm(x))).max() > 0.1
    assert_close(layer_norm(x), layer_norm(shifted), 1e-5)
    np.testing.assert_allclose(jnp.mean(rms_norm(shifted) ** 2, -1), 1.0, rtol=1e-4)
    # The model's choice matters: same weights, different outputs.
    model = make(getkey)
    assert model.config.qk_norm == "rms"
    x = tokens(getkey, 2, 16)
    a, _, _ = run(model, x, model.init_state(2))
    other = model.with_config(qk_norm="layer")
    b, _, _ = run(other, x, other.init_state(2))
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_norm_biases_are_used_and_trained(getkey):
    model = make(getkey)
    x = tokens(getkey, 2, 16)

    def total(m):
        logprobs, _, _ = m(x, m.init_state(2))
        return jnp.sum(logprobs[..., 0])

    grads = eqx.filter_grad(total)(model)
    assert np.abs(np.asarray(grads.out_norm.bias)).max() > 0
    assert np.abs(np.asarray(grads.layers[0].units[1].norm.bias)).max() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_e_scale_scales_logits_before_log_softmax(getkey, tie):
    model = make(getkey, tie_embeddings=tie, e_scale=1.0)
    model = eqx.tree_at(
        lambda m: m.head.bias, model, jax.random.normal(getkey(), (256,))
    )
    x = tokens(getkey, 2, 16)
    ref, _, _ = run(model, x, model.init_state(2))
    scaled = model.with_config(e_scale=0.005)
    out, _, _ = run(scaled, x, scaled.init_state(2))
    # ref = z - logsumexp(z), so log_softmax(0.005 ref) = log_softmax(0.005 z).
    assert_close(jax.nn.log_softmax(0.005 * ref, axis=-1), out, 1e-5)
    assert np.abs(np.asarray(out - ref)).max() > 1.0


def test_output_head_tied_and_untied(getkey):
    h = jax.random.normal(getkey(), (3, 8))
    table = jax.random.normal(getkey(), (11, 8))
    tied = OutputHead(8, 11, tied=True, e_scale=0.5, key=getkey())
    assert tied.weight is None and tied.bias.shape == (11,)
    bias = jax.random.normal(getkey(), (11,))
    tied = eqx.tree_at(lambda m: m.bias, tied, bias)
    assert_close(0.5 * (h @ table.T + bias[None]), tied(h, table), 1e-6)
    with pytest.raises(ValueError, match="tied OutputHead needs"):
        tied(h)
    untied = OutputHead(8, 11, e_scale=2.0, key=getkey())
    assert_close(2.0 * (h @ untied.weight), untied(h), 1e-6)


def test_abs_pe_scale_starts_at_zero_and_learns(getkey):
    model = make(getkey, abs_pe=True)
    assert model.position_embedding.scale.shape == ()
    assert float(model.position_embedding.scale) == 0.0
    x = tokens(getkey, 2, 16)

    def total(m):
        logprobs, _, _ = m(x, m.init_state(2))
        return jnp.sum(logprobs[..., :3])

    g = eqx.filter_grad(total)(model)
    assert abs(float(g.position_embedding.scale)) > 0
    # Scale 0: no absolute positions yet; a non-zero scale changes the output.
    a, _, _ = run(model, x, model.init_state(2))
    moved = eqx.tree_at(
        lambda m: m.position_embedding.scale, model, jnp.asarray(0.7, jnp.float32)
    )
    b, _, _ = run(moved, x, moved.init_state(2))
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    assert make(getkey).position_embedding is None


def test_initialisers_are_official(getkey):
    cfg = dict(d_model=64, d_k=16, d_v=32, n_head=2, n_code=64, n_layer=1)
    model = make(getkey, **cfg)
    unit = model.layers[0].units[0]
    hv = cfg["n_head"] * cfg["d_v"]

    def std(x):
        return float(jnp.std(x))

    # variance_scaling(1, fan_in, normal) everywhere, with no extra depth
    # factor on the output projection.
    assert std(unit.w_q) == pytest.approx(64**-0.5, rel=0.1)
    assert std(unit.w_o) == pytest.approx(hv**-0.5, rel=0.1)
    assert std(model.head.weight) == pytest.approx(64**-0.5, rel=0.1)
    assert std(model.embedding.weight) == pytest.approx(1.0, rel=0.1)
    # Codebook: official c_sum ~ N(0, 1/(heads * codes)) in the pre-scaled key
    # space, i.e. a factor d_k^(1/4) in ours; counts 1.
    want = 16**0.25 * (2 * 64) ** -0.5
    assert std(unit.quantizer.codebook_sum) == pytest.approx(want, rel=0.1)
    np.testing.assert_array_equal(unit.quantizer.codebook_count, 1.0)
    for x in (unit.norm.bias, unit.rel_bias.u, unit.rel_bias.v, model.head.bias):
        np.testing.assert_array_equal(x, 0.0)
    np.testing.assert_array_equal(unit.norm.weight, 1.0)


def test_config_defaults_are_official():
    cfg = tvq_eqx.TransformerConfig(**SMALL)
    assert cfg.pe_lam == 1e5 and cfg.e_scale == 1.0
    assert (cfg.qk_norm, cfg.layerdrop, cfg.drop_mask_scope, cfg.lm_loss_average) == (
        "rms",
        "unit",
        "sequence",
        "positions",
    )


# ---- dropout masks -------------------------------------------------------------

TIMELESS = dict(p_droplyr=0.5, p_dropsin=0.3, p_dropres=0.0, p_dropemb=0.0)


def test_sequence_masks_depend_only_on_the_sequence_key(getkey):
    # With only LayerDrop and sinusoid dropout on, the output depends on
    # `sequence_key`, not on the per-call `key`.
    model = make(getkey, **TIMELESS)
    x = tokens(getkey, 8, 16)
    s1, s2 = getkey(), getkey()
    call = eqx.filter_jit(
        lambda m, k, s: m(x, m.init_state(8), key=k, sequence_key=s)[0]
    )
    a = call(model, getkey(), s1)
    assert_close(a, call(model, getkey(), s1), 1e-6)
    assert np.abs(np.asarray(a - call(model, getkey(), s2))).max() > 1e-3
    fresh = model.with_config(drop_mask_scope="segment")
    assert (
        np.abs(np.asarray(call(fresh, getkey(), s1) - call(fresh, getkey(), s1))).max()
        > 1e-3
    )


def test_sequence_masks_are_the_same_in_every_segment(getkey):
    # Same masks in each segment: streaming two segments with one sequence key
    # equals one call on the whole sequence, dropout on.
    model = make(getkey, abs_pe=True, **TIMELESS)
    x = tokens(getkey, 8, 32)
    s = getkey()
    whole, _, _ = model(x, model.init_state(8), key=getkey(), sequence_key=s)
    a, st, _ = model(x[:, :16], model.init_state(8), key=getkey(), sequence_key=s)
    b, _, _ = model(x[:, 16:], st, key=getkey(), sequence_key=s)
    assert_close(whole, jnp.concatenate([a, b], 1), 1e-5)
    other, _, _ = model(x[:, 16:], st, key=getkey(), sequence_key=getkey())
    assert np.abs(np.asarray(other - b)).max() > 1e-3


@pytest.mark.parametrize("layerdrop", ["unit", "layer"])
def test_layerdrop_per_unit_or_per_layer(getkey, layerdrop):
    # Each row's output must be one of the drop patterns the mode allows; with
    # "unit" the second unit sees the first unit's dropped output.
    p, b = 0.5, 32
    model = make(getkey, n_layer=1, layerdrop=layerdrop, **TIMELESS)
    model = model.with_config(p_dropsin=0.0)
    layer = model.layers[0]
    u1, u2 = layer.units
    x = jax.random.normal(getkey(), (b, 8, SMALL["d_model"]))
    mask = jnp.ones((b, 8))
    states = model.init_state(b).units()
    out, _, _ = layer(x, states, mask=mask, key=getkey(), sequence_key=getkey())

    def unit(u, y, st):
        return u(y, st, mask=mask)[0]

    r1 = unit(u1, x, states[0])
    y1 = x + r1 / (1 - p)
    if layerdrop == "unit":
        candidates = {
            "none": x,
            "1": y1,
            "2": x + unit(u2, x, states[1]) / (1 - p),
            "12": y1 + unit(u2, y1, states[1]) / (1 - p),
        }
    else:
        both = r1 + unit(u2, x + r1, states[1])
        candidates = {"none": x, "12": x + both / (1 - p)}
    seen = set()
    for row in range(b):
        errs = {
            k: float(jnp.max(jnp.abs(c[row] - out[row]))) for k, c in candidates.items()
        }
        best = min(errs, key=errs.get)
        assert errs[best] < 1e-4, (row, errs)
        seen.add(best)
    assert seen == set(candidates), seen  # 2^-32-ish chance to miss one by luck


def test_sinusoids_angle_difference_structure():
    t = sinusoids(jnp.arange(5), 8)
    assert t.shape == (5, 8)
    np.testing.assert_allclose(t[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    np.testing.assert_allclose(t[:, :4] ** 2 + t[:, 4:] ** 2, 1.0, rtol=1e-6)


# ---- bad input ---------------------------------------------------------------


def test_rejects_bad_tokens(getkey):
    model = make(getkey)
    state = model.init_state(2)
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        model(jnp.zeros((2, 8)), state)
    with pytest.raises(ValueError, match=r"tokens must have rank 2.*\(16,\)"):
        model(jnp.zeros((16,), jnp.int32), state)
    # Any seq length, except where the state depends on where blocks begin.
    decayed = make(getkey, cache_decay=0.9)
    with pytest.raises(
        ValueError, match=r"tokens \(2, 12\): seq length 12 .* multiple of block_len=8"
    ):
        decayed(jnp.zeros((2, 12), jnp.int32), decayed.init_state(2))
    with pytest.raises(ValueError, match=r"batch 3 .* state's batch 2"):
        model(jnp.zeros((3, 8), jnp.int32), state)
    with pytest.raises(Exception, match=r"token ids must be in \[0, n_vocab=256\)"):
        model(jnp.full((2, 8), 256, jnp.int32), state)
    with pytest.raises(Exception, match=r"token ids must be in"):
        eqx.filter_jit(model)(jnp.full((2, 8), -1, jnp.int32), state)
    with pytest.raises(ValueError, match="state was made for mem_len=8"):
        other = model.with_config(mem_len=4)
        other(jnp.zeros((2, 16), jnp.int32), state)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.init_state(0)


def test_with_config_rejects_shape_changes(getkey):
    model = make(getkey)
    with pytest.raises(ValueError, match="would change parameter shapes"):
        model.with_config(d_model=64)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("d_model", 0, "d_model must be a positive int"),
        ("n_code", 2.5, "n_code"),
        ("block_len", True, "block_len must be a positive int"),
        ("state_keys", "keys", "state_keys"),
        ("mem_len", -1, "mem_len must be a non-negative int"),
        ("p_dropres", 1.0, r"p_dropres must be in \[0, 1\)"),
        ("p_dropsin", -0.1, r"p_dropsin must be in \[0, 1\)"),
        ("c_gamma", 1.0, r"c_gamma must be in \[0, 1\)"),
        ("c_beta", -1.0, "c_beta must be >= 0"),
        ("dtype", "float64", "dtype"),
        ("param_dtype", "int8", "param_dtype"),
        ("attention", "linear", "attention"),
        ("implementation", "cuda", "implementation"),
        ("tie_embeddings", "yes", "tie_embeddings"),
        ("pe_lam", 1.0, "pe_lam must be > 1"),
        ("e_scale", 0.0, "e_scale must be a float > 0"),
        ("qk_norm", "centred", "qk_norm"),
        ("layerdrop", "block", "layerdrop"),
        ("drop_mask_scope", "batch", "drop_mask_scope"),
        ("lm_loss_average", "tokenz", "lm_loss_average"),
        ("remat", "layer", "remat"),
    ],
)
def test_config_validation(field, value, match):
    # Wrong Python types may be caught first by the runtime type checker the
    # tests enable (a TypeError naming the field); users get our ValueError.
    with pytest.raises((ValueError, TypeError), match=match):
        tvq_eqx.TransformerConfig(**{**SMALL, field: value})


def test_config_is_frozen_and_defaults_mem_len():
    cfg = tvq_eqx.TransformerConfig(**SMALL)
    assert cfg.mem_len == cfg.block_len == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3
    assert cfg.replace(block_len=16).mem_len == 8


def test_quantizer_codebook_is_ratio_and_has_no_gradient(getkey):
    vq = VectorQuantizer(2, 5, 3, c_gamma=0.9, key=getkey())
    np.testing.assert_allclose(
        vq.codebook, vq.codebook_sum / vq.codebook_count[..., None]
    )
    g = jax.grad(lambda q: jnp.sum(q.codebook))(vq)
    assert not np.any(np.asarray(g.codebook_sum))


def test_full_attention_baseline_streams_and_differs_from_vq(getkey):
    model = make(getkey, attention="full", kv_cache_len=64, mem_len=4)
    x = tokens(getkey, 2, 32)
    ref, _, _ = run(model, x, model.init_state(2))
    a, st, _ = run(model, x[:, :8], model.init_state(2))
    b, st, _ = run(model, x[:, 8:], st)
    assert_close(ref, jnp.concatenate([a, b], 1), 1e-5)
    vq = model.with_config(attention="vq")
    out, _, _ = run(vq, x, vq.init_state(2))
    assert np.abs(np.asarray(out - ref)).max() > 1e-3
    with pytest.raises(TypeError, match="needs FullAttentionState"):
        model(x, vq.init_state(2))


def test_shape_annotations_are_enforced_in_tests():
    # The suite runs with jaxtyping + beartype on tvq_eqx (pyproject addopts):
    # an internal function called with inconsistent dimensions must fail.
    import jaxtyping

    from tvq_eqx.ops import quantize

    with pytest.raises(jaxtyping.TypeCheckError):
        quantize(jnp.zeros((2, 3, 4)), jnp.zeros((3, 5, 6)))


# ------------------------------------------------------------ stacked layers


def test_layers_are_stacked_and_index_like_separate_layers(getkey):
    model = make(getkey, n_layer=3)
    stack = model.layers
    assert isinstance(stack, LayerStack) and len(stack) == 3
    assert stack.stacked.units[0].w_q.shape == (3, 32, 2 * 8)
    # Layer i is initialised from the i-th layer key, as a lone layer would be.
    keys = jax.random.split(jax.random.key(7), 3)
    ref = [TransformerLayer(model.config, key=k) for k in keys]
    built = LayerStack.init(model.config, keys=keys)
    for i, layer in enumerate(built):
        for a, b in zip(jax.tree.leaves(ref[i]), jax.tree.leaves(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    assert np.array_equal(stack[-1].units[1].w_o, stack[2].units[1].w_o)
    with pytest.raises(IndexError, match="layer 3 out of range for 3 layers"):
        stack[3]
    assert len(model.attention_units()) == 6
    # Indexing works on any tree of the model's shape (here: abstract shapes).
    abstract = eqx.filter_eval_shape(tvq_eqx.Transformer, model.config, key=getkey())
    assert abstract.layers[1].units[0].w_q.shape == (32, 16)


def _unrolled_call(model, x, state, key, sequence_key):
    """The layers run one by one in a Python loop over per-layer views, with
    the per-layer keys the model documents (the pre-scan implementation)."""
    n = model.config.n_layer
    keys = jax.random.split(key, n + 1)
    seq_keys = jax.random.split(sequence_key, n)
    b, t = x.shape
    mask = jnp.ones((b, t))
    h = model.embedding(x)
    units, stats = [], []
    for i in range(n):
        h, st, s = model.layers[i](
            h,
            state.units()[2 * i : 2 * i + 2],
            mask=mask,
            key=keys[i + 1],
            sequence_key=seq_keys[i],
        )
        units += st
        stats += s
    logits = model.head(model.out_norm(h), None)
    vq = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    return jax.nn.log_softmax(logits, -1), units, vq


def test_state_is_stored_stacked_with_a_per_unit_view(getkey):
    # One state per unit position, every array [n_layer, batch, ...] (the
    # layout the layer scan takes as it is); unit(i) is unit i in call order.
    model = make(getkey, n_layer=3)
    _, state, _ = run(model, tokens(getkey, 2, 16), model.init_state(2))
    first, second = state.stacked
    assert state.n_layer == 3 and state.batch_size == 2
    assert first.cache_mean.shape == (3, 2, 2, 16, 12)
    units = state.units()
    assert len(units) == 6
    for i, unit in enumerate(units):
        layer, j = divmod(i, 2)
        want = jax.tree.map(lambda x, layer=layer: x[layer], state.stacked[j])
        for a, b in zip(jax.tree.leaves(unit), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(state.unit(-1)), jax.tree.leaves(units[5]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = tvq_eqx.TransformerState.from_units(units, state.position)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(IndexError, match="unit 6 out of range for 6 units"):
        state.unit(6)
    with pytest.raises(ValueError, match="two states per layer"):
        tvq_eqx.TransformerState.from_units(units[:3], state.position)
    # A state for another depth is refused with the unit counts.
    other = make(getkey, n_layer=2)
    with pytest.raises(ValueError, match="state has 6 units; the model has 4"):
        other(tokens(getkey, 2, 16), state)


@pytest.mark.parametrize("layerdrop", ["unit", "layer"])
def test_scanned_layers_equal_a_loop_over_layers(getkey, layerdrop):
    # Per-layer dropout keys, LayerDrop masks, states and quantizer statistics
    # come out of the scan exactly as from the layers run one by one.
    model = make(
        getkey,
        n_layer=3,
        layerdrop=layerdrop,
        p_droplyr=0.4,
        p_dropsin=0.2,
        p_dropres=0.1,
    )
    x = tokens(getkey, 4, 16)
    state = model.init_state(4)
    key, seq = getkey(), getkey()
    ref, ref_units, ref_vq = _unrolled_call(model, x, state, key, seq)
    out, new, aux = model(x, state, key=key, sequence_key=seq)
    assert_close(ref, out, 1e-6)
    assert len(new.units()) == 6
    for a, b in zip(
        jax.tree.leaves(ref_units), jax.tree.leaves(new.units()), strict=True
    ):
        assert_close(a, b, 1e-6)
    for k in ref_vq:
        assert aux["vq"][k].shape[0] == 6
        assert_close(ref_vq[k], aux["vq"][k], 1e-6, name=k)
    # ... and the dropout is really on: another sequence key changes it.
    other, _, _ = model(x, state, key=key, sequence_key=getkey())
    assert np.abs(np.asarray(other - out)).max() > 1e-3


def test_remat_gives_the_same_loss_and_gradients(getkey):
    """Every policy against no remat (one reference compile shared by the
    three policies: each compile of a 2-layer gradient is seconds)."""
    model = make(getkey, n_layer=2, p_dropres=0.1, p_droplyr=0.3)
    x = tokens(getkey, 2, 17)
    batch = dict(inputs=x[:, :-1], targets=x[:, 1:], loss_mask=jnp.ones((2, 16)))
    key = getkey()

    @eqx.filter_jit
    def value_and_grad(m):
        f = eqx.filter_value_and_grad(tvq_eqx.loss_fn, has_aux=True)
        (loss, aux), grads = f(m, batch, m.init_state(2), key=key)
        return loss, aux["state"], grads

    loss, state, grads = value_and_grad(model)
    for remat in ("full", "dots", "dots_no_batch"):
        loss_r, state_r, grads_r = value_and_grad(model.with_config(remat=remat))
        assert loss_r.dtype == jnp.float32
        np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6, err_msg=remat)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_r), strict=True):
            assert_close(a, b, 1e-6, name=remat)
        g, g_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
        assert len(g) == len(g_r) > 10
        for a, b in zip(g, g_r, strict=True):
            assert_close(a, b, 1e-5, name=remat)

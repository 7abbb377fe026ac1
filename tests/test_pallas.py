"""Pallas kernels (interpret mode on CPU) against the xla form and the quadratic
definition: forward, every gradient, the returned state.

Tolerances (relative error ||ref - out|| / ||ref||):
- float32: 1e-5 for every output and gradient (references at Precision.HIGHEST;
  the kernels use HIGHEST dots for float32 inputs, so only summation order
  differs, measured <= 1e-6).
- bfloat16: the kernels round the softmax weights to bfloat16 before the value
  matmul (as flash attention does) and inputs, outputs and gradients are
  bfloat16 (unit roundoff 2^-8 = 3.9e-3). Against the float32 reference on the
  same bf16-valued inputs we measured <= 2e-3 (forward) and <= 4e-3
  (gradients), the same as the xla form run in bfloat16; the bounds are 1e-2
  and 1.5e-2 (about 4x margin), and the xla form in bf16 is held to them too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs, random_state, shape_id
from conftest import rel_err

import tvq_eqx
from pallas_kernels.vq_attention import BlockSizes, PallasConfig, vq_attention_core
from tvq_eqx.ops import VQAttentionState, vq_attention_xla
from tvq_eqx.ops._pallas import vq_attention_pallas
from tvq_eqx.ops._reference import vq_attention_reference

F32_TOL = 1e-5
BF16_FWD_TOL = 1e-2
BF16_GRAD_TOL = 1.5e-2

# Small tiles so the kernels' inner loops, causal tile skipping and padding
# (codes, d_v) run with several steps even at tiny shapes.
TINY = BlockSizes(block_q=4, block_k=2, block_code=4, block_v=8)
TINY_Q2 = BlockSizes(block_q=2, block_k=4, block_code=8, block_v=4)
# bwd_dq streaming value columns (the TPU rule's choice for small VMEM).
TINY_STREAMED = BlockSizes(
    block_q=4, block_k=2, block_code=4, block_v=8, dq_block_dv=4, dq_stream_v=True
)


@functools.partial(jax.jit, static_argnames=("impl", "opts"))
def run(impl, opts, args, state, cot):
    """Output, new state, and the VJP of (output, state.window_value,
    state.cache_mean) with cotangents `cot` w.r.t. inputs and incoming state."""
    opts = dict(opts)
    fn = dict(xla=vq_attention_xla, pallas=vq_attention_pallas)[impl]
    use_rel = opts.pop("rel")

    def f(q, k, v, rq, rt, window_value, cache_mean):
        st = (
            None
            if state is None
            else VQAttentionState(
                state.window_code,
                state.window_key,
                window_value,
                state.length,
                state.cache_count,
                cache_mean,
            )
        )
        rel = dict(rel_query=rq, rel_table=rt) if use_rel else {}
        out, new = fn(q, k, v, args["codebook"], state=st, **rel, **opts)
        return (out, new.window_value, new.cache_mean), new

    primals = (
        args["query"],
        args["key"],
        args["value"],
        args["rel_query"],
        args["rel_table"],
        None if state is None else state.window_value,
        None if state is None else state.cache_mean,
    )
    outs, vjp, new = jax.vjp(f, *primals, has_aux=True)
    return outs[0], new, vjp(cot)


def cotangents(key, shape, dtype, zero_state=False):
    b, t, h, _, v, s, blk = shape
    ks = jax.random.split(key, 3)
    c_out = jax.random.normal(ks[0], (b, t, h, v), dtype)
    c_prev = jax.random.normal(ks[1], (b, blk, h, v), dtype)
    # The returned cache mean is float32 whatever the activation dtype.
    c_mean = jax.random.normal(ks[2], (b, h, s, v), jnp.float32)
    if zero_state:
        c_prev, c_mean = jnp.zeros_like(c_prev), jnp.zeros_like(c_mean)
    return (c_out, c_prev, c_mean)


GRAD_NAMES = (
    "dq",
    "dk",
    "dv",
    "d_rel_query",
    "d_rel_table",
    "d_window_value",
    "d_cache_mean",
)


def check_same(ref, out, tol, what, skip=()):
    ref_out, ref_state, ref_grads = ref
    got_out, got_state, got_grads = out
    errors = {}
    assert got_out.shape == ref_out.shape and got_out.dtype == ref_out.dtype
    errors["out"] = rel_err(ref_out, got_out)
    for field in (
        "window_code",
        "window_key",
        "window_value",
        "length",
        "cache_count",
        "cache_mean",
    ):
        r, g = getattr(ref_state, field), getattr(got_state, field)
        assert g.shape == r.shape and g.dtype == r.dtype, field
        if r.dtype in (jnp.int32, jnp.bool_):
            np.testing.assert_array_equal(np.asarray(r), np.asarray(g), err_msg=field)
        else:
            errors[f"state.{field}"] = rel_err(r, g)
    for name, r, g in zip(GRAD_NAMES, ref_grads, got_grads, strict=True):
        if name in skip:
            continue
        if r is None:
            assert g is None, name
            continue
        assert g.shape == r.shape and g.dtype == r.dtype, name
        errors[name] = (
            rel_err(r, g)
            if float(jnp.linalg.norm(r)) > 0
            else float(jnp.linalg.norm(g.astype(jnp.float32)))
        )
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{what}: {bad} (all: {errors})"
    return errors


# (shape, block sizes, rel bias, mem_len)
CASES = [
    ((2, 32, 2, 8, 12, 5, 8), None, True, None),  # default tiles, full-dim blocks
    ((1, 48, 1, 8, 20, 40, 16), TINY, False, None),  # many tiles, empty codes, pads
    ((2, 16, 3, 4, 6, 12, 8), TINY_Q2, True, 3),  # bq < bk, mem_len < L
    ((1, 24, 2, 6, 5, 7, 6), None, True, 6),  # block_len not a power of two
    # The GPU preset in interpret mode: K, codes, d_v padded to Triton's 16.
    ((1, 32, 2, 8, 12, 5, 16), BlockSizes.for_platform("gpu"), True, 8),
]


@pytest.mark.parametrize(
    "shape,sizes,use_rel,mem_len", CASES, ids=[shape_id(c[0]) for c in CASES]
)
def test_pallas_equals_xla_and_quadratic_f32(shape, sizes, use_rel, mem_len):
    key = jax.random.key(sum(shape))
    args = attention_inputs(key, shape, rel_len=mem_len)
    L = shape[-1]
    opts = (("block_len", L), ("scale", 0.6), ("rel", use_rel))
    popts = opts + (("pallas", PallasConfig(block_sizes=sizes)),)
    cot = cotangents(jax.random.fold_in(key, 1), shape, jnp.float32)
    ref = run("xla", opts, args, None, cot)
    got = run("pallas", popts, args, None, cot)
    check_same(ref, got, F32_TOL, "pallas vs xla")

    # Against the definition: output cotangent only, dk from the window.
    cot0 = cotangents(jax.random.fold_in(key, 1), shape, jnp.float32, zero_state=True)
    got = run("pallas", popts, args, None, cot0)
    rel = (
        dict(rel_query=args["rel_query"], rel_table=args["rel_table"])
        if use_rel
        else {}
    )

    def quad(q, k, v, rq, rt):
        r = dict(rel_query=rq, rel_table=rt) if use_rel else {}
        return vq_attention_reference(
            q, k, v, args["codebook"], scale=0.6, block_len=L, key_grad_window=True, **r
        )

    del rel
    out_q, vjp = jax.vjp(
        quad,
        args["query"],
        args["key"],
        args["value"],
        args["rel_query"],
        args["rel_table"],
    )
    grads_q = vjp(cot0[0])
    assert rel_err(out_q, got[0]) <= F32_TOL
    for name, r, g in zip(GRAD_NAMES, grads_q, got[2], strict=False):
        if float(jnp.linalg.norm(r)) == 0:
            assert float(jnp.linalg.norm(g)) == 0, name
        else:
            assert rel_err(r, g) <= F32_TOL, name


@pytest.mark.parametrize("shape", [(2, 16, 2, 4, 6, 5, 4)], ids=shape_id)
def test_pallas_streaming_state_f32(shape):
    """Non-empty incoming state (one row with a valid previous block, one
    without), gradients into the incoming state, random state cotangents."""
    key = jax.random.key(7)
    args = attention_inputs(key, shape)
    state = random_state(jax.random.fold_in(key, 2), shape)
    opts = (("block_len", shape[-1]), ("scale", 0.5), ("rel", True))
    cot = cotangents(jax.random.fold_in(key, 1), shape, jnp.float32)
    ref = run("xla", opts, args, state, cot)
    got = run("pallas", opts + (("pallas", PallasConfig(TINY)),), args, state, cot)
    check_same(ref, got, F32_TOL, "streaming pallas vs xla")


@pytest.mark.parametrize(
    "use_cache,cache_grad",
    [(False, True), (True, False)],
    ids=["window-only", "no-cache-grad"],
)
def test_pallas_cache_options_f32(use_cache, cache_grad):
    shape = (1, 16, 2, 4, 4, 6, 4)
    key = jax.random.key(3)
    args = attention_inputs(key, shape)
    state = random_state(jax.random.fold_in(key, 2), shape)
    opts = (
        ("block_len", 4),
        ("scale", 0.5),
        ("rel", False),
        ("use_cache", use_cache),
        ("cache_grad", cache_grad),
    )
    cot = cotangents(jax.random.fold_in(key, 1), shape, jnp.float32)
    ref = run("xla", opts, args, state, cot)
    got = run("pallas", opts, args, state, cot)
    # cache_grad=False: both forms stop gradients through the carried state
    # between blocks (the official grad_thru_cache=False): cache means and the
    # previous block's keys and values as seen by the next block's queries.
    check_same(ref, got, F32_TOL, "pallas vs xla")


def test_pallas_bf16():
    shape = (2, 16, 2, 8, 12, 6, 8)
    key = jax.random.key(11)
    args = attention_inputs(key, shape, dtype=jnp.bfloat16)
    args32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    opts = (("block_len", 8), ("scale", 0.4), ("rel", True))
    cot = cotangents(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
    cot32 = tuple(c.astype(jnp.float32) for c in cot)
    ref = run("xla", opts, args32, None, cot32)
    got = run("pallas", opts, args, None, cot)
    xla16 = run("xla", opts, args, None, cot)
    assert got[0].dtype == jnp.bfloat16 and got[0].shape == ref[0].shape
    for name, out in (("pallas", got), ("xla-bf16", xla16)):
        assert rel_err(ref[0], out[0]) <= BF16_FWD_TOL, name
        assert rel_err(ref[1].cache_mean, out[1].cache_mean) <= BF16_FWD_TOL, name
        for gname, r, g in zip(GRAD_NAMES, ref[2], out[2], strict=True):
            if r is not None:
                assert g.dtype == jnp.bfloat16, gname
                assert rel_err(r, g) <= BF16_GRAD_TOL, (name, gname)


def test_debug_switch_differentiates_xla():
    """PallasConfig(backward="xla"): the kernel forward, the xla form's
    gradients; equal to the backward kernels' within float32 rounding."""
    shape = (1, 16, 1, 4, 4, 5, 8)
    args = attention_inputs(jax.random.key(5), shape)

    def loss(backward, q, v):
        out, st = vq_attention_pallas(
            q,
            args["key"],
            v,
            args["codebook"],
            block_len=8,
            scale=0.5,
            pallas=PallasConfig(backward=backward),
        )
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(st.cache_mean)

    g_kernel = jax.grad(functools.partial(loss, "kernels"), argnums=(0, 1))(
        args["query"], args["value"]
    )
    g_xla = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1))(
        args["query"], args["value"]
    )
    for a, b in zip(g_kernel, g_xla, strict=True):
        assert a.shape == b.shape and rel_err(b, a) <= F32_TOL


def test_pallas_config_validated_and_hashable():
    config = PallasConfig(BlockSizes(block_q=4), backward="xla", interpret=True)
    assert config == PallasConfig(BlockSizes(block_q=4), "xla", True)
    assert hash(config) == hash(PallasConfig(BlockSizes(block_q=4), "xla", True))
    with pytest.raises(ValueError, match="PallasConfig.backward"):
        PallasConfig(backward="nonsense")
    with pytest.raises(ValueError, match="PallasConfig.interpret"):
        PallasConfig(interpret="yes")
    with pytest.raises(ValueError, match="PallasConfig.block_sizes"):
        PallasConfig(block_sizes=64)
    with pytest.raises(ValueError, match="PallasConfig.block_sizes.*BlockSizes"):
        PallasConfig(block_sizes=(4, 4))
    # (TypeError: the tests' runtime annotation check comes first.)
    with pytest.raises((ValueError, TypeError), match="pallas"):
        tvq_eqx.TransformerConfig(pallas="xla")
    # Written as a dict (`dataclasses.asdict`, a checkpoint's JSON) it reads back.
    assert PallasConfig(**dataclasses.asdict(config)) == config


def test_pallas_config_reaches_the_kernels():
    """`vq_attention(..., pallas=...)` passes the config to the kernels: a
    query tile of 8 does not divide block_len 12, which the kernels' tile
    check rejects (the default tiles clip to 12); the xla form ignores it."""
    shape = (1, 24, 1, 4, 4, 5, 12)
    a = attention_inputs(jax.random.key(3), shape)
    base = (a["query"], a["key"], a["value"], a["codebook"])
    ref = tvq_eqx.vq_attention(*base, block_len=12, implementation="xla")
    got = tvq_eqx.vq_attention(*base, block_len=12, implementation="pallas")
    assert rel_err(ref, got) <= F32_TOL
    bad = PallasConfig(BlockSizes(block_q=8))
    with pytest.raises(ValueError, match="multiple of the query tile"):
        tvq_eqx.vq_attention(*base, block_len=12, implementation="pallas", pallas=bad)
    xla = tvq_eqx.vq_attention(*base, block_len=12, implementation="xla", pallas=bad)
    assert rel_err(ref, xla) == 0.0
    # (TypeError: the tests' runtime annotation check comes first.)
    with pytest.raises((ValueError, TypeError), match="pallas"):
        tvq_eqx.vq_attention(*base, block_len=12, pallas="xla")


def test_public_dispatch_uses_pallas():
    shape = (1, 16, 2, 4, 6, 5, 8)
    args = attention_inputs(jax.random.key(2), shape)
    base = (args["query"], args["key"], args["value"], args["codebook"])
    out_p = tvq_eqx.vq_attention(*base, block_len=8, implementation="pallas")
    out_x = tvq_eqx.vq_attention(*base, block_len=8, implementation="xla")
    assert out_p.shape == out_x.shape and rel_err(out_x, out_p) <= F32_TOL
    # On CPU the default is xla (pallas runs only in interpret mode there).
    assert tvq_eqx.ops.default_implementation() == (
        "xla" if jax.default_backend() == "cpu" else "pallas"
    )


def test_bad_shapes_rejected():
    shape = (1, 16, 2, 4, 6, 5, 8)
    a = attention_inputs(jax.random.key(0), shape)
    base = (a["query"], a["key"], a["value"], a["codebook"])
    # The op pads a partial last block before the kernels (any seq length);
    # the kernel-level API keeps whole blocks.
    out = tvq_eqx.vq_attention(*base, block_len=5, implementation="pallas")
    ref = tvq_eqx.vq_attention(*base, block_len=5, implementation="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    q = jnp.zeros((4, 16, 4))
    k_ext = jnp.zeros((4, 24, 4))
    v_ext = jnp.zeros((4, 24, 6))
    ok = jnp.ones((4, 1, 1))
    with pytest.raises(ValueError, match="k_ext must have shape"):
        vq_attention_core(
            q, k_ext[:, :16], v_ext, ok, block_len=8, scale=1.0, num_heads=2
        )
    with pytest.raises(ValueError, match="cache_bias must have shape"):
        vq_attention_core(
            q,
            k_ext,
            v_ext,
            ok,
            jnp.zeros((2, 5, 4)),
            jnp.zeros((4, 2, 5)),
            jnp.zeros((4, 2, 5, 6)),
            block_len=8,
            scale=1.0,
            num_heads=2,
        )
    with pytest.raises(ValueError, match="multiple of the query tile"):
        vq_attention_core(
            q[:, :12],
            k_ext[:, :18],
            v_ext[:, :18],
            ok,
            block_len=6,
            scale=1.0,
            num_heads=2,
            block_sizes=BlockSizes(block_q=4),
        )
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_q=48)


# ------------------------------------------- kernel-level semantics (core API)
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


def core_reference(
    q,
    k_ext,
    v_ext,
    prev_valid,
    codebook,
    cache_bias,
    cache_mean,
    window_bias,
    *,
    block_len,
    scale,
    num_heads,
    cache_grad=True,
    window_len=None,
):
    """Pure-jnp `vq_attention_core`: per block n one softmax over the codes
    (log-count bias, cached means), the previous block (ext block n) and the
    causal current block (ext block n + 1). cache_grad=False stops gradients
    through the carried state: the cached means and the previous block's keys
    and values as seen by block n's queries. window_len: keep keys at distance
    0..window_len only."""
    sg = jax.lax.stop_gradient
    bh, t, _ = q.shape
    L = block_len
    n_blk = t // L
    outs = []
    for n in range(n_blk):
        qn = q[:, n * L : (n + 1) * L]
        kp, vp = k_ext[:, n * L : (n + 1) * L], v_ext[:, n * L : (n + 1) * L]
        kc, vc = (
            k_ext[:, (n + 1) * L : (n + 2) * L],
            v_ext[:, (n + 1) * L : (n + 2) * L],
        )
        if not cache_grad:
            kp, vp = sg(kp), sg(vp)
        hi = jax.lax.Precision.HIGHEST
        s_prev = scale * jnp.einsum("bik,bjk->bij", qn, kp, precision=hi)
        s_cur = scale * jnp.einsum("bik,bjk->bij", qn, kc, precision=hi)
        if window_bias is not None:
            wb = window_bias[:, n * L : (n + 1) * L]
            s_prev, s_cur = s_prev + wb[..., :L], s_cur + wb[..., L:]
        r = jnp.arange(L)[None, :, None]
        c = jnp.arange(L)[None, None, :]
        ok_prev = jnp.broadcast_to(jnp.asarray(n > 0) | (prev_valid > 0), s_prev.shape)
        ok_cur = jnp.broadcast_to(c <= r, s_cur.shape)
        if window_len is not None:
            ok_prev = ok_prev & (r + L - c <= window_len)
            ok_cur = ok_cur & (r - c <= window_len)
        s_prev = jnp.where(ok_prev, s_prev, MASK)
        s_cur = jnp.where(ok_cur, s_cur, MASK)
        scores, values = [s_prev, s_cur], [vp, vc]
        if codebook is not None:
            cb = jnp.tile(codebook, (bh // num_heads, 1, 1))
            s_code = scale * jnp.einsum("bik,bsk->bis", qn, cb, precision=hi)
            s_code = s_code + cache_bias[:, n]
            mean = cache_mean[:, n] if cache_grad else sg(cache_mean[:, n])
            scores, values = [s_code, *scores], [mean, *values]
        p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
        outs.append(
            jnp.einsum("bij,bjv->biv", p, jnp.concatenate(values, axis=1), precision=hi)
        )
    return jnp.concatenate(outs, axis=1)


def core_inputs(key, *, bh, heads, t, L, k, v, s, use_cache, bias):
    ks = jax.random.split(key, 8)
    n_blk = t // L
    counts = jnp.floor(3 * jax.random.uniform(ks[5], (bh, n_blk, 1, s)))
    args = dict(
        q=jax.random.normal(ks[0], (bh, t, k)),
        k_ext=jax.random.normal(ks[1], (bh, t + L, k)),
        v_ext=jax.random.normal(ks[2], (bh, t + L, v)),
        prev_valid=(jnp.arange(bh) % 2 == 0).astype(jnp.float32)[:, None, None],
        codebook=jax.random.normal(ks[3], (heads, s, k)) if use_cache else None,
        cache_bias=jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1)), MASK)
        if use_cache
        else None,
        cache_mean=jax.random.normal(ks[4], (bh, n_blk, s, v)) if use_cache else None,
        window_bias=0.5 * jax.random.normal(ks[6], (bh, t, 2 * L)) if bias else None,
    )
    return args, jax.random.normal(ks[7], (bh, t, v))


CORE_CASES = [
    # (use_cache, cache_grad, window_len, bias, block_sizes)
    (True, True, None, True, TINY),
    (True, False, None, True, TINY),
    (True, False, None, False, None),
    (False, False, None, True, TINY_Q2),
    (False, True, 3, True, TINY),
    (False, True, 8, False, TINY_Q2),  # window_len == block_len
    (False, True, 1, True, None),
    (False, False, 5, True, TINY),
    (True, True, None, True, TINY_STREAMED),
    (False, True, 3, True, TINY_STREAMED),
]


@pytest.mark.parametrize(
    "use_cache,cache_grad,window_len,bias,sizes",
    CORE_CASES,
    ids=[
        f"cache{c[0]:d}-grad{c[1]:d}-win{c[2]}-bias{c[3]:d}"
        + ("-streamed" if c[4] is TINY_STREAMED else "")
        for c in CORE_CASES
    ],
)
def test_core_semantics_f32(use_cache, cache_grad, window_len, bias, sizes):
    """vq_attention_core (interpret mode) against core_reference: output and
    the gradient of every differentiable input (f32, 1e-5)."""
    heads, L = 2, 8
    args, cot = core_inputs(
        jax.random.key(13 + (window_len or 0)),
        bh=4,
        heads=heads,
        t=24,
        L=L,
        k=6,
        v=10,
        s=7,
        use_cache=use_cache,
        bias=bias,
    )
    opts = dict(
        block_len=L,
        scale=0.5,
        num_heads=heads,
        cache_grad=cache_grad,
        window_len=window_len,
    )
    names = [
        n
        for n in ("q", "k_ext", "v_ext", "cache_mean", "window_bias")
        if args[n] is not None
    ]

    def wrap(fn, **extra):
        def f(*diff):
            kw = dict(args, **dict(zip(names, diff, strict=True)))
            return fn(**kw, **opts, **extra)

        return f

    primals = [args[n] for n in names]
    ref, ref_vjp = jax.vjp(wrap(core_reference), *primals)
    got, got_vjp = jax.vjp(wrap(vq_attention_core, block_sizes=sizes), *primals)
    assert rel_err(ref, got) <= F32_TOL
    for name, r, g in zip(names, ref_vjp(cot), got_vjp(cot), strict=True):
        if float(jnp.linalg.norm(r)) == 0:
            assert float(jnp.linalg.norm(g)) == 0, name
        else:
            assert rel_err(r, g) <= F32_TOL, name
    if not cache_grad:  # the carried state really gets no gradient from block n
        d = dict(zip(names, got_vjp(cot), strict=True))
        # ext block 0 (the incoming previous block) is only ever carried state
        assert float(jnp.abs(d["k_ext"][:, :L]).max()) == 0
        assert float(jnp.abs(d["v_ext"][:, :L]).max()) == 0
    if window_len is not None and window_len < L:
        full = vq_attention_core(
            **args, **dict(opts, window_len=None), block_sizes=sizes
        )
        assert rel_err(full, got) > 1e-3  # the window changes the result


def test_core_window_len_rejected():
    args, _ = core_inputs(
        jax.random.key(0),
        bh=2,
        heads=1,
        t=16,
        L=8,
        k=4,
        v=4,
        s=3,
        use_cache=True,
        bias=False,
    )
    opts = dict(block_len=8, scale=1.0, num_heads=1)
    with pytest.raises(ValueError, match="needs the cache off"):
        vq_attention_core(**args, **opts, window_len=4)
    nocache = dict(args, codebook=None, cache_bias=None, cache_mean=None)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="window_len must be"):
            vq_attention_core(**nocache, **opts, window_len=bad)


def test_pallas_sliding_window_dense_f32():
    """vq_attention_pallas(use_cache=False) -- the official sliding window over
    the last mem_len == block_len keys, the kernels' window_len -- against
    dense attention over the straight-through quantized keys with the mask
    0 <= i - j <= L: output and the gradients of query, key and value (every
    query that sees a key is in its block or the next, so the windowed
    straight-through estimator equals the dense one). Shorter kernel windows
    are covered by test_core_semantics_f32."""
    from tvq_eqx.ops._common import gather_codes, quantize, straight_through

    shape = (2, 24, 2, 4, 6, 5, 8)
    b, t, h, k, v, s, L = shape
    window_len = L
    a = attention_inputs(jax.random.key(21), shape)
    cot = jax.random.normal(jax.random.key(22), (b, t, h, v))

    def dense(q, key, val):
        khat = straight_through(
            key, gather_codes(a["codebook"], quantize(key, a["codebook"]))
        )
        sc = 0.5 * jnp.einsum("bihk,bjhk->bhij", q, khat, precision="highest")
        i = jnp.arange(t)[None, None, :, None]
        j = jnp.arange(t)[None, None, None, :]
        ok = (i - j >= 0) & (i - j <= window_len)
        p = jax.nn.softmax(jnp.where(ok, sc, MASK), axis=-1)
        return jnp.einsum("bhij,bjhv->bihv", p, val, precision="highest")

    def pallas(q, key, val):
        out, _ = vq_attention_pallas(
            q,
            key,
            val,
            a["codebook"],
            block_len=L,
            scale=0.5,
            use_cache=False,
            pallas=PallasConfig(block_sizes=TINY),
        )
        return out

    primals = (a["query"], a["key"], a["value"])
    ref, ref_vjp = jax.vjp(dense, *primals)
    got, got_vjp = jax.vjp(pallas, *primals)
    assert rel_err(ref, got) <= F32_TOL
    for name, r, g in zip(("dq", "dk", "dv"), ref_vjp(cot), got_vjp(cot), strict=True):
        assert rel_err(r, g) <= F32_TOL, name

"""The cache prefix kernel (`pallas_kernels/vq_attention/prefix.py`, run in
interpret mode here) against its pure-jnp reference, and the pallas path with
`PallasConfig(cache_prefix="kernel")` against the xla form: forward and
gradients, float32 and bfloat16, plain, decayed, document-reset and
stop-gradient caches, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from pallas_kernels.vq_attention import PallasConfig
from tvq_eqx.ops._pallas import (
    _reference_cache_means,
    kernel_cache_means,
    vq_attention_pallas,
)
from tvq_eqx.ops._xla import vq_attention_xla

KERNEL = PallasConfig(cache_prefix="kernel")
# bf16 means are one rounding of float32 sums in another order: a mean may
# land one bf16 ulp (2^-8 relative) away; float32 differs by summation order.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3}


def _prefix_inputs(getkey, *, b=2, h=3, n=4, blk=8, s=5, v=12, dtype, factor):
    codes = jax.random.randint(getkey(), (b, h, n * blk + blk, 1), -1, s)
    values = jax.random.normal(getkey(), (b, h, n * blk + blk, v)).astype(dtype)
    groups = codes[:, :, : n * blk, 0].reshape(b, h, n, blk)
    per_group = jnp.sum(jax.nn.one_hot(groups, s), axis=3)  # [B, H, N, S]
    count0 = jax.random.randint(getkey(), (b, h, s), 0, 3).astype(jnp.float32)
    # The counts block n reads (plain sums; the kernel only divides by them).
    count = count0[:, :, None] + jnp.cumsum(per_group, axis=2) - per_group
    sum0 = jax.random.normal(getkey(), (b, h, s, v)) * count0[..., None]
    a = jax.random.uniform(getkey(), (b, n)) if factor else None
    return codes, values, a, count, sum0


@pytest.mark.parametrize("factor", [False, True], ids=["plain", "factors"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_equals_reference(getkey, dtype, factor):
    blk = 8
    args = _prefix_inputs(getkey, blk=blk, dtype=dtype, factor=factor)
    static = (5, blk, None, None)
    mean, total = kernel_cache_means(static, *args)
    ref_mean, ref_total = _reference_cache_means(static, *args)
    assert mean.dtype == dtype and total.dtype == jnp.float32
    assert_close(ref_mean.astype(jnp.float32), mean.astype(jnp.float32), TOL[dtype])
    assert_close(ref_total, total, 1e-5)
    # Gradients: the kernel's backward is the reference's transpose.
    cot = (
        jax.random.normal(getkey(), mean.shape).astype(dtype),
        jax.random.normal(getkey(), total.shape),
    )
    _, vjp = jax.vjp(
        lambda v, s0: kernel_cache_means(static, args[0], v, args[2], args[3], s0),
        args[1],
        args[4],
    )
    _, ref_vjp = jax.vjp(
        lambda v, s0: _reference_cache_means(static, args[0], v, args[2], args[3], s0),
        args[1],
        args[4],
    )
    for got, want in zip(vjp(cot), ref_vjp(cot), strict=True):
        assert_close(want.astype(jnp.float32), got.astype(jnp.float32), 1e-6)


def test_kernel_factors_matter(getkey):
    """The check can fail: dropping the factors (a decayed or reset cache
    read as a plain sum) is far outside the tolerance."""
    args = _prefix_inputs(getkey, dtype=jnp.float32, factor=True)
    static = (5, 8, None, None)
    with_factors, _ = kernel_cache_means(static, *args)
    without, _ = kernel_cache_means(static, args[0], args[1], None, *args[3:])
    assert rel_err(with_factors, without) > 100 * TOL[jnp.float32]


MODES = {
    "plain": {},
    "decay": dict(cache_decay=0.8),
    "documents": dict(documents=True),
    "no-cache-grad": dict(cache_grad=False),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_op_with_the_prefix_kernel_equals_xla(getkey, dtype, mode):
    """vq_attention_pallas with the prefix kernel vs the xla form: output,
    carried cache and gradients (odd codes and d_v: padded tiles)."""
    b, t, h, k, v, s, blk = 2, 48, 2, 8, 12, 5, 16
    kw = dict(MODES[mode])
    if kw.pop("documents", False):
        kw["doc_starts"] = jax.random.bernoulli(getkey(), 0.06, (b, t))
    q, key, val = (
        jax.random.normal(getkey(), (b, t, h, d)).astype(dtype) for d in (k, k, v)
    )
    codebook = jax.random.normal(getkey(), (h, s, k))
    cot = jax.random.normal(getkey(), (b, t, h, v)).astype(dtype)

    def run(form, q, key, val):
        if form == "xla":
            out, state = vq_attention_xla(
                q, key, val, codebook, block_len=blk, scale=k**-0.5, **kw
            )
        else:
            out, state = vq_attention_pallas(
                q, key, val, codebook, block_len=blk, scale=k**-0.5, pallas=KERNEL, **kw
            )
        return out, state.cache_mean

    results = {}
    for form in ("xla", "kernel"):
        (out, mean), vjp = jax.vjp(lambda *a, f=form: run(f, *a), q, key, val)
        results[form] = (out, mean, *vjp((cot, jnp.ones_like(mean))))
    names = ("out", "cache_mean", "dq", "dk", "dv")
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}[dtype]
    for name, want, got in zip(names, results["xla"], results["kernel"], strict=True):
        assert_close(want.astype(jnp.float32), got.astype(jnp.float32), tol, name=name)


def test_streaming_with_the_prefix_kernel(getkey):
    """Two calls passing the state equal one call (the carried sums come
    from the kernel's last running sum)."""
    b, t, h, k, v, s, blk = 1, 64, 2, 8, 16, 8, 16
    q, key, val = (jax.random.normal(getkey(), (b, t, h, d)) for d in (k, k, v))
    codebook = jax.random.normal(getkey(), (h, s, k))
    kw = dict(block_len=blk, scale=k**-0.5, pallas=KERNEL)
    whole, state = vq_attention_pallas(q, key, val, codebook, **kw)
    half = t // 2
    first, mid = vq_attention_pallas(
        q[:, :half], key[:, :half], val[:, :half], codebook, **kw
    )
    second, end = vq_attention_pallas(
        q[:, half:], key[:, half:], val[:, half:], codebook, state=mid, **kw
    )
    assert_close(whole, jnp.concatenate([first, second], axis=1), 1e-5)
    assert_close(state.cache_mean, end.cache_mean, 1e-5)
    np.testing.assert_array_equal(state.cache_count, end.cache_count)


def test_cache_prefix_option_is_checked():
    with pytest.raises(ValueError, match="cache_prefix must be one of"):
        PallasConfig(cache_prefix="fast")  # type: ignore[arg-type]

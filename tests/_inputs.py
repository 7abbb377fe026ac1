"""Input builders shared by the attention tests (ops, window modes, kernels)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import jaxtyping

from tvq_eqx.ops import VQAttentionState

# Shapes are (B, T, H, d_k, d_v, codes, block_len).


def shape_id(shape, dtype: str | None = None) -> str:
    b, t, h, k, v, s, blk = shape
    name = f"B{b}-T{t}-H{h}-K{k}-V{v}-S{s}-L{blk}"
    return name if dtype is None else f"{name}-{dtype}"


def attention_inputs(key, shape, dtype=jnp.float32, *, rel_len=None) -> dict:
    """Keyword arguments of the attention forms: query, key, value (in
    `dtype`), a float32 codebook, and a Transformer-XL `rel_query` /
    `rel_table` over distances 0..rel_len (default block_len). Dict order
    is the positional order (`q, k, v, c, rq, rt = d.values()`)."""
    b, t, h, k, v, s, blk = shape
    ks = jax.random.split(key, 6)
    r = blk if rel_len is None else rel_len
    return dict(
        query=jax.random.normal(ks[0], (b, t, h, k), dtype),
        key=jax.random.normal(ks[1], (b, t, h, k), dtype),
        value=jax.random.normal(ks[2], (b, t, h, v), dtype),
        codebook=jax.random.normal(ks[3], (h, s, k), jnp.float32),
        rel_query=(0.3 * jax.random.normal(ks[4], (b, t, h, k))).astype(dtype),
        rel_table=jax.random.normal(ks[5], (r + 1, h, k), dtype),
    )


def random_state(key, shape, dtype=jnp.float32) -> VQAttentionState:
    """A non-trivial history with a window of block_len keys: row 0's window
    is whole, the others' empty; a partly empty cache."""
    b, _, h, k, v, s, blk = shape
    ks = jax.random.split(key, 5)
    count = jnp.floor(4 * jax.random.uniform(ks[0], (b, h, s))) * (
        jax.random.uniform(ks[1], (b, h, s)) > 0.3
    ).astype(jnp.float32)
    return VQAttentionState(
        window_code=jax.random.randint(ks[2], (b, blk, h), 0, s),
        window_key=jax.random.normal(ks[4], (b, blk, h, k), dtype),
        window_value=jax.random.normal(ks[3], (b, blk, h, v), dtype),
        length=jnp.array([blk] + [0] * (b - 1), jnp.int32),
        cache_count=count.astype(jnp.float32),
        cache_mean=jax.random.normal(ks[0], (b, h, s, v), dtype),
    )


def sampling_config():
    """The micro model of the sampling tests (one shape, so both sampling test
    files share compiled programs when they run in one process)."""
    import tvq_eqx

    return tvq_eqx.TransformerConfig(
        n_vocab=16,
        d_model=32,
        d_k=8,
        d_v=16,
        n_head=1,
        n_code=4,
        n_layer=1,
        block_len=8,
        abs_pe=True,
    )


@contextlib.contextmanager
def user_call():
    """Without the runtime type checker the tests wrap the library in
    (jaxtyping + beartype, pyproject addopts): it reads the config's `int`
    and `Literal` annotations strictly and would refuse `np.int64(8)` or
    `jnp.bfloat16` before the config's own normalisation runs, which is what
    users (who do not run that checker) get."""
    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", old)

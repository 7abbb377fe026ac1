"""Shared pieces of the functional attention forms: validation, quantization."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Finite stand-in for -inf in masked scores: exp() of it underflows to exactly 0,
# but max/subtract never produce inf - inf = NaN (see the Pallas notes).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HIGHEST = jax.lax.Precision.HIGHEST


class VQAttentionState(eqx.Module):
    """Streaming state of one VQ-attention unit (per batch row and head).

    Carries everything a later segment needs to attend to this one exactly:
    the last block (its codes and values, attended directly with the causal
    window) and the compressed cache of all older blocks (per-code key counts
    and value means).

    **Fields:**

    - `prev_code`: int32 `[batch, block, heads]`, codes of the previous block.
    - `prev_value`: `[batch, block, heads, d_v]`, its values.
    - `prev_valid`: bool `[batch]`, False before the first block was seen.
    - `cache_count`: float32 `[batch, heads, codes]`, keys per code in the cache.
    - `cache_mean`: `[batch, heads, codes, d_v]`, mean value per code (value
      dtype, as the official code does, so bf16 stays finite).
    """

    prev_code: Int[Array, "batch block heads"]
    prev_value: Float[Array, "batch block heads d_v"]
    prev_valid: Bool[Array, " batch"]
    cache_count: Float[Array, "batch heads codes"]
    cache_mean: Float[Array, "batch heads codes d_v"]

    @classmethod
    def empty(
        cls,
        batch_size: int,
        *,
        block_len: int,
        heads: int,
        codes: int,
        d_v: int,
        dtype=jnp.float32,
    ) -> VQAttentionState:
        """The state before any token: empty previous block and empty cache."""
        return cls(
            prev_code=jnp.zeros((batch_size, block_len, heads), jnp.int32),
            prev_value=jnp.zeros((batch_size, block_len, heads, d_v), dtype),
            prev_valid=jnp.zeros((batch_size,), bool),
            cache_count=jnp.zeros((batch_size, heads, codes), jnp.float32),
            cache_mean=jnp.zeros((batch_size, heads, codes, d_v), dtype),
        )


def _shape(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}"


def validate_inputs(
    query,
    key,
    value,
    codebook,
    *,
    block_len,
    rel_query=None,
    rel_table=None,
    state=None,
) -> None:
    """Raise a clear ValueError/TypeError naming the argument and shapes."""
    names = dict(query=query, key=key, value=value)
    for name, x in names.items():
        if not hasattr(x, "shape") or x.ndim != 4:
            got = _shape(x) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, dim]; got {got}"
            )
    if not hasattr(codebook, "shape") or codebook.ndim != 3:
        got = _shape(codebook) if hasattr(codebook, "shape") else type(codebook)
        raise ValueError(f"codebook must have rank 3 [heads, codes, d_k]; got {got}")
    for name, x in dict(names, codebook=codebook).items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"{name} must be a floating-point array; got dtype {x.dtype} "
                f"(shape {tuple(x.shape)})"
            )
    b, t, h, d_k = query.shape
    if key.shape != query.shape:
        raise ValueError(
            f"key must have the same [batch, seq, heads, d_k] as query; got "
            f"query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if value.shape[:3] != (b, t, h):
        raise ValueError(
            f"value must share [batch, seq, heads] with query; got query "
            f"{tuple(query.shape)} and value {tuple(value.shape)}"
        )
    if codebook.shape[0] != h or codebook.shape[2] != d_k:
        raise ValueError(
            f"codebook must be [heads={h}, codes, d_k={d_k}] to match query "
            f"{tuple(query.shape)}; got {tuple(codebook.shape)}"
        )
    if isinstance(block_len, bool) or not isinstance(block_len, int) or block_len <= 0:
        raise ValueError(f"block_len must be a positive int; got {block_len!r}")
    if t % block_len != 0:
        raise ValueError(
            f"seq length {t} (query {tuple(query.shape)}) must be a multiple "
            f"of block_len={block_len}"
        )
    if (rel_query is None) != (rel_table is None):
        raise ValueError("rel_query and rel_table must be given together")
    if rel_query is not None:
        if rel_query.shape != query.shape:
            raise ValueError(
                f"rel_query must match query {tuple(query.shape)}; got "
                f"{tuple(rel_query.shape)}"
            )
        if rel_table.ndim != 3 or rel_table.shape[1:] != (h, d_k):
            raise ValueError(
                f"rel_table must be [mem_len + 1, heads={h}, d_k={d_k}]; got "
                f"{tuple(rel_table.shape)}"
            )
        if rel_table.shape[0] - 1 > block_len:
            raise ValueError(
                f"rel_table covers distances 0..{rel_table.shape[0] - 1} but the "
                f"bias range (mem_len) must be <= block_len={block_len}"
            )
    if state is not None:
        s = codebook.shape[1]
        d_v = value.shape[3]
        want = dict(
            prev_code=(b, block_len, h),
            prev_value=(b, block_len, h, d_v),
            prev_valid=(b,),
            cache_count=(b, h, s),
            cache_mean=(b, h, s, d_v),
        )
        for field, shape in want.items():
            got = getattr(state, field).shape
            if tuple(got) != shape:
                raise ValueError(
                    f"state.{field} must have shape {shape} for query "
                    f"{tuple(query.shape)}, value {tuple(value.shape)}, codebook "
                    f"{tuple(codebook.shape)}, block_len={block_len}; got {tuple(got)}"
                )


def default_scale(d_k: int, scale) -> float:
    return 1.0 / math.sqrt(d_k) if scale is None else scale


def quantize(
    key: Float[Array, "*batch heads d_k"], codebook: Float[Array, "heads codes d_k"]
) -> Int[Array, "*batch heads"]:
    """Index of the nearest codeword (squared Euclidean, float32, ties -> lowest)."""
    k32 = key.astype(jnp.float32)
    c32 = jax.lax.stop_gradient(codebook).astype(jnp.float32)
    dots = jnp.einsum("...hk,hsk->...hs", k32, c32, precision=HIGHEST)
    # ||k||^2 is constant per row, so argmin of ||c||^2 - 2 k.c is the nearest code.
    c_sq = jnp.sum(c32 * c32, axis=-1)
    dist = jnp.broadcast_to(c_sq, dots.shape) - 2.0 * dots
    return jnp.argmin(jax.lax.stop_gradient(dist), axis=-1).astype(jnp.int32)


def gather_codes(
    codebook: Float[Array, "heads codes d_k"], codes: Int[Array, "*batch heads"]
) -> Float[Array, "*batch heads d_k"]:
    """codebook[h, codes[..., h]] for every head (exact gather, no gradient)."""
    heads = jnp.arange(codebook.shape[0])
    return jax.lax.stop_gradient(codebook)[heads, codes]


def straight_through(
    key: Float[Array, "*batch d_k"], quantized: Float[Array, "*batch d_k"]
) -> Float[Array, "*batch d_k"]:
    """Value `quantized` exactly, gradient to `key` (straight-through estimator).

    `k - sg(k)` is exactly zero in IEEE arithmetic, so the sum equals the
    codeword bit-for-bit (unlike `k + sg(c - k)`, which rounds).
    """
    quantized = jax.lax.stop_gradient(quantized).astype(key.dtype)
    return quantized + (key - jax.lax.stop_gradient(key))


def log_count_bias(count: Float[Array, "*any"]) -> Float[Array, "*any"]:
    """log(count), with MASK_VALUE for empty codes; never NaN."""
    return jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)), MASK_VALUE)

"""Pieces shared by the forward and backward kernels (GPU/TPU common subset:
2-D dots, iota masks, finite mask value, per-row vectors as [rows, 1])."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .config import BlockSizes, Tiles

# Finite stand-in for -inf (same value as tvq_eqx.ops.MASK_VALUE).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable: the custom_vjp's nondiff arg)."""

    tiles: Tiles
    sizes: BlockSizes
    scale: float
    num_heads: int  # H, to map the flattened batch*head index to the codebook
    n_blocks: int  # N
    use_cache: bool
    has_bias: bool
    cache_grad: bool
    f32_inputs: bool  # float32 operands -> tiles.float32_dots (dot_precision)
    interpret: bool | None
    debug: bool
    # Official `grad_thru_cache=False` (with cache_grad=False): the state
    # carried from block n-1 into block n (the previous block's keys and values
    # as seen by block n's queries) is stop-gradiented too.
    window_grad: bool = True
    # Sliding window (no cache): query i attends to window keys at distance
    # 0..window_len only; None = the whole previous block and the causal
    # current block.
    window_len: int | None = None
    # The platform this variant is traced for ("gpu", "tpu", "cpu"; see
    # `vq_attention_core`), or None: each kernel decides at lowering.
    target: str | None = None

    @property
    def precision(self):
        return dot_precision(self.f32_inputs, self.tiles.float32_dots)


def dot_precision(f32_inputs: bool, float32_dots: str):
    """`precision=` of every kernel dot.

    bfloat16 operands: DEFAULT (bf16 tensor cores, float32 accumulation).
    float32 operands: "highest" = IEEE float32 (FMA dots on Triton: no tensor
    cores); "bf16x3" / "bf16x6" = the operands split into 2 / 3 bfloat16 terms
    and 3 / 6 tensor-core products (Triton lowering in jax; relative error per
    product about 2^-16 / 2^-24, the latter float32's own). On CPU (interpret
    mode) XLA computes every one of these in float32.
    """
    if not f32_inputs:
        return lax.Precision.DEFAULT
    return {
        "highest": lax.Precision.HIGHEST,
        "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
        "bf16x6": lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    }[float32_dots]


def dot_nt(a, b, precision):
    """a [m, k] . b [n, k]^T -> [m, n] float32."""
    return lax.dot_general(
        a,
        b,
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def dot_nn(a, b, precision):
    """a [m, k] . b [k, n] -> [m, n] float32."""
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def dot_tn(a, b, precision):
    """a [k, m]^T . b [k, n] -> [m, n] float32."""
    return lax.dot_general(
        a,
        b,
        (((0,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def tile(j, size: int, offset: int = 0):
    """Slice of `size` elements starting at offset + j * size (j static or traced)."""
    if isinstance(j, int):
        return pl.ds(offset + j * size, size)
    return pl.ds(pl.multiple_of(offset + j * size, size), size)


def shift(sl, offset: int):
    """The slice `sl` (a `pl.ds`) moved by a static multiple of its size."""
    if isinstance(sl.start, int):
        return pl.ds(sl.start + offset, sl.size)
    return pl.ds(pl.multiple_of(sl.start + offset, sl.size), sl.size)


def fori(lower, upper, body, carry):
    """fori_loop that stays a static Python call for a single static step."""
    if isinstance(lower, int) and isinstance(upper, int):
        if upper - lower <= 0:
            return carry
        if upper - lower == 1:
            return body(lower, carry)
    return lax.fori_loop(lower, upper, body, carry)


def window_mask(s, rows, cols, window_len: int):
    """Sliding window: keep scores of keys at distance rows - cols in
    [0, window_len] (cols relative to the query's block start, negative for
    the previous block)."""
    return jnp.where(rows - cols <= window_len, s, MASK_VALUE)


def document_mask(s, window_cols, key_from):
    """Packed documents: keep scores of window columns (0..2L, from the
    previous block's start) at or after the query's document start
    `key_from` [rows, 1]."""
    return jnp.where(window_cols >= key_from, s, MASK_VALUE)


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def assert_shape(x, shape, name):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(x.shape)}")


def spec_if_present(x, spec):
    """`spec` for a present operand, None for an absent one (None): the
    kernel then receives None for that ref, as JAX's own attention kernels
    pass optional inputs."""
    return None if x is None else spec

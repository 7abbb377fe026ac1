"""VQ attention on the Pallas kernels (`pallas_kernels.vq_attention`).

Same signature and semantics as `vq_attention_xla`. What runs where:

- XLA (cheap, O(T * S * V) like one value matmul): quantization, the
  straight-through keys, the per-block code histograms and value sums and their
  exclusive prefix over blocks (the cache of every block), the Transformer-XL
  window bias gathered into a `[L, 2L]` tile per block, and the new state. Their
  gradients (the reverse prefix over blocks that carries the cache gradient to
  the values, the straight-through key gradient, the bias gather's transpose)
  come from XLA autodiff.
- Kernels: the fused attention forward and its backward (dq, dk and dv of the
  window, d(cached mean) of every block, d(window bias)), wired with
  `jax.custom_vjp` inside `pallas_kernels`.

Debugging switch: set the environment variable `TVQ_EQX_PALLAS_BACKWARD=xla`
(read when the function is traced) or pass `backward="xla"` to run the kernel
forward but differentiate the xla form instead of the backward kernels.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.vq_attention import BlockSizes, vq_attention_core

from ._common import (
    VQAttentionState,
    gather_codes,
    log_count_bias,
    quantize,
    straight_through,
)
from ._xla import (
    _blocks,
    block_summaries,
    next_state,
    vq_attention_xla,
    window_relative_bias,
)

sg = jax.lax.stop_gradient

BACKWARD_ENV = "TVQ_EQX_PALLAS_BACKWARD"


def _heads_first(x):
    """[B, T, H, D] -> [B*H, T, D]."""
    b, t, h, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t, d)


def _forward(
    query,
    key,
    value,
    codebook,
    state,
    rel_query,
    rel_table,
    *,
    block_len,
    scale,
    use_cache,
    cache_grad,
    block_sizes,
    interpret,
    window_len=None,
):
    b, t, h, _ = query.shape
    n_code = codebook.shape[1]
    n_blk = t // block_len
    L = block_len

    codes = quantize(key, codebook)  # [B, T, H]
    codebook = sg(codebook).astype(key.dtype)
    khat = straight_through(key, gather_codes(codebook, codes))
    prev_khat = gather_codes(codebook, state.prev_code)  # [B, L, H, K]
    k_ext = jnp.concatenate([prev_khat, khat], axis=1)  # [B, T + L, H, K]
    prev_value = state.prev_value.astype(value.dtype)
    v_ext = jnp.concatenate([prev_value, value], axis=1)
    prev_ok = jnp.broadcast_to(
        state.prev_valid.astype(jnp.float32)[:, None, None, None], (b, h, 1, 1)
    ).reshape(b * h, 1, 1)

    z_blk = _blocks(codes, L)
    v_blk = _blocks(value, L)
    if use_cache:
        blk_count, blk_mean, new_count, new_mean = block_summaries(
            codes, value, state, n_code=n_code, block_len=L
        )
        if not cache_grad:
            blk_mean = sg(blk_mean)
        cache_bias = jnp.transpose(log_count_bias(blk_count), (0, 2, 1, 3))
        cache_bias = cache_bias.reshape(b * h, n_blk, 1, n_code)
        cache_mean = jnp.transpose(blk_mean, (0, 2, 1, 3, 4)).reshape(
            b * h, n_blk, n_code, blk_mean.shape[-1]
        )
        kernel_codebook = codebook
    else:
        new_count, new_mean = state.cache_count, state.cache_mean
        cache_bias = cache_mean = kernel_codebook = None

    window_bias = None
    if rel_query is not None:
        wb = window_relative_bias(_blocks(rel_query, L), rel_table)  # [B, N, L, H, 2L]
        window_bias = jnp.transpose(wb, (0, 3, 1, 2, 4)).reshape(b * h, t, 2 * L)

    out = vq_attention_core(
        _heads_first(query),
        _heads_first(k_ext),
        _heads_first(v_ext),
        prev_ok,
        kernel_codebook,
        cache_bias,
        cache_mean,
        window_bias,
        block_len=L,
        scale=scale,
        num_heads=h,
        cache_grad=cache_grad,
        window_len=window_len,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    out = jnp.transpose(out.reshape(b, h, t, -1), (0, 2, 1, 3)).astype(value.dtype)
    return out, next_state(state, z_blk[:, -1], v_blk[:, -1], new_count, new_mean)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_backward(static, query, key, value, codebook, state, rel_query, rel_table):
    return _forward(
        query, key, value, codebook, state, rel_query, rel_table, **dict(static)
    )


def _xla_backward_fwd(static, *args):
    return _xla_backward(static, *args), args


def _xla_backward_bwd(static, args, cotangent):
    kwargs = {
        k: v
        for k, v in dict(static).items()
        if k in ("block_len", "scale", "use_cache", "cache_grad")
    }

    def xla(query, key, value, codebook, state, rel_query, rel_table):
        return vq_attention_xla(
            query,
            key,
            value,
            codebook,
            state=state,
            rel_query=rel_query,
            rel_table=rel_table,
            **kwargs,
        )

    _, vjp = jax.vjp(xla, *args)
    return vjp(cotangent)


_xla_backward.defvjp(_xla_backward_fwd, _xla_backward_bwd)


def vq_attention_pallas(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    block_len: int,
    scale: float,
    state: VQAttentionState | None = None,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    use_cache: bool = True,
    cache_grad: bool = True,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backward: str | None = None,
    window_len: int | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """`vq_attention_xla` on the Pallas kernels; returns (output, new state).

    Extra keyword arguments (not needed by the dispatcher): `block_sizes`
    (tile config, default per platform), `interpret` (None: interpret mode
    exactly on CPU), `backward` ("kernels", default, or "xla": differentiate the
    xla form; default from the environment variable TVQ_EQX_PALLAS_BACKWARD),
    `window_len` (use_cache=False only: attend to window keys at distance
    0..window_len; see `vq_attention_core`).
    """
    b, _, h, _ = query.shape
    if state is None:
        state = VQAttentionState.empty(
            b,
            block_len=block_len,
            heads=h,
            codes=codebook.shape[1],
            d_v=value.shape[-1],
            dtype=value.dtype,
        )
    if backward is None:
        backward = os.environ.get(BACKWARD_ENV, "kernels") or "kernels"
    if backward not in ("kernels", "xla"):
        raise ValueError(
            f"backward must be 'kernels' or 'xla' (also via ${BACKWARD_ENV}); "
            f"got {backward!r}"
        )
    static = dict(
        block_len=block_len,
        scale=float(scale),
        use_cache=use_cache,
        cache_grad=cache_grad,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    if window_len is not None:
        if backward == "xla":
            raise ValueError("window_len is not supported with backward='xla'")
        static["window_len"] = window_len
    if backward == "xla":
        return _xla_backward(
            tuple(sorted(static.items())),
            query,
            key,
            value,
            codebook,
            state,
            rel_query,
            rel_table,
        )
    return _forward(query, key, value, codebook, state, rel_query, rel_table, **static)

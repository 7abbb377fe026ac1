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

Limits: the kernels attend a window of exactly one previous block, so
`mem_len` must equal `block_len` here (other values: the xla form). The
official modes run on the kernels, forward and backward: `cache_grad=False`
(no gradient through the carried window or cache between blocks) and the
sliding window (`use_cache=False`: the kernels' `window_len`).

How the kernels run (tiles, interpret mode, and the debugging switch
`backward="xla"`: the kernel forward, differentiated as the xla form) is a
`PallasConfig`, passed as `pallas=`.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.vq_attention import PallasConfig
from pallas_kernels.vq_attention.ops import vq_attention_core
from pallas_kernels.vq_attention.prefix import cache_prefix

from .._checks import error_if_any
from ._blockwise import (
    _blocks,
    _onehot_sums,
    block_prefix,
    carried_mean,
    next_state,
    prologue,
    window_offsets,
    xla_cache_means,
)
from ._common import VQAttentionState, log_count_bias, relative_bias, resolve_mem_len
from ._padding import pad_to_blocks
from ._xla import vq_attention_xla


def _heads_first(x):
    """[B, T, H, D] -> [B*H, T, D]."""
    b, t, h, d = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, t, d)


def pallas_kernel_inputs(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    state: VQAttentionState | None = None,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    doc_starts: Bool[Array, "batch seq"] | None = None,
    codes: Int[Array, "batch seq heads"] | None = None,
    *,
    block_len: int,
    scale: float,
    use_cache: bool = True,
    cache_grad: bool = True,
    sliding_window: bool = False,
    state_keys: str = "codewords",
    pallas: PallasConfig | None = None,
    window_len: int | None = None,
    cache_decay: float = 1.0,
) -> tuple[Any, tuple, dict[str, Any]]:
    """The XLA work `vq_attention_pallas` does before its kernels, alone: for
    timing and inspecting the kernels on exactly the operands the op gives
    them (`benchmarks/kernel_parts.py`).

    The prologue: quantization, the straight-through keys, the per-block code
    counts and value sums and their prefix over blocks (the cache every block
    reads; by the prefix kernel when `pallas.cache_prefix == "kernel"`), the
    window bias gathered per block, and the kernel layout.

    **Arguments:** as `vq_attention_pallas` (trusted here: `mem_len` is
    `block_len`, a state's window whole or empty); `sliding_window` is taken
    as given (no default from `use_cache`).

    **Returns:** `(prologue, core_args, core_kwargs)`: `vq_attention_core(
    *core_args, **core_kwargs)` (`pallas_kernels.vq_attention`) is the
    kernels' output, and `pallas_kernel_outputs(that, prologue, ...)` the
    op's. `prologue` is an opaque pytree (its fields follow the op's
    internals); `core_args` are `vq_attention_core`'s positional arrays in
    its order (`q, k_ext, v_ext, prev_valid, codebook, cache_bias,
    cache_mean, window_bias, key_from`)."""
    if pallas is None:
        pallas = PallasConfig()
    if (rel_query is None) != (rel_table is None):
        raise ValueError("rel_query and rel_table are given together or not at all")
    b, t, h, _ = query.shape
    L = block_len  # == mem_len (checked by the caller)
    pro = prologue(
        key,
        value,
        codebook,
        state,
        block_len=L,
        mem_len=L,
        cache_grad=cache_grad,
        state_keys=state_keys,
        cache_decay=cache_decay,
        doc_starts=doc_starts,
        codes=codes,
        # The prefix kernel makes the cache every block reads (when it is
        # read, `_cache_operands`); otherwise XLA does, as in the xla form.
        cache_means=not (use_cache and pallas.cache_prefix == "kernel"),
    )
    state, ext = pro.state, pro.ext
    v_ext = _heads_first(ext.value)
    # The window is whole or empty (checked by the caller): one flag per row.
    prev_valid = jnp.broadcast_to(
        (state.length > 0).astype(jnp.float32)[:, None, None, None], (b, h, 1, 1)
    ).reshape(b * h, 1, 1)

    if use_cache:
        pro, kernel_codebook, cache_bias, cache_mean = _cache_operands(
            pro, v_ext, block_len=L, dtype=value.dtype, pallas=pallas,
            cache_grad=cache_grad,
        )  # fmt: skip
    else:
        cache_bias = cache_mean = kernel_codebook = None

    window_bias, key_from = _window_operands(
        pro, rel_query, rel_table, b=b, h=h, t=t, L=L
    )
    core_args = (
        _heads_first(query),
        _heads_first(ext.khat),
        v_ext,
        prev_valid,
        kernel_codebook,
        cache_bias,
        cache_mean,
        window_bias,
        key_from,
    )
    core_kwargs = dict(
        block_len=L,
        scale=scale,
        num_heads=h,
        cache_grad=cache_grad,
        # Official agg_cache=False: keys at distance <= mem_len (== L) only.
        window_len=(
            window_len
            if window_len is not None
            else (L if (not use_cache and sliding_window) else None)
        ),
        block_sizes=pallas.block_sizes,
        interpret=pallas.interpret,
    )
    return pro, core_args, core_kwargs


def _cache_operands(
    pro, v_ext, *, block_len: int, dtype, pallas: PallasConfig, cache_grad: bool
):
    """The kernels' cache operands `(prologue, codebook, cache_bias
    [B*H, N, 1, S], cache_mean [B*H, N, S, V])`: the means from the prologue
    (XLA), or made here by the prefix kernel (`pallas.cache_prefix ==
    "kernel"`, which also gives the prologue its carried mean)."""
    b, n_blk, h, n_code = pro.block_count.shape
    d_v = v_ext.shape[-1]
    cache_bias = jnp.transpose(log_count_bias(pro.block_count), (0, 2, 1, 3))
    cache_bias = cache_bias.reshape(b * h, n_blk, 1, n_code)
    if pallas.cache_prefix == "kernel":
        cache_mean, new_sum = kernel_cache_means(
            (n_code, block_len, pallas.block_sizes, pallas.interpret),
            jnp.transpose(pro.terms.entering, (0, 2, 1))[..., None],
            v_ext.reshape(b, h, -1, d_v),
            pro.terms.factor,
            jnp.transpose(pro.block_count, (0, 2, 1, 3)),
            pro.terms.sum0,
        )  # [B, H, N, S, V], [B, H, S, V]
        if not cache_grad:
            cache_mean = jax.lax.stop_gradient(cache_mean)
        new_mean = carried_mean(pro.terms, new_sum, dtype)
        pro = eqx.tree_at(lambda p: p.new_mean, pro, new_mean, is_leaf=_none)
        cache_mean = cache_mean.reshape(b * h, n_blk, n_code, d_v)
    else:
        assert pro.block_mean is not None
        cache_mean = jnp.transpose(pro.block_mean, (0, 2, 1, 3, 4)).reshape(
            b * h, n_blk, n_code, d_v
        )
    return pro, pro.codebook, cache_bias, cache_mean


def _window_operands(pro, rel_query, rel_table, *, b: int, h: int, t: int, L: int):
    """The kernels' window operands `[B*H, T, .]`: the relative bias of each
    query to its window's `2L` columns (None without `rel_query`), and its
    document's first window column (None without documents)."""
    window_bias = None
    if rel_query is not None and rel_table is not None:
        wb = relative_bias(_blocks(rel_query, L), rel_table, window_offsets(L, L))
        window_bias = jnp.transpose(wb, (0, 3, 1, 2, 4)).reshape(b * h, t, 2 * L)
    key_from = None
    if pro.ext.last_start is not None:
        key_from = _document_key_from(pro.ext.last_start, pro.state.length, L)
        key_from = jnp.broadcast_to(key_from[:, None], (b, h, t)).reshape(b * h, t, 1)
    return window_bias, key_from


def pallas_kernel_outputs(
    kernel_out: Float[Array, "batch_heads seq d_v_padded"],
    prologue: Any,
    *,
    num_heads: int,
    d_v: int,
    dtype: Any,
    cache_grad: bool = True,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """The XLA work `vq_attention_pallas` does after its kernels, alone (the
    epilogue): the kernels' output `[B*H, T, >= d_v]` (`vq_attention_core`'s,
    or the forward kernel's with its value padding) in the op's layout
    `[B, T, H, d_v]` and `dtype`, and the next state from `prologue`
    (`pallas_kernel_inputs`' first result).

    **Returns:** `(output, new state)`, as `vq_attention_pallas`."""
    bh, t = kernel_out.shape[:2]
    out = kernel_out[..., :d_v].reshape(bh // num_heads, num_heads, t, d_v)
    out = jnp.transpose(out, (0, 2, 1, 3)).astype(dtype)
    new_state = next_state(
        prologue.state,
        prologue.ext,
        prologue.new_count,
        prologue.new_mean,
        cache_grad=cache_grad,
    )
    return out, new_state


def pallas_cache_means_xla(prologue: Any, *, n_code: int, block_len: int):
    """The cache every block reads `[B, N, H, S, V]`, made by XLA's passes
    (block sums, their prefix over blocks, the division by the counts) from
    a prologue made without it (`pallas_kernel_inputs` with
    `PallasConfig(cache_prefix="kernel")`): that step alone, to compare with
    the prefix kernel. Returns `(means, sums after the segment)`."""
    return xla_cache_means(
        prologue.terms, prologue.ext.value, n_code=n_code, block_len=block_len
    )


def _forward(query, key, value, *args, **kwargs):
    pro, core_args, core_kwargs = pallas_kernel_inputs(
        query, key, value, *args, **kwargs
    )
    return pallas_kernel_outputs(
        vq_attention_core(*core_args, **core_kwargs),
        pro,
        num_heads=query.shape[2],
        d_v=value.shape[-1],
        dtype=value.dtype,
        cache_grad=kwargs["cache_grad"],
    )


def _none(x):
    return x is None


def _reference_cache_means(static, codes, values, factor, count, sum0):
    """`kernel_cache_means` in XLA (`xla_cache_means` in the kernels'
    layout): the TPU's form and, differentiated, the kernel's backward."""
    n_code, block_len, _, _ = static
    n_blk = count.shape[2]
    t = n_blk * block_len
    entering = jnp.transpose(codes[..., :t, 0], (0, 2, 1))  # [B, T, H]
    value = jnp.transpose(values[:, :, :t], (0, 2, 1, 3))  # [B, T, H, V]
    sums = _onehot_sums(entering, value, n_code=n_code, block_len=block_len)
    blk_sum, new_sum = block_prefix(sums, sum0, factor=factor)
    count = jnp.transpose(count, (0, 2, 1, 3))  # [B, N, H, S]
    mean = blk_sum / jnp.where(count > 0, count, 1.0)[..., None]
    return jnp.transpose(mean, (0, 2, 1, 3, 4)).astype(values.dtype), new_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_cache_means(static, codes, values, factor, count, sum0):
    """The cache every block reads `[B, H, N, S, V]` (value dtype) and the
    sums after the segment `[B, H, S, V]`, by the prefix kernel
    (`pallas_kernels.vq_attention.prefix`; XLA on TPU, where its
    whole-sequence tiles would not fit VMEM). `static` = (codes, block_len,
    block sizes, interpret); `codes` int32 `[B, H, R, 1]` (-1: not
    entering), `values` `[B, H, R, V]`, `factor` f32 `[B, N]` or None,
    `count` f32 `[B, H, N, S]`, `sum0` f32 `[B, H, S, V]`."""
    _, block_len, block_sizes, interpret = static

    def kernel(target, codes, values, factor, count, sum0):
        a = None
        if factor is not None:
            a = jnp.broadcast_to(
                factor[:, None], (factor.shape[0], codes.shape[1], factor.shape[1])
            )
        return tuple(
            cache_prefix(
                codes, values, a, count, sum0, block_len=block_len,
                block_sizes=block_sizes, interpret=interpret, target=target,
            )
        )  # fmt: skip

    def reference(*args):
        return _reference_cache_means(static, *args)

    return jax.lax.platform_dependent(
        codes, values, factor, count, sum0, tpu=reference,
        cuda=functools.partial(kernel, "gpu"), rocm=functools.partial(kernel, "gpu"),
        default=functools.partial(kernel, "cpu"),
    )  # fmt: skip


def _kernel_cache_means_fwd(static, *args):
    return kernel_cache_means(static, *args), args


def _kernel_cache_means_bwd(static, args, cotangents):
    # Linear in the values and the carried sums: the transpose of the XLA
    # form (its forward is dead code here; no residual but codes and counts).
    codes, values, factor, count, sum0 = args
    _, vjp = jax.vjp(
        lambda v, s0: _reference_cache_means(static, codes, v, factor, count, s0),
        values,
        sum0,
    )
    d_values, d_sum0 = vjp(cotangents)
    zero = None if factor is None else jnp.zeros_like(factor)
    return None, d_values, zero, jnp.zeros_like(count), d_sum0


kernel_cache_means.defvjp(_kernel_cache_means_fwd, _kernel_cache_means_bwd)


def _document_key_from(last_start, length, block_len: int):
    """The kernels' `key_from` `[B, T]`: per query, the first window column
    (from its block's previous block) of its document, negative where the
    document began before the window (then the cache holds its older keys).

    `last_start` `[B, L + T]` (ext indices, see `last_doc_start`); a partly
    filled carried window (a document began in it) acts as a start at its
    first filled slot for block 0."""
    L = block_len
    t = last_start.shape[1] - L
    n_blk = t // L
    q_start = _blocks(last_start[:, L:], L)  # [B, N, L]
    key_from = q_start - (jnp.arange(n_blk, dtype=jnp.int32) * L)[None, :, None]
    partial = (length < L)[:, None]
    first = jnp.where(
        partial, jnp.maximum(key_from[:, 0], (L - length)[:, None]), key_from[:, 0]
    )
    key_from = key_from.at[:, 0].set(first)
    # Only the sign matters before the window: one value keeps the input small.
    return jnp.maximum(key_from, -1).reshape(key_from.shape[0], t).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_backward(static, *args):
    """`_forward` (args as its positional ones), differentiated as the xla form."""
    return _forward(*args, **dict(static))


def _xla_backward_fwd(static, *args):
    return _xla_backward(static, *args), args


_XLA_OPTIONS = (
    "block_len",
    "scale",
    "use_cache",
    "cache_grad",
    "sliding_window",
    "state_keys",
    "cache_decay",
)


def _xla_backward_bwd(static, args, cotangent):
    options = {k: v for k, v in static if k in _XLA_OPTIONS}
    *args, doc_starts, codes = args

    def xla(query, key, value, codebook, state, rel_query, rel_table):
        return vq_attention_xla(
            query,
            key,
            value,
            codebook,
            state=state,
            rel_query=rel_query,
            rel_table=rel_table,
            doc_starts=doc_starts,
            codes=codes,
            **options,
        )

    _, vjp = jax.vjp(xla, *args)
    return (*vjp(cotangent), None, None)  # doc_starts, codes: no gradient


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
    mem_len: int | None = None,
    sliding_window: bool | None = None,
    state_keys: str = "codewords",
    pallas: PallasConfig | None = None,
    window_len: int | None = None,
    cache_decay: float = 1.0,
    doc_starts: Bool[Array, "batch seq"] | None = None,
    codes: Int[Array, "batch seq heads"] | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """`vq_attention_xla` on the Pallas kernels; returns (output, new state).

    `mem_len` must equal `block_len` (the kernels' window is one previous
    block). Extra keyword arguments: `pallas` (a `PallasConfig`: tiles,
    interpret mode, backward choice; None = the defaults) and, not used by
    the dispatcher, `window_len` (use_cache=False only: a kernel sliding
    window of keys at distance 0..window_len, shorter than the default
    mem_len; see `vq_attention_core`).

    Any `seq`: the kernels take whole blocks, so a partial last block is
    padded at the end before them and the state is that of the real tokens
    (`pad_to_blocks`, as the xla form).
    """
    if pallas is None:
        pallas = PallasConfig()
    if not isinstance(pallas, PallasConfig):
        raise ValueError(f"pallas must be a PallasConfig or None; got {pallas!r}")
    if sliding_window is None:
        sliding_window = not use_cache
    mem_len = resolve_mem_len(mem_len, state, block_len)
    if mem_len != block_len or (
        state is not None and state.window_code.shape[1] != block_len
    ):
        raise ValueError(
            f"implementation='pallas' needs mem_len == block_len (the kernels "
            f"attend a window of exactly one previous block); got mem_len="
            f"{mem_len}, block_len={block_len}. Use implementation='xla' for "
            f"other window lengths."
        )
    if query.shape[1] % block_len:
        # The kernels take whole blocks: padded at the end, the state of the
        # real tokens (`pad_to_blocks`).
        return pad_to_blocks(
            vq_attention_pallas, query, key, value, codebook, block_len=block_len,
            scale=scale, state=state, rel_query=rel_query, rel_table=rel_table,
            use_cache=use_cache, cache_grad=cache_grad, mem_len=mem_len,
            sliding_window=sliding_window, state_keys=state_keys,
            cache_decay=cache_decay, doc_starts=doc_starts, codes=codes,
            pallas=pallas, **({} if window_len is None else {"window_len": window_len}),
        )  # fmt: skip
    if state is not None and doc_starts is None:
        # The kernels take one validity flag per row for the previous block;
        # without documents, states made by these ops are whole or empty when
        # mem_len == block_len. (error_if_any: one scalar flag, so it also
        # runs inside shard_map.)
        length = error_if_any(
            state.length,
            (state.length > 0) & (state.length < block_len),
            f"implementation='pallas' needs the state's window whole or empty "
            f"(length 0 or {block_len}); a window cut by a document start, or "
            f"a history shorter than block_len (a first segment of fewer than "
            f"{block_len} tokens), needs doc_starts= (all False to continue "
            f"its document) or implementation='xla'",
        )
        state = eqx.tree_at(lambda s: s.length, state, length)
    elif state is not None:
        # A partly filled window (a document began in it) is masked like a
        # document start, and its cache is empty for states made by these ops.
        partial = (state.length < block_len)[:, None, None]
        length = error_if_any(
            state.length,
            partial & (state.cache_count != 0),
            "implementation='pallas' needs an empty cache when the state's "
            "window is partly filled (states made by these ops are)",
        )
        state = eqx.tree_at(lambda s: s.length, state, length)
    if window_len is not None and pallas.backward == "xla":
        raise ValueError(
            "window_len is not supported with PallasConfig(backward='xla')"
        )
    # Keyword arguments of `_forward` (mixed types: ints, bools, the config).
    static: dict[str, Any] = dict(
        block_len=block_len,
        scale=float(scale),
        use_cache=use_cache,
        cache_grad=cache_grad,
        sliding_window=sliding_window,
        state_keys=state_keys,
        pallas=pallas,
    )
    if window_len is not None:
        static["window_len"] = window_len
    if cache_decay != 1.0:
        # The kernels read the decayed cache's counts and means unchanged.
        static["cache_decay"] = float(cache_decay)
    args = (
        query, key, value, codebook, state, rel_query, rel_table, doc_starts, codes
    )  # fmt: skip
    if pallas.backward == "xla":
        return _xla_backward(tuple(sorted(static.items())), *args)
    return _forward(*args, **static)

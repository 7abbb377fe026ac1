"""Shared pieces of the functional attention forms: validation, quantization."""

from __future__ import annotations

import math
import numbers
import operator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Finite stand-in for -inf in masked scores: exp() of it underflows to exactly 0,
# but max/subtract never produce inf - inf = NaN (see the Pallas notes).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HIGHEST = jax.lax.Precision.HIGHEST


class VQAttentionState(eqx.Module):
    """Streaming state of one VQ-attention unit (per batch row and head).

    Carries everything a later segment needs to attend to this one exactly:
    the window of the last `mem_len` keys (attended directly, with the
    relative bias) and the compressed cache of every older key (per-code key
    counts and value means), as the official `xlcache` and `aggcache`.

    **Fields** (`mem_len` = M, the window length; may be 0):

    - `window_code`: int32 `[batch, M, heads]`, codes of the window's keys
      (they enter the cache by code when they leave the window).
    - `window_key`: `[batch, M, heads, d_k]`, their codewords as quantized with
      the codebook of the step that saw them (official; read with
      `state_keys="codewords"`, ignored with `state_keys="codes"`).
    - `window_value`: `[batch, M, heads, d_v]`, their values.
    - `length`: int32 `[batch]`, how many of the window's last slots hold real
      tokens (0 before the first token; slots before that are masked).
    - `cache_count`: float32 `[batch, heads, codes]`, keys per code in the cache
      (exact up to 2^24 keys per code).
    - `cache_mean`: float32 `[batch, heads, codes, d_v]` (float64 for float64
      values), mean value per code. Float32 whatever the activation dtype:
      rounded to bf16 after every call, a code's mean stops moving once it has
      seen a few hundred keys, and a long bf16 stream drifts from float32.
      The ops accept a state with a lower-precision `cache_mean` and return
      one in float32.
    """

    window_code: Int[Array, "batch mem heads"]
    window_key: Float[Array, "batch mem heads d_k"]
    window_value: Float[Array, "batch mem heads d_v"]
    length: Int[Array, " batch"]
    cache_count: Float[Array, "batch heads codes"]
    cache_mean: Float[Array, "batch heads codes d_v"]

    @property
    def mem_len(self) -> int:
        """The window length M (static)."""
        return self.window_code.shape[1]

    @classmethod
    def empty(
        cls,
        batch_size: int | np.integer,
        *,
        heads: int | np.integer,
        codes: int | np.integer,
        d_k: int | np.integer,
        d_v: int | np.integer,
        mem_len: int | np.integer | None = None,
        block_len: int | np.integer | None = None,
        dtype=jnp.float32,
        key_dtype=None,
    ) -> VQAttentionState:
        """The state before any token: empty window and empty cache.

        `mem_len` is the window length; `block_len` alone (the older
        signature) means `mem_len = block_len`. `dtype` is the dtype of the
        window's values, `key_dtype` (default `dtype`) of its codewords; the
        cache is float32 whatever `dtype` (`cache_dtype`).
        """
        if mem_len is None:
            if block_len is None:
                raise ValueError("VQAttentionState.empty needs mem_len (or block_len)")
            mem_len = as_int("VQAttentionState.empty: block_len", block_len, 1)
        mem_len = as_int("VQAttentionState.empty: mem_len", mem_len, 0)
        batch_size = as_int("VQAttentionState.empty: batch_size", batch_size, 0)
        heads = as_int("VQAttentionState.empty: heads", heads, 0)
        codes = as_int("VQAttentionState.empty: codes", codes, 0)
        d_k = as_int("VQAttentionState.empty: d_k", d_k, 0)
        d_v = as_int("VQAttentionState.empty: d_v", d_v, 0)
        key_dtype = dtype if key_dtype is None else key_dtype
        return cls(
            window_code=jnp.zeros((batch_size, mem_len, heads), jnp.int32),
            window_key=jnp.zeros((batch_size, mem_len, heads, d_k), key_dtype),
            window_value=jnp.zeros((batch_size, mem_len, heads, d_v), dtype),
            length=jnp.zeros((batch_size,), jnp.int32),
            cache_count=jnp.zeros((batch_size, heads, codes), jnp.float32),
            cache_mean=jnp.zeros((batch_size, heads, codes, d_v), cache_dtype(dtype)),
        )

    @classmethod
    def empty_for(
        cls,
        key: Float[Array, "batch seq heads d_k"],
        value: Float[Array, "batch seq heads d_v"],
        codebook: Float[Array, "heads codes d_k"],
        *,
        mem_len: int,
    ) -> VQAttentionState:
        """`empty` sized and typed for the inputs of an attention call."""
        b, _, h, d_k = key.shape
        return cls.empty(
            b,
            mem_len=mem_len,
            heads=h,
            codes=codebook.shape[1],
            d_k=d_k,
            d_v=value.shape[-1],
            dtype=value.dtype,
            key_dtype=key.dtype,
        )


def cache_dtype(dtype):
    """dtype of the carried cache means: float32, or `dtype` if wider."""
    dtype = jnp.dtype(dtype)
    wider = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > 4
    return dtype if wider else jnp.dtype(jnp.float32)


def as_int(name: str, value, minimum: int) -> int:
    """`value` as a Python int >= `minimum` (numpy integers accepted, bools
    and floats not); a ValueError naming `name` otherwise."""
    ok = isinstance(value, numbers.Integral | np.integer) and not isinstance(
        value, bool | np.bool_
    )
    if ok:
        value = operator.index(value)
        if value >= minimum:
            return value
    kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else ""
    raise ValueError(
        f"{name} must be a {kind} int (>= {minimum}); got {value!r} "
        f"({type(value).__name__})"
    )


STATE_KEYS = ("codewords", "codes")


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
    mem_len=None,
) -> None:
    """Raise a clear ValueError/TypeError naming the argument and shapes.

    `mem_len` is the resolved window length (`resolve_mem_len`); None skips
    the checks that need it.
    """
    _check_ranks_and_dtypes(query, key, value, codebook)
    _check_shapes_agree(query, key, value, codebook)
    _check_blocks(query, key, codebook, block_len)
    _check_relative_bias(query, rel_query, rel_table, mem_len)
    if state is not None:
        _check_state_shapes(state, query, value, codebook, mem_len)


def _check_ranks_and_dtypes(query, key, value, codebook) -> None:
    """Arrays of the right rank and a floating dtype."""
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


def _check_shapes_agree(query, key, value, codebook) -> None:
    """The shared axes agree: key as query, value's [batch, seq, heads], the
    codebook's heads and d_k."""
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


def _check_blocks(query, key, codebook, block_len) -> None:
    """A positive block length, a key space, a code. (Any seq length: a
    segment that is not whole blocks is padded, see `_padding`.)"""
    t, d_k = query.shape[1], query.shape[3]
    block_len = as_int("block_len", block_len, 1)
    if d_k == 0:
        # No key space: every key would tie on code 0 and the default scale
        # 1/sqrt(d_k) is undefined.
        raise ValueError(
            f"query/key need d_k >= 1 (the last axis); got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}"
        )
    if codebook.shape[1] == 0:
        raise ValueError(
            f"codebook needs at least one code to quantize keys to; got codebook "
            f"{tuple(codebook.shape)} (codes = 0)"
        )
    # Any seq length: the forms pad a partial last block (`pad_to_blocks`).
    del t


def _check_relative_bias(query, rel_query, rel_table, mem_len) -> None:
    """Both or neither of `rel_query` / `rel_table`, shaped for the query,
    the table's range within the window."""
    h, d_k = query.shape[2], query.shape[3]
    if (rel_query is None) != (rel_table is None):
        raise ValueError("rel_query and rel_table must be given together")
    if rel_query is not None and rel_table is not None:
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
        if mem_len is not None and rel_table.shape[0] - 1 > mem_len:
            raise ValueError(
                f"rel_table {tuple(rel_table.shape)} covers distances "
                f"0..{rel_table.shape[0] - 1}, but the bias range must be <= "
                f"mem_len={mem_len} (the window of directly attended keys)"
            )


def _check_state_shapes(state, query, value, codebook, mem_len) -> None:
    """A state whose every field is shaped for these inputs and window."""
    b, _, h, d_k = query.shape
    check_state(state)
    s = codebook.shape[1]
    d_v = value.shape[3]
    m = state.window_code.shape[1] if mem_len is None else mem_len
    want = dict(
        window_code=(b, m, h),
        window_key=(b, m, h, d_k),
        window_value=(b, m, h, d_v),
        length=(b,),
        cache_count=(b, h, s),
        cache_mean=(b, h, s, d_v),
    )
    for field, shape in want.items():
        got = getattr(state, field).shape
        if tuple(got) != shape:
            raise ValueError(
                f"state.{field} must have shape {shape} for query "
                f"{tuple(query.shape)}, value {tuple(value.shape)}, codebook "
                f"{tuple(codebook.shape)}, mem_len={m}; got {tuple(got)}"
            )


_STATE_DTYPES = dict(
    window_code="integer",
    window_key="floating",
    window_value="floating",
    length="integer",
    cache_count="floating",
    cache_mean="floating",
)


def check_state(state) -> None:
    """A TypeError unless `state` is a VQAttentionState of array fields with
    the right kinds of dtype (shapes: `validate_inputs`)."""
    if not isinstance(state, VQAttentionState):
        raise TypeError(
            f"state must be a VQAttentionState (VQAttentionState.empty) or None; "
            f"got {type(state).__name__}"
        )
    for field, kind in _STATE_DTYPES.items():
        x = getattr(state, field)
        want = jnp.integer if kind == "integer" else jnp.floating
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, want):
            got = x.dtype if hasattr(x, "dtype") else type(x).__name__
            raise TypeError(f"state.{field} must have an {kind} dtype; got {got}")


def resolve_mem_len(mem_len, state, block_len) -> int:
    """The window length: `mem_len` if given, else the state's, else
    `block_len`; a given `mem_len` must match the state's window."""
    if state is not None:
        check_state(state)
    if mem_len is None:
        return block_len if state is None else state.window_code.shape[1]
    mem_len = as_int("mem_len", mem_len, 0)
    if state is not None and state.window_code.shape[1] != mem_len:
        raise ValueError(
            f"state holds a window of {state.window_code.shape[1]} keys "
            f"(state.window_code {tuple(state.window_code.shape)}) but "
            f"mem_len={mem_len}; make the state with mem_len={mem_len}"
        )
    return mem_len


def check_options(*, use_cache, sliding_window, state_keys) -> bool:
    """Validate the attention options; returns the resolved `sliding_window`."""
    if not isinstance(use_cache, bool):
        raise ValueError(f"use_cache must be a bool; got {use_cache!r}")
    if sliding_window is None:
        sliding_window = not use_cache
    if not isinstance(sliding_window, bool):
        raise ValueError(
            f"sliding_window must be a bool or None; got {sliding_window!r}"
        )
    if use_cache and sliding_window:
        raise ValueError(
            "sliding_window=True needs use_cache=False (with the cache every key "
            "older than the window is attended through it)"
        )
    if state_keys not in STATE_KEYS:
        raise ValueError(f"state_keys must be one of {STATE_KEYS}; got {state_keys!r}")
    return sliding_window


def check_cache_decay(cache_decay) -> float:
    """`cache_decay` as a Python float in (0, 1] (static: it is compiled in)."""
    if isinstance(cache_decay, (bool, np.bool_)) or not isinstance(
        cache_decay, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"cache_decay must be a Python or numpy real number in (0, 1]; got "
            f"{cache_decay!r}"
        )
    gamma = float(cache_decay)
    if not 0.0 < gamma <= 1.0:  # NaN fails too
        raise ValueError(f"cache_decay must be in (0, 1]; got {cache_decay!r}")
    return gamma


def check_scale(scale, d_k: int):
    """The score scale: `1/sqrt(d_k)` for None; a Python float for a real
    number (numpy scalars and concrete 0-d arrays included); a traced 0-d
    array (a learned temperature, under jit or grad) as a float32 array.

    A ValueError names `scale` if it is not a real scalar or, when its value
    is known, not finite (NaN or inf would make every output NaN)."""
    if scale is None:
        return 1.0 / math.sqrt(d_k)
    if isinstance(scale, bool | np.bool_):
        raise ValueError(f"scale must be a real number or a 0-d array; got {scale!r}")
    if isinstance(scale, numbers.Real):
        scale = float(scale)
    elif hasattr(scale, "shape") and hasattr(scale, "dtype"):
        if tuple(scale.shape) != () or not (
            jnp.issubdtype(scale.dtype, jnp.floating)
            or jnp.issubdtype(scale.dtype, jnp.integer)
        ):
            raise ValueError(
                f"scale must be a real scalar (a 0-d float array); got shape "
                f"{tuple(scale.shape)} dtype {scale.dtype}"
            )
        try:
            scale = float(scale)
        except jax.errors.ConcretizationTypeError:
            # Traced (a learned temperature): its value is unknown here; an
            # operand of the scores, which are float32 (strict promotion).
            return jnp.asarray(scale).astype(jnp.float32)
    else:
        raise ValueError(
            f"scale must be a real number or a 0-d array; got "
            f"{type(scale).__name__} {scale!r}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale!r}")
    return scale


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


def require_rel_table(
    rel_table: Float[Array, "dist heads d_k"] | None,
) -> Float[Array, "dist heads d_k"]:
    """`rel_table`, which a given `rel_query` needs: a clear error if missing."""
    if rel_table is None:
        raise ValueError("rel_query and rel_table must be given together")
    return rel_table


def relative_bias(
    rel_query: Float[Array, "*batch rows heads d_k"],
    rel_table: Float[Array, "dist heads d_k"],
    dist: Int[Array, "rows cols"],
) -> Float[Array, "*batch rows heads cols"]:
    """Transformer-XL relative position term, float32:
    `rel_query[..., r, h] . rel_table[dist[r, c], h]` where
    `0 <= dist[r, c] < len(rel_table)`, else 0.

    `dist` holds the query-to-key distance of every (query row, key column)
    pair; every attention form (dense, windowed, KV-cached) only builds its own
    distances. The table is projected once per query (`[rows, dist]`) and the
    distances gathered from it, instead of a `[rows, cols, d_k]` tensor.
    """
    last = rel_table.shape[0] - 1
    proj = jnp.einsum(
        "...rhk,dhk->...rhd",
        rel_query,
        rel_table,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    in_range = ((dist >= 0) & (dist <= last))[:, None, :]  # [rows, 1, cols]
    idx = jnp.clip(dist, 0, last)[:, None, :]
    idx = jnp.broadcast_to(idx, proj.shape[:-1] + (dist.shape[1],))
    return jnp.where(in_range, jnp.take_along_axis(proj, idx, axis=-1), 0.0)


def log_count_bias(count: Float[Array, "*any"]) -> Float[Array, "*any"]:
    """log(count), with MASK_VALUE for empty codes; never NaN. Counts are
    whole numbers, or below 1 with a decayed cache."""
    return jnp.where(count > 0, jnp.log(jnp.where(count > 0, count, 1.0)), MASK_VALUE)

"""The blockwise core shared by every linear-time form (the xla form, the
pallas path, context parallelism and the benchmarks): quantize, prepend the
carried window, sum the cache of every block, and form the next state.

Let `k_ext` be the carried window (the last M keys before the segment) followed
by the segment's T keys. Block n (length L) attends, under one softmax, to
  [codebook rows, biased by log(count) and valued by the cached mean]
      (every key of k_ext before index nL, plus the carried cache)
  [its window k_ext[nL : nL + M + L]: the M keys before the block, then the
      block itself, causal]
The cache of block n is the carried cache plus an exclusive prefix sum, over
groups of L, of the per-group code histograms and value sums of k_ext's first
T entries, so all blocks run in parallel with no loop over blocks; memory is
O(T * (codes + M + L)).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._common import (
    HIGHEST,
    VQAttentionState,
    cache_dtype,
    gather_codes,
    quantize,
    straight_through,
)
from ._prefix import linear_recurrence, prefix_sum, running_max

sg = jax.lax.stop_gradient


def _blocks(x, block_len):
    """[B, T, ...] -> [B, N, L, ...]."""
    b, t = x.shape[:2]
    return x.reshape(b, t // block_len, block_len, *x.shape[2:])


def block_windows(x_ext, *, mem_len: int, block_len: int):
    """`[B, M + T, ...]` -> `[B, N, M + L, ...]`: block n's window
    `x_ext[:, nL : nL + M + L]`, by static slices (no gather).

    The front is padded to a whole number of blocks, so the window is `c + 1`
    consecutive padded blocks (c = ceil(M / L)) minus the padding.
    """
    L = block_len
    n_blk = (x_ext.shape[1] - mem_len) // L
    c = -(-mem_len // L)
    pad = c * L - mem_len
    x = jnp.pad(x_ext, [(0, 0), (pad, 0)] + [(0, 0)] * (x_ext.ndim - 2))
    blk = _blocks(x, L)  # [B, c + N, L, ...]
    win = jnp.concatenate([blk[:, i : i + n_blk] for i in range(c + 1)], axis=2)
    return win[:, :, pad:]


def window_offsets(mem_len: int, block_len: int):
    """`dist [L, M + L]`: query row r to window column j is at distance
    `M + r - j` (columns j < M precede the block)."""
    r = jnp.arange(block_len)[:, None]
    j = jnp.arange(mem_len + block_len)[None, :]
    return mem_len + r - j


class Extended(eqx.Module):
    """The carried window followed by the segment, every per-key array.

    - `code` int32 `[B, M + T, H]`, `khat` `[B, M + T, H, K]` (straight-through
      codewords), `value` `[B, M + T, H, V]`, `valid` bool `[B, M + T]`.
    """

    code: Int[Array, "batch ext heads"]
    khat: Float[Array, "batch ext heads d_k"]
    value: Float[Array, "batch ext heads d_v"]
    valid: Bool[Array, "batch ext"]
    last_start: Int[Array, "batch ext"] | None = None


def last_doc_start(
    doc_starts: Bool[Array, "batch seq"] | None, mem_len: int
) -> Int[Array, "batch ext"] | None:
    """Per entry of [window, segment]: the index of the last document start
    at or before it (-1: none in this call, the history's document goes on).
    The window's keys predate the call: no start there."""
    if doc_starts is None:
        return None
    b, t = doc_starts.shape
    idx = mem_len + jnp.arange(t, dtype=jnp.int32)
    marked = jnp.where(doc_starts, idx[None, :], -1)
    seg = running_max(marked)
    return jnp.concatenate([jnp.full((b, mem_len), -1, jnp.int32), seg], axis=1)


def extend(
    state: VQAttentionState,
    codes,
    khat,
    value,
    codebook,
    *,
    state_keys: str,
    doc_starts: Bool[Array, "batch seq"] | None = None,
) -> Extended:
    """Prepend the state's window to the segment's codes, keys and values.

    `state_keys="codewords"` reads the window's stored codewords (quantized
    with the codebook of their own step, as the official code);
    `"codes"` re-reads the current `codebook` at the stored codes.
    """
    if state_keys == "codewords":
        win_key = state.window_key.astype(khat.dtype)
    else:
        win_key = gather_codes(codebook, state.window_code).astype(khat.dtype)
    return Extended(
        code=jnp.concatenate([state.window_code, codes], axis=1),
        khat=jnp.concatenate([win_key, khat], axis=1),
        value=jnp.concatenate([state.window_value.astype(value.dtype), value], 1),
        valid=extend_valid(state, codes.shape[1]),
        last_start=last_doc_start(doc_starts, state.window_code.shape[1]),
    )


def extend_valid(state: VQAttentionState, t: int) -> Bool[Array, "batch ext"]:
    """Validity of [window, segment]: the window's last `length` slots are real."""
    b, m = state.window_code.shape[:2]
    win_valid = jnp.arange(m)[None, :] >= m - state.length[:, None]  # [B, M]
    return jnp.concatenate([win_valid, jnp.ones((b, t), bool)], axis=1)


class CacheTerms(eqx.Module):
    """What the cache of every block is made of (`cache_terms`), before the
    value sums: enough for the XLA form (`xla_cache_means`) and the kernel
    (`pallas_kernels.vq_attention.prefix`) to compute the same means.

    - `entering` int32 `[B, T, H]`: code of each of the first T extended
      entries, -1 where the key does not enter the cache (an invalid window
      slot; with documents, a key before its group's last start). Group n
      (entries nL..nL+L-1) enters after block n reads the cache.
    - `factor` float32 `[B, N]` or None (all 1): `y_n = factor_n y_(n-1) +
      group n` (the decay; 0 where a group holds a document start).
    - `block_count` f32 `[B, N, H, S]`: the counts block n reads;
      `new_count` f32 `[B, H, S]`: after the segment.
    - `sum0` f32 `[B, H, S, V]`: the carried cache as sums.
    - `fresh` bool `[B]` or None: the carried cache after the segment is
      empty (a document starts in the next window).
    """

    entering: Int[Array, "batch seq heads"]
    factor: Float[Array, "batch blocks"] | None
    block_count: Float[Array, "batch blocks heads codes"]
    new_count: Float[Array, "batch heads codes"]
    sum0: Float[Array, "batch heads codes d_v"]
    fresh: Bool[Array, " batch"] | None


def cache_terms(
    code,
    valid,
    state: VQAttentionState,
    *,
    n_code,
    block_len,
    decay=1.0,
    last_start=None,
) -> CacheTerms:
    """The cache's codes, factors and counts, from the extended codes and
    validity (the first T = length - M entries enter the cache).

    `decay` (gamma in (0, 1]): the cache of block n is `gamma * cache(n-1) +
    summary of the keys that left the window at block n`, counts and sums
    alike, so a key's weight is `gamma ** (blocks since it entered the
    cache)`; 1 is the plain (official) sum.

    `last_start` (documents, see `last_doc_start`): the cache restarts at
    every document start, a segmented scan: a group of L entries holding a
    start contributes only its keys from its last start on, and drops what
    came before it."""
    t = code.shape[1] - state.window_code.shape[1]
    entering, reset = entering_codes(
        code, valid, t=t, block_len=block_len, last_start=last_start
    )
    counts = _group_counts(entering, n_code=n_code, block_len=block_len)
    factor = block_factors(entering.shape[0], t // block_len, decay, reset)
    count0 = state.cache_count.astype(jnp.float32)
    blk_count, new_count = block_prefix(counts, count0, factor=factor)
    fresh = fresh_cache(last_start, t)
    if fresh is not None:
        new_count = jnp.where(fresh[:, None, None], 0.0, new_count)
    sum0 = state.cache_mean.astype(jnp.float32) * count0[..., None]
    return CacheTerms(entering, factor, blk_count, new_count, sum0, fresh)


def xla_cache_means(terms: CacheTerms, value, *, n_code, block_len):
    """The cached mean every block reads `[B, N, H, S, V]` (value dtype) and
    the sums after the segment `[B, H, S, V]` (float32), in XLA: per-group
    one-hot sums, their prefix over blocks, the division by the counts."""
    t = terms.entering.shape[1]
    sums = _onehot_sums(
        terms.entering, value[:, :t], n_code=n_code, block_len=block_len
    )
    blk_sum, new_sum = block_prefix(sums, terms.sum0, factor=terms.factor)
    # What the blocks read is one rounding to the value dtype; what is carried
    # to the next call stays float32, so rounding never compounds over calls.
    blk_mean = (blk_sum / _nonzero(terms.block_count)[..., None]).astype(value.dtype)
    return blk_mean, new_sum


def carried_mean(terms: CacheTerms, new_sum, dtype):
    """The carried cache's mean after the segment (float32 or wider)."""
    if terms.fresh is not None:
        new_sum = jnp.where(terms.fresh[:, None, None, None], 0.0, new_sum)
    return (new_sum / _nonzero(terms.new_count)[..., None]).astype(cache_dtype(dtype))


def entering_codes(code, valid, *, t, block_len, last_start=None):
    """The codes of the first `t` extended entries, -1 where the key does not
    enter the cache (invalid; with documents, before its group's last
    start), and whether each group holds a document start (`[B, N]`; None
    without documents)."""
    n_blk = t // block_len
    valid = valid[:, :t]
    reset = None
    if last_start is not None:
        # Keys from the last start of their group on (all, if it has none).
        group_last = _blocks(last_start[:, :t], block_len)[:, :, -1]  # [B, N]
        idx = jnp.arange(t)[None, :]
        valid = valid & (idx >= jnp.repeat(group_last, block_len, axis=1))
        first = (jnp.arange(n_blk) * block_len)[None, :]
        reset = group_last >= first  # the group holds a start
    return jnp.where(valid[:, :, None], code[:, :t], -1), reset


def block_factors(b: int, n_blk: int, decay: float, reset):
    """`[B, N]` factors of the cache recurrence (None: all 1)."""
    if decay == 1.0 and reset is None:
        return None
    a = jnp.full((b, n_blk), decay, jnp.float32)
    return a if reset is None else jnp.where(reset, 0.0, a)


def _group_counts(entering, *, n_code, block_len):
    """Per group of L entries, the count of each code `[B, N, H, S]`
    (float32; code -1 counts nowhere)."""
    onehot = jax.nn.one_hot(_blocks(entering, block_len), n_code, dtype=jnp.float32)
    return jnp.sum(onehot, axis=2)


def _onehot_sums(entering, value, *, n_code, block_len):
    """Per group of L entries, the value sum of each code `[B, N, H, S, V]`
    (float32; entries with code -1 add nothing)."""
    z = _blocks(entering, block_len)  # [B, N, L, H]
    v = _blocks(value, block_len)
    if v.dtype in (jnp.bfloat16, jnp.float16):
        # 0/1 and the values are exact in the value dtype and products are
        # accumulated in float32: the same sums as a float32 einsum (up to
        # summation order), on the fast low-precision matmul path.
        return jnp.einsum(
            "bnlhs,bnlhv->bnhsv",
            jax.nn.one_hot(z, n_code, dtype=v.dtype),
            v,
            preferred_element_type=jnp.float32,
        )
    return jnp.einsum(
        "bnlhs,bnlhv->bnhsv",
        jax.nn.one_hot(z, n_code, dtype=jnp.float32),
        v.astype(jnp.float32),
        precision=HIGHEST,
    )


def block_sums(code, value, valid, *, t, n_code, block_len, last_start=None):
    """Per block of the first `t` extended entries: code counts `[B, N, H, S]`
    and value sums `[B, N, H, S, V]` (float32) of its valid keys (with
    documents, those from the block's last start on), and whether the block
    holds a document start (`[B, N]`; None without documents)."""
    entering, reset = entering_codes(
        code, valid, t=t, block_len=block_len, last_start=last_start
    )
    counts = _group_counts(entering, n_code=n_code, block_len=block_len)
    sums = _onehot_sums(entering, value[:, :t], n_code=n_code, block_len=block_len)
    return counts, sums, reset


def block_prefix(x, total0, *, decay=1.0, reset=None, factor=None):
    """`y_n = a_n y_(n-1) + x_n` over the blocks (axis 1 of `x`) from
    `y_(-1) = total0`, with `a_n = factor[:, n]` if given, else `decay`, or
    0 where block n starts a document (`reset`). Returns (`y_(n-1)` for every
    block n: what it reads, the last `y`: what is carried). Linear in the
    number of blocks, forward and backward, on every platform (`_prefix`)."""
    n_blk = x.shape[1]
    if factor is None:
        factor = block_factors(x.shape[0], n_blk, decay, reset)
    if factor is None:
        inclusive = prefix_sum(x)
        before = jnp.concatenate(
            [jnp.zeros_like(x[:, :1]), inclusive[:, : n_blk - 1]], 1
        )
        return total0[:, None] + before, total0 + inclusive[:, n_blk - 1]
    inclusive = linear_recurrence(factor, x, total0)
    before = jnp.concatenate([total0[:, None], inclusive[:, : n_blk - 1]], 1)
    return before, inclusive[:, n_blk - 1]


def fresh_cache(last_start, t: int):
    """`[B]`: a document starts among the last M extended entries (the next
    window), so nothing of the carried cache is its own; None without
    documents."""
    return None if last_start is None else last_start[:, -1] >= t


def _nonzero(count):
    """`count` with its zeros replaced by 1 (an empty code's sum is 0, and so
    is its mean); decayed counts may be below 1."""
    return jnp.where(count > 0, count, 1.0)


class Prologue(eqx.Module):
    """Everything the linear-time forms compute before attending (`prologue`).

    - `state`: the incoming state (an empty one for `state=None`).
    - `codebook`: the codebook without gradient, in the key dtype.
    - `ext`: the carried window followed by the segment (`Extended`).
    - `terms`: what the cache is made of (`CacheTerms`).
    - `block_count` f32 `[B, N, H, S]`, `block_mean` `[B, N, H, S, V]`: the
      cache each block reads (stop-gradiented with `cache_grad=False`).
    - `new_count` f32 `[B, H, S]`, `new_mean` f32 `[B, H, S, V]`: the cache
      after the segment (for `next_state`).

    `block_mean` and `new_mean` are None when the caller computes them
    (`prologue(..., cache_means=False)`).
    """

    state: VQAttentionState
    codebook: Float[Array, "heads codes d_k"]
    ext: Extended
    terms: CacheTerms
    block_count: Float[Array, "batch blocks heads codes"]
    block_mean: Float[Array, "batch blocks heads codes d_v"] | None
    new_count: Float[Array, "batch heads codes"]
    new_mean: Float[Array, "batch heads codes d_v"] | None


def prologue(
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    state: VQAttentionState | None,
    *,
    block_len: int,
    mem_len: int,
    cache_grad: bool,
    state_keys: str,
    cache_decay: float = 1.0,
    doc_starts: Bool[Array, "batch seq"] | None = None,
    codes: Int[Array, "batch seq heads"] | None = None,
    cache_means: bool = True,
) -> Prologue:
    """Quantize the keys, form the straight-through keys, prepend the state's
    window (an empty state for `state=None` with window `mem_len`, resolved
    by the caller: `resolve_mem_len`) and sum the cache of every block: the
    shared first step of the xla and pallas forms. `codes`: the keys' codes if the caller has
    them already (`quantize(key, codebook)`), else computed here.
    `cache_means=False`: stop at the cache's terms (`Prologue.terms`); the
    caller computes the means (the pallas path's prefix kernel)."""
    n_code = codebook.shape[1]
    if state is None:
        state = VQAttentionState.empty_for(key, value, codebook, mem_len=mem_len)
    if codes is None:
        codes = quantize(key, codebook)  # [B, T, H]
    codebook = sg(codebook).astype(key.dtype)
    khat = straight_through(key, gather_codes(codebook, codes))
    ext = extend(
        state, codes, khat, value, codebook, state_keys=state_keys,
        doc_starts=doc_starts,
    )  # fmt: skip
    # The cache is kept up to date even when it is not read (as the official
    # code does), so the carried state is the same in every mode.
    terms = cache_terms(
        ext.code,
        ext.valid,
        state,
        n_code=n_code,
        block_len=block_len,
        decay=cache_decay,
        last_start=ext.last_start,
    )
    blk_mean = new_mean = None
    if cache_means:
        blk_mean, new_sum = xla_cache_means(
            terms, ext.value, n_code=n_code, block_len=block_len
        )
        new_mean = carried_mean(terms, new_sum, value.dtype)
        if not cache_grad:
            blk_mean = sg(blk_mean)
    return Prologue(
        state,
        codebook,
        ext,
        terms,
        terms.block_count,
        blk_mean,
        terms.new_count,
        new_mean,
    )


def next_state(
    state: VQAttentionState, ext: Extended, cache_count, cache_mean, *, cache_grad
):
    """The state after a segment: the last M entries of `ext` and the cache of
    everything before them (window dtypes kept from the incoming state; the
    cache float32 or wider, see `VQAttentionState`). With
    `cache_grad=False` it is a constant (official `grad_thru_cache=False`)."""
    m = state.window_code.shape[1]
    t = ext.code.shape[1] - m
    length = jnp.minimum(state.length + t, m)
    if ext.last_start is not None:
        # The window holds only the last document's keys (ext indices t..t+m-1
        # from its start on).
        start = ext.last_start[:, -1]
        length = jnp.where(start >= 0, t + m - jnp.maximum(start, t), length)
    new = VQAttentionState(
        window_code=ext.code[:, t:],
        window_key=ext.khat[:, t:].astype(state.window_key.dtype),
        window_value=ext.value[:, t:].astype(state.window_value.dtype),
        length=length.astype(jnp.int32),
        cache_count=cache_count,
        cache_mean=cache_mean.astype(
            max(cache_mean.dtype, state.cache_mean.dtype, key=cache_dtype_size)
        ),
    )
    return new if cache_grad else jax.tree.map(sg, new)


def cache_dtype_size(dtype) -> int:
    return cache_dtype(dtype).itemsize


def state_after(
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    state: VQAttentionState | None,
    *,
    mem_len: int,
    cache_grad: bool,
    state_keys: str,
    doc_starts: Bool[Array, "batch seq"] | None = None,
    codes: Int[Array, "batch seq heads"] | None = None,
) -> VQAttentionState:
    """The state after the segment, made without blocks: the window is the
    last M entries of [carried window, segment], the cache the carried cache
    plus every older valid key (with documents, from the last start on; empty
    if a start falls in the new window).

    It depends on the tokens only, not on where blocks begin (with the
    undecayed cache), so a segment padded to whole blocks (`pad_to_blocks`)
    carries exactly the state of its real tokens. Equals the blockwise state
    (`next_state` of `prologue`) up to summation order."""
    n_code = codebook.shape[1]
    if state is None:
        state = VQAttentionState.empty_for(key, value, codebook, mem_len=mem_len)
    if codes is None:
        codes = quantize(key, codebook)
    codebook = sg(codebook).astype(key.dtype)
    khat = straight_through(key, gather_codes(codebook, codes))
    ext = extend(
        state, codes, khat, value, codebook, state_keys=state_keys,
        doc_starts=doc_starts,
    )  # fmt: skip
    t = key.shape[1]
    # The first t entries of [window, segment] leave the window: they enter
    # the cache, the whole segment as one group.
    valid = ext.valid[:, :t]
    count0 = state.cache_count.astype(jnp.float32)
    sum0 = state.cache_mean.astype(jnp.float32) * count0[..., None]
    if ext.last_start is not None:
        # From the last start among them on; a start drops the carried cache.
        start = ext.last_start[:, t - 1]  # [B]
        valid = valid & (jnp.arange(t)[None, :] >= start[:, None])
        kept = (start < 0)[:, None, None]
        count0 = jnp.where(kept, count0, 0.0)
        sum0 = jnp.where(kept[..., None], sum0, 0.0)
    entering = jnp.where(valid[:, :, None], ext.code[:, :t], -1)
    count = count0 + _group_counts(entering, n_code=n_code, block_len=t)[:, 0]
    total = (
        sum0
        + _onehot_sums(entering, ext.value[:, :t], n_code=n_code, block_len=t)[:, 0]
    )
    fresh = fresh_cache(ext.last_start, t)
    if fresh is not None:
        count = jnp.where(fresh[:, None, None], 0.0, count)
        total = jnp.where(fresh[:, None, None, None], 0.0, total)
    mean = (total / _nonzero(count)[..., None]).astype(cache_dtype(value.dtype))
    return next_state(state, ext, count, mean, cache_grad=cache_grad)

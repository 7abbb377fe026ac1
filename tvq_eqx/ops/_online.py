"""Online codebook (OVQ-style option): a per-sequence dictionary of key
centroids learned while the sequence is read, instead of Transformer-VQ's
codebook learned across training by EMA.

The rule (docs/math.md, "Online codebook (OVQ-style option)"): a query in
block n attends exactly to its window (the `mem_len` keys before its block and
its block, causal, with the relative bias) and to every older key through the
dictionary: slot s contributes the logit `scale q . c_s + log n_s` and the
value mean `u_s`. Keys enter the dictionary one block at a time, when they
leave the window: first into free slots (a new slot is the key itself), then
each remaining key into its nearest centroid (squared Euclidean, against the
dictionary at the start of the block plus the slots made in it); every slot
is the running mean of the keys it received (count-based rate `1 / n_s`).

Two forms, equal in value and gradient:

- `online_vq_attention_quadratic`: the definition. It records each key's slot
  and builds the dictionary of every block directly as plain means of the
  keys assigned so far, then runs dense causal softmax with each old key
  replaced by the centroid of its slot (values raw).
- `online_vq_attention_with_state`: the linear form, a `lax.scan` over blocks
  carrying `OnlineVQState` (window plus dictionary), updating the centroids
  incrementally; streaming exact across calls of whole blocks.

Gradients flow through everything that is a function of the inputs: a
centroid is a mean of keys and a value mean a mean of values, so a query
reading slot s sends gradient to every key and value that slot received. The
slot choice (argmin) is piecewise constant and passes none.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._common import (
    HIGHEST,
    MASK_VALUE,
    as_int,
    log_count_bias,
    relative_bias,
    require_rel_table,
)


class OnlineVQState(eqx.Module):
    """Streaming state of one online-codebook attention unit.

    **Fields** (`mem_len` = M, may be 0; `codes` = S, the dictionary size):

    - `window_key`, `window_value`: `[batch, M, heads, d_k | d_v]`, the raw
      keys and values of the last M tokens (attended exactly).
    - `length`: int32 `[batch]`, how many of the window's last slots hold real
      tokens (the rest are masked and never enter the dictionary).
    - `centroid`: float32 `[batch, heads, codes, d_k]`, the key centroids.
    - `count`: float32 `[batch, heads, codes]`, keys per slot (0: free slot;
      slots fill in order, so the used ones are the first `sum(count > 0)`).
    - `value_mean`: float32 `[batch, heads, codes, d_v]`, mean value per slot.
    """

    window_key: Float[Array, "batch mem heads d_k"]
    window_value: Float[Array, "batch mem heads d_v"]
    length: Int[Array, " batch"]
    centroid: Float[Array, "batch heads codes d_k"]
    count: Float[Array, "batch heads codes"]
    value_mean: Float[Array, "batch heads codes d_v"]

    @property
    def mem_len(self) -> int:
        """The window length M (static)."""
        return self.window_key.shape[1]

    @property
    def codes(self) -> int:
        """The dictionary size S (static)."""
        return self.count.shape[2]

    @classmethod
    def empty(
        cls,
        batch_size: int | np.integer,
        *,
        heads: int | np.integer,
        codes: int | np.integer,
        d_k: int | np.integer,
        d_v: int | np.integer,
        mem_len: int | np.integer,
        dtype=jnp.float32,
    ) -> OnlineVQState:
        """The state before any token: empty window, every slot free. The
        window is in `dtype`; the dictionary is float32."""
        b = as_int("OnlineVQState.empty: batch_size", batch_size, 0)
        h = as_int("OnlineVQState.empty: heads", heads, 1)
        s = as_int("OnlineVQState.empty: codes", codes, 1)
        d_k = as_int("OnlineVQState.empty: d_k", d_k, 1)
        d_v = as_int("OnlineVQState.empty: d_v", d_v, 1)
        m = as_int("OnlineVQState.empty: mem_len", mem_len, 0)
        return cls(
            window_key=jnp.zeros((b, m, h, d_k), dtype),
            window_value=jnp.zeros((b, m, h, d_v), dtype),
            length=jnp.zeros((b,), jnp.int32),
            centroid=jnp.zeros((b, h, s, d_k), jnp.float32),
            count=jnp.zeros((b, h, s), jnp.float32),
            value_mean=jnp.zeros((b, h, s, d_v), jnp.float32),
        )


def assign_slots(
    keys: Float[Array, "chunk d_k"],
    valid: Bool[Array, " chunk"],
    centroid: Float[Array, "codes d_k"],
    count: Float[Array, " codes"],
) -> Int[Array, " chunk"]:
    """The slot each key of a chunk enters (one head; invalid keys: any).

    With `used` slots taken (`count > 0`), the r-th valid key (r from 0) takes
    the free slot `used + r` while `r < codes - used`; every other valid key
    takes the nearest slot (squared Euclidean, ties to the lowest index) among
    the used centroids as they are before the chunk and the slots just made
    (each equal to its key). Float32, no gradient (a choice, not a value).
    """
    keys = jax.lax.stop_gradient(keys).astype(jnp.float32)
    centroid = jax.lax.stop_gradient(centroid).astype(jnp.float32)
    s = count.shape[0]
    used = jnp.sum(count > 0).astype(jnp.int32)
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    is_new = valid & (rank < s - used)
    new_slot = used + rank
    made = jnp.minimum(s - used, jnp.sum(valid.astype(jnp.int32)))
    slots = jnp.arange(s)
    # The dictionary the remaining keys choose from: old centroids, then the
    # keys that made new slots.
    new_onehot = (is_new[:, None] & (new_slot[:, None] == slots[None, :])).astype(
        jnp.float32
    )
    made_keys = jnp.einsum("js,jk->sk", new_onehot, keys, precision=HIGHEST)
    table = jnp.where((slots < used)[:, None], centroid, made_keys)
    avail = slots < used + made
    dots = jnp.einsum("jk,sk->js", keys, table, precision=HIGHEST)
    dist = jnp.sum(table * table, axis=-1)[None, :] - 2.0 * dots
    # Finite (not inf): an unavailable slot must simply never be nearest.
    dist = jnp.where(avail[None, :], dist, jnp.finfo(jnp.float32).max)
    nearest = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    return jnp.where(is_new, new_slot, nearest)


def _update(centroid, count, value_mean, keys, values, slot, valid):
    """Running means: `n_s += m_s`, `c_s += (sum of its keys - m_s c_s) / n_s`
    and the same for the value means (one head; float32)."""
    s = count.shape[0]
    onehot = ((slot[:, None] == jnp.arange(s)[None, :]) & valid[:, None]).astype(
        jnp.float32
    )
    m = jnp.sum(onehot, axis=0)
    new_count = count + m
    safe = jnp.where(new_count > 0, new_count, 1.0)[:, None]

    def step(mean, x):
        total = jnp.einsum(
            "js,jd->sd", onehot, x.astype(jnp.float32), precision=HIGHEST
        )
        return mean + (total - m[:, None] * mean) / safe

    return step(centroid, keys), new_count, step(value_mean, values)


def _check(query, key, value, *, block_len, rel_query, rel_table, whole_blocks):
    for name, x in dict(query=query, key=key, value=value).items():
        if not hasattr(x, "ndim") or x.ndim != 4:
            got = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, dim]; got {got}"
            )
    if query.shape != key.shape:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must have the same shape"
        )
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value {tuple(value.shape)} must match key {tuple(key.shape)} in "
            "[batch, seq, heads]"
        )
    block_len = as_int("block_len", block_len, 1)
    t = query.shape[1]
    if whole_blocks and t % block_len:
        raise ValueError(
            f"the online codebook's linear form takes whole blocks: seq {t} "
            f"(query {tuple(query.shape)}) is not a multiple of block_len={block_len}"
        )
    if rel_query is not None:
        require_rel_table(rel_table)
        if rel_query.shape != query.shape:
            raise ValueError(
                f"rel_query {tuple(rel_query.shape)} must match query "
                f"{tuple(query.shape)}"
            )
    elif rel_table is not None:
        raise ValueError("rel_query and rel_table must be given together")
    return block_len


def online_vq_attention_quadratic(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    *,
    codes: int,
    block_len: int,
    mem_len: int | None = None,
    scale: float | Float[Array, ""],
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
) -> Float[Array, "batch seq heads d_v"]:
    """The definition of online-codebook attention, dense (O(T^2)), one call
    from an empty state; any sequence length.

    Query i in block n = i // L sees key j <= i directly when
    `j >= e_n = max(0, nL - M)` (score `scale q_i . k_j` plus the relative
    bias), else through the dictionary as it stands at block n: score
    `scale q_i . c^n_{a_j}`, with `a_j` the slot key j entered and `c^n_s` the
    plain mean of the keys in slot s among those older than `e_n`. Values are
    the raw `v_j`, so the keys of one slot sum to `n_s exp(score) u_s`: the
    linear form's log-count logit over the value mean.

    The slots are chosen block by block (`assign_slots`), keys `[e_{n-1},
    e_n)` against the dictionary of block n - 1.
    """
    block_len = _check(
        query, key, value, block_len=block_len, rel_query=rel_query,
        rel_table=rel_table, whole_blocks=False,
    )  # fmt: skip
    s = as_int("codes", codes, 1)
    m_len = block_len if mem_len is None else as_int("mem_len", mem_len, 0)
    b, t, h, _ = key.shape
    n_blocks = -(-t // block_len)
    edges = [max(0, n * block_len - m_len) for n in range(n_blocks)]
    edges = [min(e, t) for e in edges]

    def dictionaries(keys):
        """`[n_blocks, S, d_k]` centroids at each block and each key's slot
        (one head; keys `[T, d_k]`)."""
        k32 = keys.astype(jnp.float32)
        slot = jnp.full((t,), -1, jnp.int32)
        tables = []
        for n in range(n_blocks):
            if n > 0 and edges[n] > edges[n - 1]:
                lo, hi = edges[n - 1], edges[n]
                cent, cnt = means(k32, slot)
                chunk = assign_slots(k32[lo:hi], jnp.ones((hi - lo,), bool), cent, cnt)
                slot = slot.at[lo:hi].set(chunk)
            tables.append(means(k32, slot)[0])
        return jnp.stack(tables), slot

    def means(k32, slot):
        onehot = (slot[:, None] == jnp.arange(s)[None, :]).astype(jnp.float32)
        cnt = jnp.sum(onehot, axis=0)
        total = jnp.einsum("js,jk->sk", onehot, k32, precision=HIGHEST)
        return total / jnp.where(cnt > 0, cnt, 1.0)[:, None], cnt

    # [B, H, n_blocks, S, d_k], [B, H, T]
    tables, slot = jax.vmap(jax.vmap(dictionaries, in_axes=1), in_axes=0)(key)
    pos = jnp.arange(t)
    blk = pos // block_len
    edge = jnp.asarray(edges, jnp.int32)[blk]  # [T]: e_n of each query
    i, j = pos[:, None], pos[None, :]
    in_window = j >= edge[:, None]
    keep = j <= i
    # Key j as query i reads it: raw in the window, its slot's centroid before.
    old_key = jnp.take_along_axis(
        tables[:, :, blk],  # [B, H, T(query), S, d_k]
        jnp.maximum(slot, 0)[:, :, None, :, None],
        axis=3,
    )  # [B, H, T(query), T(key), d_k]
    q32 = query.astype(jnp.float32)
    raw = jnp.einsum("bihk,bjhk->bhij", q32, key.astype(jnp.float32), precision=HIGHEST)
    old = jnp.einsum("bihk,bhijk->bhij", q32, old_key, precision=HIGHEST)
    scores = scale * jnp.where(in_window, raw, old)
    if rel_query is not None:
        bias = relative_bias(rel_query, require_rel_table(rel_table), i - j)
        # No position term through the dictionary (slots have no position).
        scores = scores + jnp.where(in_window, jnp.swapaxes(bias, 1, 2), 0.0)
    probs = jax.nn.softmax(jnp.where(keep, scores, MASK_VALUE), axis=-1)
    out = jnp.einsum(
        "bhij,bjhv->bihv", probs, value.astype(jnp.float32), precision=HIGHEST
    )
    return out.astype(value.dtype)


def online_vq_attention_with_state(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    state: OnlineVQState,
    *,
    block_len: int,
    scale: float | Float[Array, ""],
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], OnlineVQState]:
    """The linear form: a scan over blocks of `block_len` (L) carrying the
    window and the dictionary. Per block and head: the window read
    `O(L (M + L) d)`, the dictionary read `O(L S d)`, then the L keys leaving
    the window enter it (`assign_slots` and the running means, `O(L S d)`).

    Segments of whole blocks streamed through the returned state equal one
    call (exact). The sequence length must be a multiple of `block_len`.
    """
    block_len = _check(
        query, key, value, block_len=block_len, rel_query=rel_query,
        rel_table=rel_table, whole_blocks=True,
    )  # fmt: skip
    if not isinstance(state, OnlineVQState):
        raise TypeError(
            f"state must be an OnlineVQState (OnlineVQState.empty); got "
            f"{type(state).__name__}"
        )
    b, t, h, d_k = key.shape
    d_v = value.shape[-1]
    m_len, s = state.mem_len, state.codes
    want = {
        "window_key": (b, m_len, h, d_k),
        "window_value": (b, m_len, h, d_v),
        "centroid": (b, h, s, d_k),
        "count": (b, h, s),
        "value_mean": (b, h, s, d_v),
        "length": (b,),
    }
    for name, shape in want.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(
                f"state.{name} has shape {got}; inputs (key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}) need {shape}"
            )
    L = block_len
    n_blocks = t // L

    def blocks(x):
        return (
            None
            if x is None
            else jnp.moveaxis(x.reshape(b, n_blocks, L, *x.shape[2:]), 1, 0)
        )

    xs = (blocks(query), blocks(key), blocks(value), blocks(rel_query))
    rows = m_len + jnp.arange(L)[:, None]
    cols = jnp.arange(m_len + L)[None, :]
    dist = rows - cols  # [L, M + L]
    assign = jax.vmap(jax.vmap(assign_slots, in_axes=(1, None, 0, 0)),
                      in_axes=(0, 0, 0, 0))  # fmt: skip
    update = jax.vmap(jax.vmap(_update, in_axes=(0, 0, 0, 1, 1, 0, None)),
                      in_axes=(0, 0, 0, 0, 0, 0, 0))  # fmt: skip

    def step(carry, x):
        wk, wv, length, cent, cnt, vmean = carry
        q, k, v, rq = x
        keys = jnp.concatenate([wk, k.astype(wk.dtype)], axis=1)  # [B, M+L, H, dk]
        vals = jnp.concatenate([wv, v.astype(wv.dtype)], axis=1)
        slot_pos = jnp.arange(m_len + L)[None, :]
        valid = slot_pos >= (m_len - length)[:, None]  # [B, M + L]
        q32 = q.astype(jnp.float32)
        win = scale * jnp.einsum(
            "bihk,bjhk->bhij", q32, keys.astype(jnp.float32), precision=HIGHEST
        )
        if rq is not None:
            table = require_rel_table(rel_table)
            win = win + jnp.swapaxes(relative_bias(rq, table, dist), 1, 2)
        keep = (dist >= 0)[None, None] & valid[:, None, None, :]
        win = jnp.where(keep, win, MASK_VALUE)
        mem = scale * jnp.einsum("bihk,bhsk->bhis", q32, cent, precision=HIGHEST)
        # Free slots masked by `where`, not by adding MASK_VALUE.
        mem = jnp.where(
            (cnt > 0)[:, :, None, :],
            mem + log_count_bias(cnt)[:, :, None, :],
            MASK_VALUE,
        )
        # The ratio below does not depend on `top`: no gradient through it.
        top = jax.lax.stop_gradient(
            jnp.maximum(jnp.max(win, -1), jnp.max(mem, -1))[..., None]
        )
        pw, pm = jnp.exp(win - top), jnp.exp(mem - top)
        num = jnp.einsum(
            "bhij,bjhv->bihv", pw, vals.astype(jnp.float32), precision=HIGHEST
        ) + jnp.einsum("bhis,bhsv->bihv", pm, vmean, precision=HIGHEST)
        den = jnp.swapaxes(jnp.sum(pw, -1) + jnp.sum(pm, -1), 1, 2)[..., None]
        out = (num / den).astype(value.dtype)
        # The first L of window + block leave the window into the dictionary.
        out_k = keys[:, :L].astype(jnp.float32)
        out_valid = valid[:, :L]
        slot = assign(out_k, out_valid, cent, cnt)  # [B, H, L]
        cent, cnt, vmean = update(cent, cnt, vmean, out_k, vals[:, :L], slot, out_valid)
        new = (
            keys[:, L:],
            vals[:, L:],
            jnp.minimum(length + L, m_len),
            cent,
            cnt,
            vmean,
        )
        return new, out

    carry = (
        state.window_key,
        state.window_value,
        state.length,
        state.centroid.astype(jnp.float32),
        state.count.astype(jnp.float32),
        state.value_mean.astype(jnp.float32),
    )
    carry, outs = jax.lax.scan(step, carry, xs)
    out = jnp.moveaxis(outs, 0, 1).reshape(b, t, h, d_v)
    new_state = OnlineVQState(*carry)
    return out, new_state

"""Context parallelism: VQ attention over a sequence sharded along a mesh axis.

Device d of a mesh axis of size D holds the sequence chunk `[dC, (d+1)C)`.
What it needs from the rest of the sequence is exactly a streaming state:
the window (the last `mem_len` keys before its chunk) and the cache of every
older key. So:

1. each device sends the last `mem_len` keys of its chunk (codes, codewords,
   values) to the next device (`ppermute`: one boundary block);
2. each device sums the keys that leave the window inside its chunk into a
   per-code count `[heads, codes]` and value sum `[heads, codes, d_v]` per
   row (its *delta*); its chunk maps the cache before it to `a * cache +
   delta`, with `a` per row 1, or `cache_decay ** blocks`, or 0 where a
   packed document starts in the chunk (the cache restarts). The devices
   exchange these (`all_gather` over the axis: `D` summaries, independent of
   the sequence length);
3. device d's cache is the incoming state's cache carried through the maps
   of devices `0..d-1` (an exclusive scan), and it runs the ordinary
   streaming op on its chunk (with its documents' starts, if any).

No activation crosses devices except the boundary block. The state after the
whole sequence is the last device's, handed to every device (a `psum` of
that one state). Gradients follow by JAX's transposes of these collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float

from ._blockwise import block_prefix, block_sums, fresh_cache, last_doc_start
from ._common import (
    HIGHEST,
    VQAttentionState,
    as_int,
    cache_dtype,
    gather_codes,
    quantize,
    resolve_mem_len,
    straight_through,
)
from ._dispatch import AttentionOptions, check_streaming_inputs, run_resolved


def check_chunk_len(chunk_len: int, *, block_len: int, mem_len: int, what: str) -> None:
    """The context-parallel rule for one device's part of a sequence: whole
    blocks, and at least the window (each device's window comes from its left
    neighbour's last `mem_len` tokens only). The op checks it at trace time;
    `train.mesh_for_run` before a run starts."""
    if chunk_len % block_len or chunk_len < mem_len:
        raise ValueError(
            f"{what} must be a multiple of block_len={block_len} and at least "
            f"mem_len={mem_len} (context parallelism keeps whole blocks on "
            "every device; on one device a sequence may have any length)"
        )


def _chunk_map(code, value, valid, last_start, *, c, n_code, block_len, decay):
    """What a chunk does to the cache before it: `after = a * before + delta`.

    From the first `c` entries of [incoming window, chunk] (the keys that
    leave the window inside the chunk): `a` `[B]`, the delta's count
    `[B, H, S]` and value sum `[B, H, S, V]` (float32), by the same block
    sums and prefix as the streaming op, from an empty cache."""
    counts, sums, reset = block_sums(
        code, value, valid, t=c, n_code=n_code, block_len=block_len,
        last_start=last_start,
    )  # fmt: skip
    _, count = block_prefix(
        counts, jnp.zeros_like(counts[:, 0]), decay=decay, reset=reset
    )
    _, total = block_prefix(sums, jnp.zeros_like(sums[:, 0]), decay=decay, reset=reset)
    a = jnp.full(code.shape[:1], jnp.float32(decay) ** (c // block_len))
    if reset is not None:
        a = jnp.where(jnp.any(reset, axis=1), 0.0, a)
    fresh = fresh_cache(last_start, c)
    if fresh is not None:
        a = jnp.where(fresh, 0.0, a)
        count = jnp.where(fresh[:, None, None], 0.0, count)
        total = jnp.where(fresh[:, None, None, None], 0.0, total)
    return a, count, total


def _window_length_after(doc_starts, c: int, m: int):
    """`[B]` filled slots of the window after a chunk of `c >= m` tokens: `m`,
    or fewer where a document starts among its last `m` tokens."""
    if doc_starts is None:
        return None
    idx = jnp.where(doc_starts, jnp.arange(c)[None, :], -1)
    last = jnp.max(idx, axis=1)
    return jnp.where(last >= c - m, c - last, m).astype(jnp.int32)


def vq_attention_context_parallel(
    query: Float[Array, "batch chunk heads d_k"],
    key: Float[Array, "batch chunk heads d_k"],
    value: Float[Array, "batch chunk heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    state: VQAttentionState | None,
    *,
    axis_name: str,
    block_len: int,
    mem_len: int | None = None,
    scale=None,
    rel_query=None,
    rel_table=None,
    cache_decay: float = 1.0,
    implementation: str | None = None,
    pallas=None,
    doc_starts: Bool[Array, "batch chunk"] | None = None,
) -> tuple[Float[Array, "batch chunk heads d_v"], VQAttentionState]:
    """`vq_attention_with_state` on a sequence sharded along mesh axis
    `axis_name`; call it inside `jax.shard_map` (or use
    `vq_attention_sharded`).

    `query`, `key`, `value` (and `rel_query`) are this device's chunk of the
    sequence (the chunks in device order make the sequence); `codebook`,
    `state` and `rel_table` are the same on every device (`state` is the
    history before the whole sequence). The chunk length must be a multiple
    of `block_len` and at least `mem_len` (the window comes from the previous
    device only). The cache is used (`use_cache=True`, `cache_grad=True`,
    `state_keys="codewords"`: the defaults of the streaming op).
    `doc_starts` (bool, this chunk's part): packed documents, as in
    `vq_attention_with_state`.

    **Returns:** this chunk's output and the state after the whole sequence
    (the same on every device).
    """
    # The options resolved and the inputs validated once, here; the chunk's
    # attention below trusts them (`run_resolved`).
    opts = AttentionOptions.resolve(
        implementation=implementation,
        pallas=pallas,
        block_len=block_len,
        mem_len=mem_len,
        state=state,
        cache_decay=cache_decay,
    )
    block_len, mem_len, cache_decay = opts.block_len, opts.mem_len, opts.cache_decay
    b, c, h, _ = key.shape
    check_chunk_len(
        c, block_len=block_len, mem_len=mem_len,
        what=f"each device's chunk ({c} tokens of key {tuple(key.shape)})",
    )  # fmt: skip
    scale, doc_starts = check_streaming_inputs(
        query, key, value, codebook, state, opts, scale=scale,
        rel_query=rel_query, rel_table=rel_table, doc_starts=doc_starts,
    )  # fmt: skip
    if state is None:
        state = VQAttentionState.empty_for(key, value, codebook, mem_len=mem_len)
    # 1. The boundary block: this chunk's last M keys are the next chunk's window.
    codes = quantize(key, codebook)
    khat = straight_through(
        key, gather_codes(jax.lax.stop_gradient(codebook).astype(key.dtype), codes)
    )
    window = _incoming_window(
        codes, khat, value, state, doc_starts, axis_name=axis_name, mem_len=mem_len
    )
    # 2.-3. The cache before this chunk, from every earlier chunk's summary.
    cache_count, cache_mean = _cache_before_chunk(
        codes, value, state, window, doc_starts, axis_name=axis_name,
        n_code=codebook.shape[1], block_len=block_len, cache_decay=cache_decay,
    )  # fmt: skip
    win_code, win_key, win_value, length = window
    local = VQAttentionState(
        window_code=win_code,
        window_key=win_key.astype(state.window_key.dtype),
        window_value=win_value.astype(state.window_value.dtype),
        length=length.astype(jnp.int32),
        cache_count=cache_count,
        cache_mean=cache_mean.astype(cache_dtype(state.cache_mean.dtype)),
    )

    # The chunk's keys are quantized once: the boundary block above and the
    # attention share the codes.
    out, after = run_resolved(
        query, key, value, codebook, local, opts, scale=scale,
        rel_query=rel_query, rel_table=rel_table, doc_starts=doc_starts,
        codes=codes,
    )  # fmt: skip
    # The state after the sequence is the last device's; hand it to all.
    last = jax.lax.axis_index(axis_name) == jax.lax.axis_size(axis_name) - 1
    final = jax.tree.map(
        lambda x: jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis_name),
        after,
    )
    return out, final


def _incoming_window(codes, khat, value, state, doc_starts, *, axis_name, mem_len):
    """This device's window: the previous device's last `mem_len` codes,
    codewords and values (`ppermute`), or the incoming state's on device 0;
    with its valid length (whole, unless a document starts in it)."""
    m, c = mem_len, codes.shape[1]
    n_dev = jax.lax.axis_size(axis_name)
    to_next = [(i, i + 1) for i in range(n_dev - 1)]
    sent = (codes[:, c - m :], khat[:, c - m :], value[:, c - m :])
    got_code, got_key, got_value = (
        jax.lax.ppermute(x, axis_name, to_next) for x in sent
    )
    # Chunks are at least M long, so every window after the first is whole,
    # unless a document starts in it (then the sender says how much is left).
    length_after = _window_length_after(doc_starts, c, m)
    got_length = (
        jnp.full_like(state.length, m)
        if length_after is None
        else jax.lax.ppermute(length_after, axis_name, to_next)
    )
    first = jax.lax.axis_index(axis_name) == 0
    win_code = jnp.where(first, state.window_code, got_code)
    win_key = jnp.where(first, state.window_key.astype(khat.dtype), got_key)
    win_value = jnp.where(first, state.window_value.astype(value.dtype), got_value)
    length = jnp.where(first, state.length, got_length)
    return win_code, win_key, win_value, length


def _cache_before_chunk(
    codes, value, state, window, doc_starts, *, axis_name, n_code, block_len,
    cache_decay,
):  # fmt: skip
    """The cache this device's chunk starts from (count `[B, H, S]`, mean
    `[B, H, S, V]`, float32): the incoming state's carried through the maps
    of the devices before it."""
    win_code, _, win_value, length = window
    b, c = codes.shape[:2]
    m = win_code.shape[1]
    dev = jax.lax.axis_index(axis_name)
    n_dev = jax.lax.axis_size(axis_name)
    # 2. What this chunk does to the cache: the first C entries of [window,
    # chunk] leave the window within the chunk.
    ext_code = jnp.concatenate([win_code, codes], axis=1)
    ext_value = jnp.concatenate([win_value, value], axis=1)
    win_valid = jnp.arange(m)[None, :] >= m - length[:, None]
    ext_valid = jnp.concatenate([win_valid, jnp.ones((b, c), bool)], axis=1)
    a, count, total = _chunk_map(
        ext_code, ext_value, ext_valid, last_doc_start(doc_starts, m), c=c,
        n_code=n_code, block_len=block_len, decay=cache_decay,
    )  # fmt: skip

    # 3. Exclusive scan over devices: device d's cache is the incoming one
    # carried through the maps of devices 0..d-1: the delta of device j < d
    # weighted by the product of the factors `a` of devices j+1..d-1.
    a_all = jax.lax.all_gather(a, axis_name)  # [D, B]
    counts = jax.lax.all_gather(count, axis_name)  # [D, B, H, S]
    totals = jax.lax.all_gather(total, axis_name)  # [D, B, H, S, V]
    src = jnp.arange(n_dev)
    between = (src[None, :] > src[:, None]) & (src[None, :] < dev)  # [j, i]
    weight = jnp.prod(jnp.where(between[..., None], a_all[None], 1.0), axis=1)
    weight = jnp.where((src < dev)[:, None], weight, 0.0)  # [D, B]
    carried = jnp.prod(jnp.where((src < dev)[:, None], a_all, 1.0), axis=0)  # [B]
    count0 = state.cache_count.astype(jnp.float32)
    sum0 = state.cache_mean.astype(jnp.float32) * count0[..., None]
    cache_count = carried[:, None, None] * count0 + jnp.einsum(
        "db,dbhs->bhs", weight, counts
    )
    cache_sum = carried[:, None, None, None] * sum0 + jnp.einsum(
        "db,dbhsv->bhsv", weight, totals, precision=HIGHEST
    )
    cache_mean = cache_sum / jnp.where(cache_count > 0, cache_count, 1.0)[..., None]
    return cache_count, cache_mean


def vq_attention_sharded(
    query: Array,
    key: Array,
    value: Array,
    codebook: Array,
    state: VQAttentionState | None,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    seq_axis: str,
    batch_axis: str | None = None,
    block_len: int,
    mem_len: int | None = None,
    scale=None,
    rel_query: Array | None = None,
    rel_table: Array | None = None,
    cache_decay: float = 1.0,
    implementation: str | None = None,
    pallas=None,
    doc_starts: Bool[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """`vq_attention_with_state` with the sequence sharded over `mesh` axis
    `seq_axis` (and the batch over `batch_axis`, if given): a `shard_map` of
    `vq_attention_context_parallel`. `mesh` None: the mesh set by
    `jax.set_mesh` (as inside the model). `seq` must split into equal chunks,
    each a multiple of `block_len` and at least `mem_len` long. `rel_query`
    and `doc_starts` are split like `query`, `rel_table` replicated."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.shape:
            raise ValueError(
                f"vq_attention_sharded needs a mesh with axis {seq_axis!r}: pass "
                "mesh=, or call it under `with jax.set_mesh(mesh):`"
            )
    for name, axis in (("seq_axis", seq_axis), ("batch_axis", batch_axis)):
        if axis is not None and axis not in mesh.shape:
            raise ValueError(
                f"{name} {axis!r} is not an axis of the mesh {dict(mesh.shape)}"
            )
    n = mesh.shape[seq_axis]
    if query.shape[1] % n:
        raise ValueError(
            f"seq ({query.shape[1]}) of query {tuple(query.shape)} must split "
            f"into {n} equal chunks (mesh axis {seq_axis!r})"
        )
    if state is None:
        state = VQAttentionState.empty_for(
            key, value, codebook,
            mem_len=resolve_mem_len(mem_len, None, as_int("block_len", block_len, 1)),
        )  # fmt: skip
    seq = P(batch_axis, seq_axis)
    rows = P(batch_axis)
    state_spec = jax.tree.map(lambda _: rows, state)

    def body(q, k, v, cb, st, rq, rt, docs):
        return vq_attention_context_parallel(
            q, k, v, cb, st, axis_name=seq_axis, block_len=block_len,
            mem_len=mem_len, scale=scale, rel_query=rq, rel_table=rt,
            cache_decay=cache_decay, implementation=implementation, pallas=pallas,
            doc_starts=docs,
        )  # fmt: skip

    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(seq, seq, seq, P(), state_spec, seq, P(), seq),
        out_specs=(seq, state_spec),
    )
    return sharded(query, key, value, codebook, state, rel_query, rel_table, doc_starts)

"""Un-quantized causal softmax attention with a KV cache: the "full" baseline.

Same scores as the model's VQ attention (content term on raw keys, the
Transformer-XL relative term for distances <= mem_len) but every key is kept
as is. The streaming state is a fixed-capacity KV cache holding the last
`capacity` keys and values, so a call attends to up to `capacity` earlier
tokens plus the current segment; cost per token is O(capacity + seq).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._common import HIGHEST, MASK_VALUE, relative_bias, require_rel_table


class FullAttentionState(eqx.Module):
    """KV cache of the last `capacity` tokens (oldest first).

    - `key`: `[batch, capacity, heads, d_k]`; `value`: `[batch, capacity, heads, d_v]`;
    - `length`: int32 `[batch]`, how many of the last slots hold real tokens.
    """

    key: Float[Array, "batch capacity heads d_k"]
    value: Float[Array, "batch capacity heads d_v"]
    length: Int[Array, " batch"]

    @classmethod
    def empty(
        cls,
        batch_size: int,
        *,
        capacity: int,
        heads: int,
        d_k: int,
        d_v: int,
        dtype=jnp.float32,
    ) -> FullAttentionState:
        return cls(
            key=jnp.zeros((batch_size, capacity, heads, d_k), dtype),
            value=jnp.zeros((batch_size, capacity, heads, d_v), dtype),
            length=jnp.zeros((batch_size,), jnp.int32),
        )


def full_attention_with_state(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    state: FullAttentionState,
    *,
    scale: float,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], FullAttentionState]:
    """Causal attention of `query` over [cached keys, current keys]."""
    b, t, h, _ = query.shape
    cap = state.key.shape[1]
    keys = jnp.concatenate([state.key.astype(key.dtype), key], axis=1)  # [B, C+T, H, K]
    values = jnp.concatenate([state.value.astype(value.dtype), value], axis=1)
    # Position of every key relative to the segment start: cache slots are -C..-1.
    key_pos = jnp.arange(cap + t) - cap
    dist = jnp.arange(t)[:, None] - key_pos[None, :]  # [T, C+T]
    valid = key_pos[None, :] >= -state.length[:, None]  # [B, C+T]
    keep = (dist >= 0)[None] & valid[:, None, :]  # [B, T, C+T]

    scores = scale * jnp.einsum(
        "bihk,bjhk->bhij",
        query,
        keys,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if rel_query is not None:
        bias = relative_bias(
            rel_query, require_rel_table(rel_table), dist
        )  # [B, T, H, C+T]
        scores = scores + jnp.swapaxes(bias, 1, 2)
    scores = jnp.where(keep[:, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhij,bjhv->bihv", probs, values.astype(jnp.float32), precision=HIGHEST
    ).astype(value.dtype)
    new_state = FullAttentionState(
        key=keys[:, -cap:].astype(state.key.dtype),
        value=values[:, -cap:].astype(state.value.dtype),
        length=jnp.minimum(state.length + t, cap),
    )
    return out, new_state

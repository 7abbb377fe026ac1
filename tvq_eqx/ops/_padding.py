"""Any sequence length on the blockwise forms: pad the segment's end to whole
blocks, attend, drop the padded rows, and carry the state of the real tokens.

Padding at the end changes no real output: every padded key comes after
every real query (causal). The state is made from the real tokens alone
(`state_after`): the window holds the last `mem_len` of them and the cache
every older one, whatever the block boundaries, so the next call goes on
from token T (not from the padded length) and streamed segments of any
lengths equal one call on their concatenation.

Two options make the carried state depend on where blocks begin, and so
keep requiring whole blocks in a streaming call: a decayed cache
(`cache_decay < 1` weighs whole blocks) and the block window
(`use_cache=False, sliding_window=False`: a query sees its block's window).
"""

from __future__ import annotations

import jax.numpy as jnp

from ._blockwise import state_after


def partial_blocks_error(
    t: int,
    *,
    block_len: int,
    use_cache: bool,
    sliding_window: bool,
    cache_decay,
    online: bool = False,
) -> str | None:
    """Why a streaming segment of `t` tokens must be whole blocks under these
    options (a message naming them), or None when any length works."""
    if t % block_len == 0:
        return None
    if cache_decay != 1.0:
        why = (
            f"cache_decay={cache_decay} weighs cached keys by whole blocks, so "
            "the carried state depends on where blocks begin"
        )
    elif online:
        why = (
            "the online codebook (codebook_mode='online') takes keys into its "
            "dictionary by whole blocks"
        )
    elif not use_cache and not sliding_window:
        why = (
            "the block window (use_cache=False, sliding_window=False; "
            "attention='block_window') attends whole blocks"
        )
    else:
        return None
    return (
        f"seq length {t} must be a multiple of block_len={block_len} here: {why}. "
        "Other options take any length."
    )


def pad_end(x, pad: int, value=0):
    """`x` `[B, T, ...]` with `pad` entries of `value` appended along T (None
    stays None)."""
    if x is None or pad == 0:
        return x
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


def pad_to_blocks(
    form,
    query,
    key,
    value,
    codebook,
    *,
    block_len: int,
    state=None,
    rel_query=None,
    rel_table=None,
    use_cache: bool = True,
    cache_grad: bool = True,
    mem_len: int,
    sliding_window: bool,
    state_keys: str = "codewords",
    cache_decay: float = 1.0,
    doc_starts=None,
    codes=None,
    **options,
):
    """`form` (`vq_attention_xla` or `vq_attention_pallas`) on a segment of
    any length: run on the segment padded to whole blocks at its end, output
    sliced to the real rows, state of the real tokens (`state_after`)."""
    t = query.shape[1]
    pad = -t % block_len
    error = partial_blocks_error(
        t, block_len=block_len, use_cache=use_cache,
        sliding_window=sliding_window, cache_decay=cache_decay,
    )  # fmt: skip
    if error is not None:
        raise ValueError(error)
    out, _ = form(
        pad_end(query, pad),
        pad_end(key, pad),
        pad_end(value, pad),
        codebook,
        block_len=block_len,
        state=state,
        rel_query=pad_end(rel_query, pad),
        rel_table=rel_table,
        use_cache=use_cache,
        cache_grad=cache_grad,
        mem_len=mem_len,
        sliding_window=sliding_window,
        state_keys=state_keys,
        cache_decay=cache_decay,
        # Padded tokens continue the last document; no real query sees them.
        doc_starts=pad_end(doc_starts, pad, False),
        codes=pad_end(codes, pad),
        **options,
    )
    new_state = state_after(
        key, value, codebook, state, mem_len=mem_len, cache_grad=cache_grad,
        state_keys=state_keys, doc_starts=doc_starts, codes=codes,
    )  # fmt: skip
    return out[:, :t], new_state

"""Document masking (`doc_starts`) on the Pallas kernels (interpret mode):
forward, every gradient and the returned state against the xla form (itself
held to the quadratic definition in test_documents.py) and the quadratic
definition; streaming through states whose window a document cut short.

Tolerances as in test_pallas.py: float32 1e-5; bfloat16 1e-2 forward and
1.5e-2 gradients against the float32 xla form on the same bf16 inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from pallas_kernels.vq_attention import BlockSizes, PallasConfig
from tvq_eqx.ops import VQAttentionState, vq_attention, vq_attention_with_state

B, T, H, K, V, S, L = 2, 32, 2, 8, 12, 5, 8
# Starts inside blocks, at a block's first token, in the last block (the
# carried window is then cut short) and none at all in a row's first block.
STARTS = {0: (0, 5, 16, 29), 1: (11, 12, 26)}
# Small tiles: several query and key tiles per block, padded codes and d_v.
TINY = PallasConfig(
    block_sizes=BlockSizes(block_q=4, block_k=2, block_code=4, block_v=8)
)
# bwd_dq with its value columns streamed through a grid axis (the TPU rule's
# choice where whole value rows would not fit VMEM), in chunks of 4.
TINY_STREAMED = PallasConfig(
    block_sizes=BlockSizes(
        block_q=4, block_k=2, block_code=4, block_v=8, dq_block_dv=4, dq_stream_v=True
    )
)


def _doc_starts(starts=STARTS, t=T):
    d = np.zeros((B, t), bool)
    for row, cols in starts.items():
        d[row, [c for c in cols if c < t]] = True
    return jnp.asarray(d)


def _inputs(getkey, dtype):
    q, k, rq = (jax.random.normal(getkey(), (B, T, H, K)) for _ in range(3))
    v = jax.random.normal(getkey(), (B, T, H, V))
    rt = jax.random.normal(getkey(), (L + 1, H, K))
    codebook = jax.random.normal(getkey(), (H, S, K))
    cot = jax.random.normal(getkey(), (B, T, H, V))
    cast = lambda x: x.astype(dtype)
    return tuple(map(cast, (q, k, v, 0.3 * rq, rt))), codebook, cast(cot)


@functools.partial(jax.jit, static_argnames=("impl", "opts"))
def _run(impl, opts, arrays, codebook, docs, cot):
    """Output, returned state, and the gradients of <output, cot> w.r.t.
    q, k, v, rel_query and rel_table."""
    opts = dict(opts)
    rel = opts.pop("rel")

    def f(q, k, v, rq, rt):
        extra = dict(rel_query=rq, rel_table=rt) if rel else {}
        out, state = vq_attention_with_state(
            q, k, v, codebook, None, block_len=L, doc_starts=docs,
            implementation=impl, **extra, **opts,
        )  # fmt: skip
        return out, state

    out, vjp, state = jax.vjp(f, *arrays, has_aux=True)
    grads = vjp(cot)
    return out, state, grads[:5] if rel else grads[:3]


MODES = {
    "cache+rel": dict(rel=True),
    "cache, decay 0.7": dict(rel=False, cache_decay=0.7),
    "window (agg_cache=False)+rel": dict(rel=True, use_cache=False),
    "cache_grad=False": dict(rel=True, cache_grad=False),
    "cache+rel, dq streamed": dict(rel=True, pallas=TINY_STREAMED),
}


# Every mode in float32; bfloat16 (same masks, rounded operands) for the
# cache and the window (each case is a kernel compile in interpret mode).
CASES = [(mode, "float32") for mode in MODES] + [
    ("cache+rel", "bfloat16"),
    ("window (agg_cache=False)+rel", "bfloat16"),
]


@pytest.mark.parametrize("mode, dtype", CASES)
def test_kernels_mask_documents_like_the_xla_form(getkey, mode, dtype):
    arrays, codebook, cot = _inputs(getkey, jnp.dtype(dtype))
    docs = _doc_starts()
    pallas = MODES[mode].get("pallas", TINY)
    opts = tuple(sorted((k, v) for k, v in MODES[mode].items() if k != "pallas"))
    got = _run("pallas", opts + (("pallas", pallas),), arrays, codebook, docs, cot)
    f32 = tuple(x.astype(jnp.float32) for x in arrays)
    with jax.default_matmul_precision("highest"):
        want = _run("xla", opts, f32, codebook, docs, cot.astype(jnp.float32))
    plain = _run("xla", opts, f32, codebook, None, cot.astype(jnp.float32))
    assert rel_err(plain[0], want[0]) > 1e-2  # the documents are visible
    fwd_tol, grad_tol = (1e-5, 1e-5) if dtype == "float32" else (1e-2, 1.5e-2)
    assert rel_err(want[0], got[0]) < fwd_tol
    names = ("dq", "dk", "dv", "drel_query", "drel_table")
    for name, g, w in zip(names, got[2], want[2], strict=False):
        assert rel_err(w, g) < grad_tol, name
    # The state: the last document's window (cut short in both rows) and cache.
    assert [int(x) for x in got[1].length] == [3, 6]
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64),
            rtol=fwd_tol, atol=fwd_tol,
        )  # fmt: skip


def test_kernels_equal_the_quadratic_definition_with_documents(getkey):
    (q, k, v, _, _), codebook, _ = _inputs(getkey, jnp.float32)
    docs = _doc_starts()
    want = vq_attention(
        q, k, v, codebook, block_len=L, doc_starts=docs, implementation="quadratic"
    )
    for pallas in (TINY, PallasConfig(backward="xla")):
        got = vq_attention(
            q, k, v, codebook, block_len=L, doc_starts=docs,
            implementation="pallas", pallas=pallas,
        )  # fmt: skip
        assert rel_err(want, got) < 1e-5


@pytest.mark.parametrize("backward", ["pallas", "xla"])
def test_streaming_through_a_window_cut_by_a_document(getkey, backward):
    """The first call ends with a document start in its last block (row 0 at
    29, row 1 at 26): the carried window is partly filled and the cache
    empty; the kernels mask the missing slots. Streamed equals one call,
    outputs and gradients."""
    (q, k, v, _, _), codebook, cot = _inputs(getkey, jnp.float32)
    t2 = 2 * T
    tile = lambda x: jnp.concatenate([x, x[:, ::-1]], axis=1)
    q, k, v, cot = map(tile, (q, k, v, cot))
    docs = _doc_starts({0: (0, 5, 16, 29, 40), 1: (11, 12, 26, 33)}, t2)
    pallas = TINY if backward == "pallas" else PallasConfig(backward="xla")
    kw = dict(block_len=L, implementation="pallas", pallas=pallas)

    def streamed(q, k, v):
        first, state = vq_attention_with_state(
            q[:, :T], k[:, :T], v[:, :T], codebook, None, doc_starts=docs[:, :T], **kw
        )
        second, _ = vq_attention_with_state(
            q[:, T:], k[:, T:], v[:, T:], codebook, state, doc_starts=docs[:, T:], **kw
        )
        return jnp.concatenate([first, second], axis=1), state

    def whole(q, k, v):
        return vq_attention_with_state(
            q, k, v, codebook, None, block_len=L, doc_starts=docs, implementation="xla"
        )[0]

    (got, state), vjp = jax.vjp(streamed, q, k, v)
    assert [int(x) for x in state.length] == [3, 6]
    want, vjp_want = jax.vjp(whole, q, k, v)
    assert rel_err(want, got) < 1e-5
    for g, w in zip(
        vjp((cot, jax.tree.map(jnp.zeros_like, state))), vjp_want(cot), strict=True
    ):
        assert rel_err(w, g) < 1e-5


def test_a_cut_window_with_a_cache_is_refused(getkey):
    """States made by the ops never hold both; a hand-made one would be read
    differently by the kernels (they mask the cache of a cut window)."""
    (q, k, v, _, _), codebook, _ = _inputs(getkey, jnp.float32)
    state = VQAttentionState.empty(
        B, mem_len=L, heads=H, codes=S, d_k=K, d_v=V, dtype=v.dtype, key_dtype=k.dtype
    )
    state = VQAttentionState(
        state.window_code, state.window_key, state.window_value,
        jnp.array([4, 8], jnp.int32), state.cache_count + 1.0, state.cache_mean,
    )  # fmt: skip
    with pytest.raises(Exception, match="needs an empty cache when the state's"):
        vq_attention_with_state(
            q, k, v, codebook, state, block_len=L, doc_starts=_doc_starts(),
            implementation="pallas",
        )  # fmt: skip
    # Without doc_starts the cut window itself is named, with the remedy.
    with pytest.raises(Exception, match="needs doc_starts="):
        vq_attention_with_state(
            q, k, v, codebook, state, block_len=L, implementation="pallas"
        )

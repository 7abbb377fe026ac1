"""Linear in time, not only in FLOPs: no O(T^2) op hides in forward or backward.

A cumulative reduction lowers to a `reduce_window` whose window is the whole
axis; the transpose of the cache's prefix sum (a reverse cumsum) did so on
GPU over the float32 `[B, N, H, S, V]` cotangent, O(N^2 * S * V). These tests
lower forward + backward for cuda and tpu from CPU (abstract devices, nothing
runs) at the official shape at T = 32k and fail on any `reduce_window` wider
than a few elements; the positive controls put the old cumsum/cummax back and
show the check catches them. A second check: XLA's cost analysis of forward +
backward grows at most 4.3x from T to 4T (as lowered and as compiled on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from tvq_eqx.ops import _blockwise
from tvq_eqx.ops._pallas import vq_attention_pallas
from tvq_eqx.ops._xla import vq_attention_xla

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

DEVICES = {
    "cuda": AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda"),
    "tpu": AbstractDevice("TPU v5p", 1, "tpu"),
}
# The official configuration: d_k 128, d_v 1536, 512 codes, block 512.
OFFICIAL = dict(b=1, h=1, k=128, v=1536, s=512, blk=512)
MODES = {
    "plain": {},
    "decay": dict(cache_decay=0.9),
    "documents": dict(documents=True),
}
# Widest reduce_window allowed on the hot path: a constant, far below the 64
# blocks of T = 32k at block 512 (and the 32k tokens a running max spans).
MAX_WINDOW = 8


def _args(t, dtype, *, b, h, k, v, s, blk, documents=False, rel=True, sharding=None):
    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    return (
        sds((b, t, h, k), dtype),
        sds((b, t, h, k), dtype),
        sds((b, t, h, v), dtype),
        sds((h, s, k), jnp.float32),
        sds((b, t, h, k), dtype) if rel else None,
        sds((blk + 1, h, k), dtype) if rel else None,
        sds((b, t), jnp.bool_) if documents else None,
    )


def _grad_fn(form, *, blk, k, cache_decay=1.0, platform=None):
    from pallas_kernels.vq_attention import BlockSizes, PallasConfig

    def loss(q, key, val, codebook, rq, rt, doc_starts):
        kw = dict(
            block_len=blk, scale=k**-0.5, rel_query=rq, rel_table=rt,
            cache_decay=cache_decay, doc_starts=doc_starts,
        )  # fmt: skip
        if form.startswith("pallas"):
            config = PallasConfig(
                block_sizes=BlockSizes.for_platform(platform or "cpu"),
                cache_prefix="kernel" if form == "pallas-prefix" else "xla",
            )
            out, state = vq_attention_pallas(q, key, val, codebook, pallas=config, **kw)
        else:
            out, state = vq_attention_xla(q, key, val, codebook, **kw)
        # The new state's cache too: its gradient is the reverse prefix.
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state.cache_mean)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))


def _lower(fn, args, platform):
    mesh = AbstractMesh((), (), abstract_device=DEVICES[platform])
    with use_abstract_mesh(mesh):
        return fn.trace(*args).lower(lowering_platforms=(platform,))


def reduce_windows(lowered) -> list[tuple[int, ...]]:
    """The window dimensions of every `stablehlo.reduce_window` in a lowered
    program (every function of the module, so called helpers too)."""
    from jaxlib.mlir import ir

    module = lowered.compiler_ir("stablehlo")
    found = []
    with module.context:

        def visit(op):
            op = op.operation if hasattr(op, "operation") else op
            if op.name == "stablehlo.reduce_window":
                dims = ir.DenseI64ArrayAttr(op.attributes["window_dimensions"])
                found.append(tuple(dims))
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        visit(child)

        visit(module.operation)
    return found


def _widest(lowered) -> int:
    return max((max(w) for w in reduce_windows(lowered)), default=0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("form", ["xla", "pallas", "pallas-prefix"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_no_long_reduce_window_at_32k(platform, form, mode):
    """Forward + backward of both forms, lowered for cuda and tpu at the
    official shape at T = 32k (64 blocks), bf16: no reduce_window spans more
    than MAX_WINDOW elements of any axis."""
    opts = dict(MODES[mode])
    documents = opts.pop("documents", False)
    args = _args(32768, jnp.bfloat16, documents=documents, **OFFICIAL)
    fn = _grad_fn(form, blk=OFFICIAL["blk"], k=OFFICIAL["k"], platform=platform, **opts)
    windows = reduce_windows(_lower(fn, args, platform))
    assert all(max(w) <= MAX_WINDOW for w in windows), windows


def _old_prefix_sum(x):
    return jnp.cumsum(x, axis=1)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_check_catches_the_old_cumsum(platform, monkeypatch):
    """Positive control: with the old `jnp.cumsum` prefix the check sees a
    window of all 64 blocks (on cuda: the transpose's reverse cumsum)."""
    monkeypatch.setattr(_blockwise, "prefix_sum", _old_prefix_sum)
    args = _args(32768, jnp.bfloat16, **OFFICIAL)
    fn = _grad_fn("xla", blk=OFFICIAL["blk"], k=OFFICIAL["k"])
    assert _widest(_lower(fn, args, platform)) == 64


def test_check_catches_the_old_cummax(monkeypatch):
    """Positive control for documents: `lax.cummax` over the tokens is a
    reduce_window as long as the sequence."""
    monkeypatch.setattr(_blockwise, "running_max", lambda x: jax.lax.cummax(x, axis=1))
    args = _args(32768, jnp.bfloat16, documents=True, **OFFICIAL)
    fn = _grad_fn("xla", blk=OFFICIAL["blk"], k=OFFICIAL["k"])
    assert _widest(_lower(fn, args, "cuda")) == 32768


def test_context_parallel_lowers_without_long_windows():
    """Context parallelism (a 4-way sequence mesh, documents and decay: the
    chunk's map over its blocks and the composition over devices), lowered
    for cuda: no long reduce_window either."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tvq_eqx.ops import vq_attention_sharded

    mesh = AbstractMesh((4,), ("seq",), abstract_device=DEVICES["cuda"])
    dims = dict(OFFICIAL, v=256, s=256)
    q, key, val, codebook, _, _, docs = _args(
        32768, jnp.bfloat16, documents=True, rel=False, **dims
    )
    seq = NamedSharding(mesh, P(None, "seq"))
    q, key, val = (
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=seq) for a in (q, key, val)
    )
    docs = jax.ShapeDtypeStruct(docs.shape, docs.dtype, sharding=seq)
    codebook = jax.ShapeDtypeStruct(
        codebook.shape, codebook.dtype, sharding=NamedSharding(mesh, P())
    )

    def loss(q, key, val, codebook, docs):
        out, state = vq_attention_sharded(
            q, key, val, codebook, None, seq_axis="seq", block_len=dims["blk"],
            cache_decay=0.9, implementation="xla", doc_starts=docs,
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(state.cache_mean)

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with use_abstract_mesh(mesh):
        lowered = fn.trace(q, key, val, codebook, docs).lower(
            lowering_platforms=("cuda",)
        )
    windows = reduce_windows(lowered)
    assert all(max(w) <= MAX_WINDOW for w in windows), windows


# Many blocks (block 16) and a wide cache (codes x d_v) relative to the
# window: where an O(N^2 * S * V) prefix would dominate the cost.
SMALL = dict(b=1, h=1, k=16, v=64, s=64, blk=16)


def _cost_growth(mode, *, compiled: bool, t=1024) -> dict[str, float]:
    opts = dict(MODES[mode])
    documents = opts.pop("documents", False)
    fn = _grad_fn("xla", blk=SMALL["blk"], k=SMALL["k"], **opts)
    costs = []
    for length in (t, 4 * t):
        lowered = fn.trace(
            *_args(length, jnp.float32, documents=documents, **SMALL)
        ).lower()
        cost = (
            lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
        )
        costs.append(cost[0] if isinstance(cost, list) else cost)
    return {
        name: costs[1][name] / costs[0][name] for name in ("flops", "bytes accessed")
    }


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("compiled", [False, True], ids=["lowered", "compiled"])
def test_cost_grows_linearly(mode, compiled):
    """XLA's cost analysis of forward + backward (the xla form; the pallas
    path shares its prologue) grows at most 4.3x from T = 1k to 4k tokens
    (64 to 256 blocks)."""
    growth = _cost_growth(mode, compiled=compiled)
    assert all(g <= 4.3 for g in growth.values()), growth


def test_cost_check_catches_the_old_cumsum(monkeypatch):
    """Positive control: the old cumsum's reduce_window makes the lowered
    program's FLOPs grow about 8x from T to 4T at these sizes."""
    monkeypatch.setattr(_blockwise, "prefix_sum", _old_prefix_sum)
    assert _cost_growth("plain", compiled=False)["flops"] > 6.0


def test_prefix_sum_matches_cumsum_forward_and_backward():
    """The linear prefix is exactly a cumsum over blocks, and its gradient
    exactly a reverse cumsum, in float32 and bfloat16 inputs."""
    from tvq_eqx.ops._prefix import linear_recurrence, prefix_sum, running_max

    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (2, 9, 3, 4))
    w = jax.random.normal(keys[1], x.shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        xd, wd = x.astype(dtype), w.astype(dtype)
        got, got_grad = jax.value_and_grad(lambda a, w: jnp.sum(prefix_sum(a) * w))(
            xd, wd
        )
        ref, ref_grad = jax.value_and_grad(lambda a, w: jnp.sum(jnp.cumsum(a, 1) * w))(
            xd, wd
        )
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        assert jnp.allclose(got, ref, rtol=tol, atol=tol)
        assert jnp.allclose(
            got_grad.astype(jnp.float32),
            ref_grad.astype(jnp.float32),
            rtol=tol,
            atol=tol,
        )
    # The recurrence, against a Python loop; with a = 1 it is the prefix sum.
    a = jax.random.uniform(keys[2], (2, 9))
    y0 = jnp.ones((2, 3, 4))
    ys = linear_recurrence(a, x, y0)
    y = y0
    for n in range(9):
        y = a[:, n, None, None] * y + x[:, n]
        assert jnp.allclose(ys[:, n], y, rtol=1e-6, atol=1e-6)
    ones = linear_recurrence(jnp.ones_like(a), x, jnp.zeros_like(y0))
    assert jnp.allclose(ones, jnp.cumsum(x, 1), rtol=1e-6, atol=1e-6)
    ints = jax.random.randint(keys[2], (3, 37), -5, 100)
    assert (running_max(ints) == jax.lax.cummax(ints, axis=1)).all()

"""Context parallelism (`tvq_eqx.ops.vq_attention_sharded`): a sequence
sharded over 4 (in process) and 8 (in a subprocess) fake CPU devices gives the
unsharded op's output, carried state and gradients, and the compiled program
moves only the per-device summaries and one boundary block between devices."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from tvq_eqx.ops import vq_attention_sharded, vq_attention_with_state

B, H, K, V, S, L = 2, 2, 8, 8, 4, 8


def _inputs(getkey, t):
    q, k = (jax.random.normal(getkey(), (B, t, H, K)) for _ in range(2))
    v = jax.random.normal(getkey(), (B, t, H, V))
    codebook = jax.random.normal(getkey(), (H, S, K))
    return q, k, v, codebook


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _mesh(n):
    if len(jax.devices()) < n:
        pytest.fail(f"needs {n} devices; conftest sets jax_num_cpu_devices")
    return Mesh(np.array(jax.devices()[:n]), ("seq",))


def _doc_starts(n):
    """Packed documents over n chunks of two blocks: starts early in a chunk
    (its window whole, its cache restarted), in a chunk's last block (the
    next device's window cut short), at a chunk boundary, and chunks with
    none (the cache carried through them)."""
    starts = np.zeros((B, 16 * n), bool)
    for row, cols in ((0, (3, 27, 16 * n - 14)), (1, (16, 16 * n - 20))):
        starts[row, list(cols)] = True
    return jnp.asarray(starts)


def _check_equivalence(getkey, n, implementation, decay, docs=False):
    """Forward, carried state and gradients (through the output and the
    returned state) of the sharded call against the unsharded one."""
    q, k, v, codebook = _inputs(getkey, (16 if docs else 8) * n)
    # A history before the sequence: a state with a whole window and a cache.
    q0, k0, v0, _ = _inputs(getkey, 16)
    _, state = vq_attention_with_state(q0, k0, v0, codebook, None, block_len=L)
    mesh = _mesh(n)
    kw = dict(block_len=L, cache_decay=decay)
    if docs:
        kw["doc_starts"] = _doc_starts(n)

    def unsharded(q, k, v):
        return vq_attention_with_state(q, k, v, codebook, state, **kw)

    def sharded(q, k, v):
        return vq_attention_sharded(
            q, k, v, codebook, state, mesh=mesh, seq_axis="seq",
            implementation=implementation, **kw,
        )  # fmt: skip

    want, want_state = jax.jit(unsharded)(q, k, v)
    if docs:  # the documents change the result
        plain = dict(kw, doc_starts=None)
        assert (
            _rel(vq_attention_with_state(q, k, v, codebook, state, **plain)[0], want)
            > 1e-2
        )
    got, got_state = jax.jit(sharded)(q, k, v)
    assert _rel(got, want) < 1e-5
    for a, b in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < 1e-5

    w = jax.random.normal(getkey(), want.shape)

    def loss(fn):
        def objective(q, k, v):
            out, st = fn(q, k, v)
            return jnp.sum(out * w) + jnp.sum(jnp.sin(st.cache_mean))

        return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))

    for a, b in zip(loss(sharded)(q, k, v), loss(unsharded)(q, k, v), strict=True):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize(
    "implementation,decay", [("xla", 1.0), ("xla", 0.7), ("pallas", 1.0)]
)
def test_four_devices_equal_one(getkey, implementation, decay):
    _check_equivalence(getkey, 4, implementation, decay)


@pytest.mark.parametrize(
    "implementation,decay", [("xla", 1.0), ("xla", 0.7), ("pallas", 1.0)]
)
def test_four_devices_equal_one_with_documents(getkey, implementation, decay):
    _check_equivalence(getkey, 4, implementation, decay, docs=True)


def test_eight_devices_equal_one():
    """Eight devices (the test process has four): in a subprocess."""
    code = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        import itertools
        import test_context_parallel as t
        keys = (jax.random.key(i) for i in itertools.count())
        t._check_equivalence(lambda: next(keys), 8, "xla", 1.0)
        t._check_equivalence(lambda: next(keys), 8, "xla", 0.8)
        t._check_equivalence(lambda: next(keys), 8, "xla", 1.0, docs=True)
        print("eight devices ok")
        """
    )
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "eight devices ok" in done.stdout


_COLLECTIVE = re.compile(
    r"= \(?([a-z0-9]+\[[0-9,]*\][^=]*?)\)? (all-gather|collective-permute|"
    r"all-reduce|reduce-scatter|all-to-all)(?:-start)?\("
)


def _collective_sizes(hlo: str) -> list[tuple[str, int]]:
    """(op, largest result element count) of every collective in `hlo`."""
    found = []
    for shapes, op in _COLLECTIVE.findall(hlo):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in re.findall(r"\[([0-9,]*)\]", shapes)
        ]
        found.append((op, max(sizes)))
    return found


def test_compiled_program_moves_only_summaries_and_one_boundary_block(getkey):
    n, t = 4, 256  # chunks of 64 tokens, far longer than the window (8)
    q, k, v, codebook = _inputs(getkey, t)
    mesh = _mesh(n)

    def objective(q, k, v):
        out, state = vq_attention_sharded(
            q, k, v, codebook, None, mesh=mesh, seq_axis="seq", block_len=L
        )
        return jnp.sum(jnp.sin(out)) + jnp.sum(state.cache_mean)

    hlo = (
        jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
        .lower(q, k, v)
        .compile()
        .as_text()
    )
    found = _collective_sizes(hlo)
    ops = {op for op, _ in found}
    # Positive control: the summaries are gathered, the boundary block sent.
    assert "all-gather" in ops and "collective-permute" in ops, found
    summaries = n * B * H * S * V  # every device's per-code value sums
    boundary = B * L * H * max(K, V)  # one block of keys or values
    chunk = B * (t // n) * H * min(K, V)  # the smallest per-device activation
    assert max(summaries, boundary) < chunk
    too_big = [(op, size) for op, size in found if size > max(summaries, boundary)]
    assert not too_big, f"collectives larger than the summaries: {too_big}"


def test_bad_sharding_is_named(getkey):
    mesh = _mesh(4)
    q, k, v, codebook = _inputs(getkey, 48)
    with pytest.raises(ValueError, match="split into 4 equal chunks"):
        vq_attention_sharded(
            q[:, :46], k[:, :46], v[:, :46], codebook, None, mesh=mesh,
            seq_axis="seq", block_len=L,
        )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of block_len=8 and at least"):
        vq_attention_sharded(
            q, k, v, codebook, None, mesh=mesh, seq_axis="seq", block_len=L,
            mem_len=16,
        )  # fmt: skip
    with pytest.raises(ValueError, match="'data' is not an axis"):
        vq_attention_sharded(
            q, k, v, codebook, None, mesh=mesh, seq_axis="data", block_len=L
        )

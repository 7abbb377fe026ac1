"""The options of an attention call are resolved once, at the public
boundary, into one frozen `AttentionOptions`; below it nothing re-checks,
and context parallelism quantizes its keys once."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tvq_eqx.ops import _blockwise, _context_parallel, _dispatch
from tvq_eqx.ops._dispatch import AttentionOptions


def _inputs(b=1, t=16, h=2, k=4, v=4, s=8):
    keys = jax.random.split(jax.random.key(0), 4)
    return (
        jax.random.normal(keys[0], (b, t, h, k)),
        jax.random.normal(keys[1], (b, t, h, k)),
        jax.random.normal(keys[2], (b, t, h, v)),
        jax.random.normal(keys[3], (h, s, k)),
    )


def _counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("entry", ["vq_attention", "vq_attention_with_state"])
def test_each_check_runs_once_per_call(entry, monkeypatch):
    """`vq_attention` used to validate, then call `vq_attention_with_state`,
    which validated again (and checked the PallasConfig a second time)."""
    validations = _counting(monkeypatch, _dispatch, "validate_inputs")
    pallas_checks = _counting(monkeypatch, _dispatch, "_check_pallas")
    q, k, v, c = _inputs()
    if entry == "vq_attention":
        _dispatch.vq_attention(q, k, v, c, block_len=8, implementation="xla")
    else:
        _dispatch.vq_attention_with_state(
            q, k, v, c, None, block_len=8, implementation="xla"
        )
    assert validations == ["validate_inputs"]
    assert pallas_checks == ["_check_pallas"]


def test_options_are_frozen_hashable_and_defaulted():
    opts = AttentionOptions.resolve(implementation="xla", pallas=None, block_len=8)
    assert opts.mem_len == 8 and opts.sliding_window is False
    assert opts.cache_decay == 1.0 and hash(opts) == hash(
        AttentionOptions.resolve(implementation="xla", pallas=None, block_len=8)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.block_len = 4  # type: ignore[misc]
    window = AttentionOptions.resolve(
        implementation="xla", pallas=None, block_len=8, use_cache=False
    )
    assert window.sliding_window is True  # the official agg_cache=False default
    with pytest.raises(ValueError, match="cache_decay must be in"):
        AttentionOptions.resolve(
            implementation="xla", pallas=None, block_len=8, cache_decay=1.5
        )
    with pytest.raises(ValueError, match="block_len must be"):
        AttentionOptions.resolve(implementation="xla", pallas=None, block_len=0)


def test_context_parallel_quantizes_once(monkeypatch):
    """The chunk's codes feed both the boundary block and the attention."""
    quantized = _counting(monkeypatch, _context_parallel, "quantize")
    quantized_core = _counting(monkeypatch, _blockwise, "quantize")
    q, k, v, c = _inputs(t=32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    jax.jit(
        lambda *a: _context_parallel.vq_attention_sharded(
            *a, None, mesh=mesh, seq_axis="seq", block_len=8, implementation="xla"
        )
    ).trace(q, k, v, c)  # tracing runs the Python once
    assert len(quantized) + len(quantized_core) == 1, (quantized, quantized_core)


def test_import_leaves_the_kernels_for_first_use():
    """`import tvq_eqx` does not load the Pallas kernels or the Mosaic TPU
    lowering (they are optional and built on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, tvq_eqx; "
        "loaded = [m for m in ('pallas_kernels.vq_attention.ops', "
        "'jax.experimental.pallas.tpu') if m in sys.modules]; "
        "print(loaded)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout

"""Ahead-of-time compile gate (benchmarks/aot_compile.py).

- Default suite (cheap, no `triton` package needed): lower forward + backward
  for cuda from CPU and parse + verify every Triton custom call's module with
  jaxlib's MLIR bindings, as XLA does before compiling (catches invalid IR such
  as loop bounds of mixed types, which jax's lowering alone lets through).
- Slow (needs the `aot` extra: the `triton` wheel with ptxas): the whole gate,
  compiled for sm_90a at the official shape and the benchmarks' GPU preset
  shapes in bfloat16 and float32, plus sm_80 at the official shape (the rule
  tunes per architecture); every kernel must compile, without spills and with
  shared memory within the limit.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import pytest

from benchmarks import aot_compile as aot

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

KERNELS = {
    "vq_attention_fwd",
    "vq_attention_bwd_dq",
    "vq_attention_bwd_dk",
    "vq_attention_bwd_dv",
    "vq_attention_bwd_dmean",
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape_name", ["official", "decode-gpu"])
def test_every_triton_module_verifies(shape_name, dtype):
    lowered = aot.lower(aot.SHAPES[shape_name], jnp.dtype(dtype))
    calls = aot.triton_calls(lowered)
    assert {c.name for c in calls} == KERNELS
    for call in calls:
        text = aot.verify_module(call)  # raises with the verifier's message
        assert "tt.func" in text and call.num_warps in (4, 8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_prefix_module_verifies(dtype):
    """With PallasConfig(cache_prefix="kernel") the program has a sixth
    kernel, the cache prefix; its module verifies (with documents too: the
    per-block factors)."""
    for documents in (False, True):
        lowered = aot.lower(
            aot.SHAPES["official"],
            jnp.dtype(dtype),
            cache_prefix="kernel",
            documents=documents,
        )
        calls = aot.triton_calls(lowered)
        assert {c.name for c in calls} == KERNELS | {"vq_attention_cache_prefix"}
        for call in calls:
            aot.verify_module(call)


@pytest.mark.parametrize("window_len", [None, 200])
def test_window_only_modules_verify(window_len):
    lowered = aot.lower(
        aot.SHAPES["official"],
        jnp.bfloat16,
        use_cache=False,
        cache_grad=False,
        window_len=window_len,
    )
    calls = aot.triton_calls(lowered)
    assert {c.name for c in calls} == KERNELS - {"vq_attention_bwd_dmean"}
    for call in calls:
        aot.verify_module(call)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_document_masking_modules_verify(dtype):
    """doc_starts adds a per-query document start to the forward and dq
    kernels; every module still verifies."""
    lowered = aot.lower(aot.SHAPES["official"], jnp.dtype(dtype), documents=True)
    calls = aot.triton_calls(lowered)
    assert {c.name for c in calls} == KERNELS
    for call in calls:
        aot.verify_module(call)


def test_verifier_reports_invalid_module():
    """The check can fail: a module whose scf.for mixes i1 and i32 bounds (the
    bug the dk/dv kernels had) is rejected with the verifier's message."""
    from jax._src.interpreters.mlir import upstream_dialects
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, scf

    ctx = ir.Context()
    ctx.append_dialect_registry(upstream_dialects)
    ctx.load_all_available_dialects()
    with ctx, ir.Location.unknown():
        module = ir.Module.create()
        with ir.InsertionPoint(module.body):
            i1, i32 = ir.IntegerType.get_signless(1), ir.IntegerType.get_signless(32)
            lo = arith.ConstantOp(i32, 0)
            hi = arith.ConstantOp(i1, 1)
            step = arith.ConstantOp(i32, 1)
            loop = scf.ForOp(lo, hi, step)
            with ir.InsertionPoint(loop.body):
                scf.YieldOp([])
        import io

        buf = io.BytesIO()
        module.operation.write_bytecode(buf)
    bad = aot.TritonCall("broken", buf.getvalue(), 4, 2, (1, 1, 1))
    with pytest.raises(ValueError, match="same type"):
        aot.verify_module(bad)


def test_occupancy():
    # 255 registers x 128 threads: one CTA's worth of registers is 32K of 64K.
    assert aot.occupancy(90, 255, 0, 4) == 2
    assert aot.occupancy(90, 64, 32 * 1024, 4) == 6  # shared memory bound
    assert aot.occupancy(90, 32, 300 * 1024, 4) == 0  # does not fit at all


GATE_SHAPES = ("official", "scaling-gpu", "decode-gpu", "quality-gpu")


@pytest.fixture(scope="module")
def gate_rows():
    if importlib.util.find_spec("triton") is None:
        pytest.fail("the AOT gate needs the `aot` extra: pip install -e '.[aot]'")
    return aot.run_gate(
        GATE_SHAPES,
        aot.DTYPES,
        lambda shape: (90, 80) if shape == "official" else (90,),
        timeout=900,
        log=lambda s: None,
    )


@pytest.mark.slow
def test_gate_every_kernel_compiles_and_fits(gate_rows):
    table = "\n".join(aot.format_row(s, d, r) for s, d, r in gate_rows)
    # official: 2 dtypes x 2 archs x 6 kernels; presets: 3 x 2 dtypes x 6
    # (the five attention kernels and the cache prefix)
    assert len(gate_rows) == 24 + 36, table
    for _, _, rep in gate_rows:
        limit = aot.ARCH_LIMITS[rep.arch]["smem_per_block"]
        assert rep.status == "ok", table
        assert rep.shared <= limit, table
        assert rep.ctas_per_sm >= 1, table
        assert rep.spills == 0, table


@pytest.mark.slow
@pytest.mark.parametrize("dtype", aot.DTYPES)
def test_gate_sliding_window_variant(dtype):
    """Window-only, cache_grad=False and window_len (the masks in the forward
    and bwd_dq) at the official shape: compiles for sm_90a, no spills, fits."""
    if importlib.util.find_spec("triton") is None:
        pytest.fail("the AOT gate needs the `aot` extra: pip install -e '.[aot]'")
    lowered = aot.lower(
        aot.SHAPES["official"],
        jnp.dtype(dtype),
        use_cache=False,
        cache_grad=False,
        window_len=200,
    )
    for call in aot.triton_calls(lowered):
        rep = aot.compile_call(call, 90, timeout=900)
        row = aot.format_row("official-window", dtype, rep)
        assert rep.status == "ok" and rep.spills == 0, row
        assert rep.shared <= aot.ARCH_LIMITS[90]["smem_per_block"], row

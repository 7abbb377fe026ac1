"""TPU: tiles chosen for the platform being compiled for, every mode lowering
for TPU, and (slow) libtpu's real compiler on the official and a multi-head
shape (benchmarks/aot_tpu.py, the TPU compile gate).

- Default suite: lowering only (Pallas -> Mosaic MLIR, no libtpu), every mode
  of the gate; the tile rule per TPU generation; `jax.export` for TPU from
  this CPU host with the op's default tiles; a platform the local machine
  cannot build for fails only when compiled for.
- Slow: the gate's cases compiled by libtpu in a subprocess (libtpu must be
  found before jax starts, and this process's jax started long ago).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from benchmarks import aot_compile as aot
from benchmarks import aot_tpu
from pallas_kernels.vq_attention import BlockSizes
from pallas_kernels.vq_attention.config import (
    TPU_CHIPS,
    dq_vmem_bytes,
    resolve_tiles,
    tpu_chip_of_kind,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
OFFICIAL = aot.SHAPES["official"]  # (B, T, H, d_k, d_v, codes, block)


def _tiles(chip, dtype, shape=OFFICIAL, **fixed):
    _, _, _, k, v, s, blk = shape
    sizes = BlockSizes.for_platform("tpu", tpu=chip, **fixed)
    return resolve_tiles(
        sizes, block_len=blk, codes=s, d_k=k, d_v=v, float32=dtype == "float32"
    )


@pytest.mark.parametrize("mode", sorted(aot_tpu.MODES))
def test_every_mode_lowers_for_tpu(mode):
    """Each gate mode lowers for a v5e from this CPU host with the op's own
    tile choice, and has the kernels the mode needs."""
    options = dict(aot_tpu.MODES[mode])
    if options.get("window_len") == "L/4":
        options["window_len"] = 128
    text = aot.lower(
        (1, 1024, 1, 128, 1536, 512, 512), jnp.bfloat16, platform="tpu", **options
    ).as_text()
    expect = set(aot_tpu._KERNELS)
    if not options.get("use_cache", True):
        expect.discard("vq_attention_bwd_dmean")
    if options.get("cache_grad") is False:
        expect.discard("vq_attention_bwd_dmean")
    present = {name for name in aot_tpu._KERNELS if name in text}
    assert present == expect
    assert "tpu_custom_call" in text


def test_chip_table_and_device_kinds():
    assert tpu_chip_of_kind("TPU v4") == "v4"
    assert tpu_chip_of_kind("TPU v5 lite") == "v5e"
    assert tpu_chip_of_kind("TPU v5") == "v5p"
    assert tpu_chip_of_kind("TPU v6 lite") == "v6e"
    assert tpu_chip_of_kind("NVIDIA H100 80GB HBM3") is None
    with pytest.raises(ValueError, match="BlockSizes.tpu must be one of"):
        BlockSizes(platform="tpu", tpu="v9")


@pytest.mark.parametrize("chip", ["v4", "v5e", "v5p", "v6e"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tpu_rule_fits_each_generation(chip, dtype):
    """The rule's bwd_dq working set stays within the chip's VMEM limit, the
    limit within the chip, and the matmul tiles are the MXU's width."""
    t = _tiles(chip, dtype)
    vmem = TPU_CHIPS[chip].vmem_bytes
    assert t.vmem_limit_bytes is not None and t.vmem_limit_bytes < vmem
    dims = dict(
        block_len=t.block_len, codes=t.codes, d_k=t.d_k, d_v=t.d_v,
        itemsize=4 if dtype == "float32" else 2,
    )  # fmt: skip
    assert dq_vmem_bytes(t.dq, stream=t.dq_stream_v, **dims) <= t.vmem_limit_bytes
    assert t.fwd.block_q == t.fwd.block_k == TPU_CHIPS[chip].mxu
    assert t.d_v % t.dq.block_v == 0


def test_small_vmem_streams_dq_values():
    """v4 (16 MiB VMEM) in float32 at the official shape: whole value rows in
    bwd_dq would need more than the chip has (the compile failure the gate
    found), so the rule streams value columns; v5e keeps whole rows, and an
    explicit choice wins."""
    v4, v5e = _tiles("v4", "float32"), _tiles("v5e", "float32")
    assert v4.dq_stream_v and not v5e.dq_stream_v
    dims = dict(block_len=512, codes=512, d_k=128, d_v=1536, itemsize=4)
    whole = dq_vmem_bytes(v4.dq, stream=False, **dims)
    assert whole > TPU_CHIPS["v4"].vmem_bytes  # why it streams
    assert _tiles("v5e", "float32", dq_stream_v=True).dq_stream_v
    assert not _tiles("v4", "float32", dq_stream_v=False).dq_stream_v


def _vq_loss(q, k, v, codebook):
    import tvq_eqx

    out = tvq_eqx.vq_attention(
        q, k, v, codebook, block_len=512, implementation="pallas"
    )
    return jnp.sum(out.astype(jnp.float32))


def test_export_for_tpu_from_cpu_uses_tpu_tiles():
    """`tvq_eqx.vq_attention(..., implementation="pallas")` at the official
    shape, exported for TPU from this CPU host with the default config: the
    tiles are the TPU rule's (the interpret rule's 64-code tiles broke
    Mosaic's block rule in bwd_dmean before the tiles followed the target)."""
    b, t, h, k, v, s, _ = OFFICIAL
    args = (
        jax.ShapeDtypeStruct((b, t, h, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, h, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, h, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((h, s, k), jnp.float32),
    )
    mesh = AbstractMesh((), (), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
    with use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(jax.grad(_vq_loss, argnums=(0, 1, 2))), platforms=["tpu"]
        )(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    for name in aot_tpu._KERNELS:
        assert name in text


def test_a_platform_the_shape_cannot_use_fails_only_when_compiled_for():
    """block_len 8 is below Triton's 16-row dots: the op still runs here
    (interpret mode), and lowering it for a GPU names the reason."""
    q = jnp.ones((1, 16, 1, 8), jnp.float32)
    v = jnp.ones((1, 16, 1, 4), jnp.float32)
    cb = jnp.ones((1, 4, 8), jnp.float32)
    import tvq_eqx

    def f(q, v, cb):
        return tvq_eqx.vq_attention(q, q, v, cb, block_len=8, implementation="pallas")

    assert jnp.all(jnp.isfinite(jax.jit(f)(q, v, cb)))
    mesh = AbstractMesh(
        (), (), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda")
    )
    with (
        use_abstract_mesh(mesh),
        pytest.raises(ValueError, match="for gpu: block_len=8"),
    ):
        jax.jit(f).trace(q, v, cb).lower(lowering_platforms=("cuda",))


# ------------------------------------------------- slow: libtpu's compiler
def _libtpu_wheel_exists() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def _gate(*argv) -> list[dict]:
    if not _libtpu_wheel_exists():
        pytest.skip("libtpu has wheels for Linux x86_64 only")
    if not os.path.isdir(os.path.join(ROOT, ".venv", "libtpu", "libtpu")):
        pytest.fail("libtpu is missing from .venv/libtpu: run scripts/setup.sh")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "aot_tpu.py"), "--json",
         "--presets", "", *argv],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    cases = [r for r in rows if "status" in r]
    assert cases, proc.stdout[-2000:] + proc.stderr[-4000:]
    return cases


@pytest.mark.slow
def test_libtpu_compiles_official_and_multihead():
    """libtpu compiles forward + backward: the official shape in bfloat16 on
    v5e (relative bias, cache) and float32 on v4 (16 MiB VMEM: bwd_dq streams
    its values; before, 25.8 MiB of 16), and a multi-head shape in float32."""
    rows = _gate(
        "--shapes", "official", "--modes", "cache+bias", "--generations", "v5e",
        "--dtypes", "bfloat16", "--jobs", "1",
    )  # fmt: skip
    rows += _gate(
        "--shapes", "official,multihead", "--modes", "cache+bias",
        "--generations", "v4", "--dtypes", "float32", "--jobs", "2",
    )  # fmt: skip
    assert len(rows) == 3
    for r in rows:
        assert r["status"] == "ok", r
        assert len(r["kernels"]) == 5, r
    v4_official = next(
        r for r in rows if r["shape"] == "official" and r["generation"] == "v4"
    )
    assert v4_official["dq_tiles"].endswith("streamed")


def test_streamed_dq_is_refused_for_triton_at_compile_time():
    """Streaming bwd_dq's values needs a sequential grid (TPU, interpret);
    asked of a GPU it fails when lowered for cuda, saying why."""
    sizes = BlockSizes.for_platform("gpu", arch=90, dq_stream_v=True)
    with pytest.raises(ValueError, match="sequential grid axis"):
        aot.lower((1, 256, 1, 64, 128, 64, 64), jnp.bfloat16, block_sizes=sizes)

"""Cross-lowering of the Pallas kernels, forward and backward, for GPU (Triton)
and TPU (Mosaic) from a CPU-only machine: checks Pallas -> Triton IR / Mosaic
MLIR (tiling rules, supported ops), not the final PTX / TPU compile. Lowering
only, nothing executes, so the official shape is cheap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels.vq_attention import BlockSizes
from tvq_eqx.ops._pallas import vq_attention_pallas

# The Triton path is deprecated upstream but is what runs on GPU (shared Pallas
# notes); the pyproject filter matches the deprecation id, not this message.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

KERNELS = (
    "vq_attention_fwd",
    "vq_attention_bwd_dq",
    "vq_attention_bwd_dk",
    "vq_attention_bwd_dv",
    "vq_attention_bwd_dmean",
)
TARGETS = {
    "cuda": ("gpu", AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda")),
    "tpu": ("tpu", AbstractDevice("TPU v5p", 1, "tpu")),
}
# (B, T, H, K, V, S, L): the official configuration (d_k 128, block 512, 512
# codes, one head with d_v 1536), a multi-head one, and small test-like shapes.
SHAPES = {
    "official": (1, 1024, 1, 128, 1536, 512, 512),
    "multihead": (2, 512, 4, 64, 128, 256, 256),
    "small": (2, 32, 2, 8, 12, 5, 16),  # padded to 16 on GPU (Triton dots >= 16)
}


def lower(platform, shape, dtype, *, rel, use_cache=True):
    b, t, h, k, v, s, blk = shape
    kind, device = TARGETS[platform]
    sds = jax.ShapeDtypeStruct
    args = (
        sds((b, t, h, k), dtype),
        sds((b, t, h, k), dtype),
        sds((b, t, h, v), dtype),
        sds((h, s, k), jnp.float32),
        sds((b, t, h, k), dtype),
        sds((blk + 1, h, k), dtype),
    )

    def loss(q, key, val, codebook, rq, rt):
        extra = dict(rel_query=rq, rel_table=rt) if rel else {}
        out, state = vq_attention_pallas(
            q,
            key,
            val,
            codebook,
            block_len=blk,
            scale=k**-0.5,
            use_cache=use_cache,
            block_sizes=BlockSizes.for_platform(kind),
            **extra,
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
            state.cache_mean.astype(jnp.float32)
        )

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 4, 5)))
    mesh = AbstractMesh((), (), abstract_device=device)
    with use_abstract_mesh(mesh):
        return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", sorted(TARGETS))
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_forward_and_backward_lower(platform, shape_name, dtype):
    rel = shape_name != "multihead"
    text = lower(platform, SHAPES[shape_name], dtype, rel=rel)
    for name in KERNELS:
        assert name in text, f"{name} missing from the {platform} lowering"
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    assert marker in text


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_window_only_lowers(platform):
    text = lower(platform, SHAPES["official"], jnp.bfloat16, rel=True, use_cache=False)
    assert "vq_attention_bwd_dq" in text and "vq_attention_bwd_dmean" not in text


def test_gpu_preset_rejects_tiny_blocks():
    with pytest.raises(ValueError, match="below the smallest tile"):
        lower("cuda", (1, 16, 1, 8, 8, 4, 8), jnp.bfloat16, rel=False)

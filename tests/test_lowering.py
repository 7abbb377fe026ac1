"""Cross-lowering of the Pallas kernels, forward and backward, for GPU (Triton)
and TPU (Mosaic) from a CPU-only machine: checks Pallas -> Triton IR / Mosaic
MLIR (tiling rules, supported ops), not the final PTX / TPU compile. Lowering
only, nothing executes, so the official shape is cheap."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from benchmarks import aot_compile as aot

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
TARGETS = ("cuda", "tpu")
# (B, T, H, K, V, S, L): the official configuration (d_k 128, block 512, 512
# codes, one head with d_v 1536), a multi-head one, and small test-like shapes.
SHAPES = {
    "official": (1, 1024, 1, 128, 1536, 512, 512),
    "multihead": (2, 512, 4, 64, 128, 256, 256),
    "small": (2, 32, 2, 8, 12, 5, 16),  # padded to 16 on GPU (Triton dots >= 16)
}


def lower(platform, shape, dtype, **options) -> str:
    """The program text of forward + backward lowered for `platform` with the
    platform's tile rule (the compile gate's lowering)."""
    return aot.lower(shape, dtype, platform=platform, **options).as_text()


@pytest.mark.parametrize("platform", TARGETS)
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_forward_and_backward_lower(platform, shape_name, dtype):
    rel = shape_name != "multihead"
    text = lower(platform, SHAPES[shape_name], dtype, rel=rel)
    for name in KERNELS:
        assert name in text, f"{name} missing from the {platform} lowering"
    marker = "tpu_custom_call" if platform == "tpu" else "triton"
    assert marker in text


@pytest.mark.parametrize("platform", TARGETS)
def test_window_only_lowers(platform):
    text = lower(platform, SHAPES["official"], jnp.bfloat16, rel=True, use_cache=False)
    assert "vq_attention_bwd_dq" in text and "vq_attention_bwd_dmean" not in text


def test_gpu_preset_rejects_tiny_blocks():
    with pytest.raises(ValueError, match="below the smallest tile"):
        lower("cuda", (1, 16, 1, 8, 8, 4, 8), jnp.bfloat16, rel=False)

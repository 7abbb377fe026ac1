"""Fused VQ-attention kernels (forward and backward); see README.md.

The configuration classes are imported at once (they are plain dataclasses);
the kernels and the Pallas/Mosaic lowering they pull in load on first use
of `vq_attention_core`, so `import tvq_eqx` stays light.
"""

from .config import BlockSizes as BlockSizes
from .config import PallasConfig as PallasConfig


def __getattr__(name: str):
    if name == "vq_attention_core":
        from .ops import vq_attention_core

        return vq_attention_core
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

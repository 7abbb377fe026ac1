"""Fused VQ-attention kernels (forward and backward); see README.md."""

from .config import BlockSizes as BlockSizes
from .config import PallasConfig as PallasConfig
from .ops import vq_attention_core as vq_attention_core

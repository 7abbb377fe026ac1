"""tvq-eqx: Transformer-VQ in JAX + Equinox."""

from .ops import VQAttentionState as VQAttentionState
from .ops import vq_attention as vq_attention
from .ops import vq_attention_with_state as vq_attention_with_state

__version__ = "0.1.0"

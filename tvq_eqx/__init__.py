"""tvq-eqx: Transformer-VQ (linear-time exact softmax attention over
vector-quantized keys) in JAX + Equinox."""

from ._config import TransformerConfig as TransformerConfig
from .loss import loss_fn as loss_fn
from .nn import Transformer as Transformer
from .nn import TransformerState as TransformerState
from .ops import VQAttentionState as VQAttentionState
from .ops import vq_attention as vq_attention
from .ops import vq_attention_with_state as vq_attention_with_state

__version__ = "0.1.0"

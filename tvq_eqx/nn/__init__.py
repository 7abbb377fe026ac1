"""Equinox modules of Transformer-VQ."""

from ._attention import VQAttention as VQAttention
from ._embedding import Embedding as Embedding
from ._embedding import OutputHead as OutputHead
from ._embedding import sinusoids as sinusoids
from ._norm import RMSNorm as RMSNorm
from ._norm import layer_norm as layer_norm
from ._norm import rms_norm as rms_norm
from ._positional import ScaledSinusoids as ScaledSinusoids
from ._positional import XLRelativeBias as XLRelativeBias
from ._quantizer import VectorQuantizer as VectorQuantizer
from ._transformer import LayerStack as LayerStack
from ._transformer import Transformer as Transformer
from ._transformer import TransformerLayer as TransformerLayer
from ._transformer import TransformerState as TransformerState
from ._transformer import layer_drop as layer_drop
from ._transformer import stack_layers as stack_layers

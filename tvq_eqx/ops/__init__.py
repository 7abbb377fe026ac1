"""Functional VQ attention: the dispatcher, the quadratic definition and the
linear-time XLA form (the reference every kernel is tested against)."""

from pallas_kernels.vq_attention.config import BlockSizes as BlockSizes
from pallas_kernels.vq_attention.config import PallasConfig as PallasConfig

from ._common import MASK_VALUE as MASK_VALUE
from ._common import VQAttentionState as VQAttentionState
from ._common import quantize as quantize
from ._common import relative_bias as relative_bias
from ._context_parallel import (
    vq_attention_context_parallel as vq_attention_context_parallel,
)
from ._context_parallel import vq_attention_sharded as vq_attention_sharded
from ._dispatch import default_implementation as default_implementation
from ._dispatch import vq_attention as vq_attention
from ._dispatch import vq_attention_with_state as vq_attention_with_state
from ._full import FullAttentionState as FullAttentionState
from ._full import full_attention_with_state as full_attention_with_state
from ._quadratic import vq_attention_quadratic as vq_attention_quadratic
from ._xla import vq_attention_xla as vq_attention_xla


def __getattr__(name: str):
    # The kernel form is public but loaded on first use: it imports the
    # Pallas kernels (optional, and heavy to import).
    if name == "vq_attention_pallas":
        from ._pallas import vq_attention_pallas

        return vq_attention_pallas
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

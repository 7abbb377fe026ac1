"""Functional VQ attention: the dispatcher, the quadratic definition and the
linear-time XLA form (the reference every kernel is tested against), and the
form on the Pallas kernels with its XLA stages before and after them.

The kernel form (`vq_attention_pallas`, `pallas_kernel_inputs`,
`pallas_kernel_outputs`, `pallas_cache_means_xla`) is loaded on first use:
importing it imports the kernels (`pallas_kernels.vq_attention.ops` and the
Pallas lowering), which a program on the xla form never needs.
"""

from typing import TYPE_CHECKING

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
from ._online import OnlineVQState as OnlineVQState
from ._online import assign_slots as assign_slots
from ._online import (
    online_vq_attention_quadratic as online_vq_attention_quadratic,
)
from ._online import (
    online_vq_attention_with_state as online_vq_attention_with_state,
)
from ._quadratic import vq_attention_quadratic as vq_attention_quadratic
from ._xla import vq_attention_xla as vq_attention_xla

if TYPE_CHECKING:  # for type checkers and the API docs; loaded by __getattr__
    from ._pallas import pallas_cache_means_xla as pallas_cache_means_xla
    from ._pallas import pallas_kernel_inputs as pallas_kernel_inputs
    from ._pallas import pallas_kernel_outputs as pallas_kernel_outputs
    from ._pallas import vq_attention_pallas as vq_attention_pallas

_KERNEL_FORM = (
    "vq_attention_pallas",
    "pallas_kernel_inputs",
    "pallas_kernel_outputs",
    "pallas_cache_means_xla",
)


def __getattr__(name: str):
    if name in _KERNEL_FORM:
        from . import _pallas

        return getattr(_pallas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

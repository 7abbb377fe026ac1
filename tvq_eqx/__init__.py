"""tvq-eqx: Transformer-VQ (linear-time exact softmax attention over
vector-quantized keys) in JAX + Equinox."""

from . import data as data
from . import train as train
from ._config import TransformerConfig as TransformerConfig
from .loss import loss_fn as loss_fn
from .nn import Transformer as Transformer
from .nn import TransformerState as TransformerState
from .ops import FullAttentionState as FullAttentionState
from .ops import PallasConfig as PallasConfig
from .ops import VQAttentionState as VQAttentionState
from .ops import vq_attention as vq_attention
from .ops import vq_attention_with_state as vq_attention_with_state
from .sampling import decode_step as decode_step
from .sampling import sample as sample
from .train import TrainState as TrainState
from .train import evaluate as evaluate
from .train import fit as fit
from .train import init_train_state as init_train_state
from .train import load_checkpoint as load_checkpoint
from .train import load_model as load_model
from .train import load_official as load_official
from .train import make_optimizer as make_optimizer
from .train import make_train_step as make_train_step
from .train import save_checkpoint as save_checkpoint
from .train import save_model as save_model
from .train import train_step as train_step


def _version() -> str:
    # The installed distribution's metadata is the one source of the version;
    # a source tree on PYTHONPATH that was never installed has none.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tvq-eqx")
    except PackageNotFoundError:
        return "0.0.0+unknown"


__version__: str = _version()

"""Training, evaluation and checkpoints for Transformer-VQ: what a user's own
loop needs (the steps, the optimizer helpers, checkpoints, `fit` and its
callbacks, the mesh, model FLOPs and device peaks for MFU). Two public modules hold the rest: `callbacks` (the JSONL
log, progress bar, curves) and `runs` (the command line's run-folder policy:
locks, resume rules, folder names)."""

from . import callbacks as callbacks
from . import runs as runs
from ._checkpoint import AsyncCheckpointer as AsyncCheckpointer
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import CheckpointWarning as CheckpointWarning
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import list_checkpoints as list_checkpoints
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import read_meta as read_meta
from ._checkpoint import save_checkpoint as save_checkpoint
from ._data import DataError as DataError
from ._data import RunData as RunData
from ._data import load_run_data as load_run_data
from ._data import make_stream as make_stream
from ._distributed import init_distributed as init_distributed
from ._distributed import mesh_for_run as mesh_for_run
from ._fit import Callback as Callback
from ._fit import FitResult as FitResult
from ._fit import FitStatus as FitStatus
from ._fit import StopTraining as StopTraining
from ._fit import evaluate_stream as evaluate_stream
from ._fit import fit as fit
from ._flops import PEAK_FLOPS as PEAK_FLOPS
from ._flops import device_peak_flops as device_peak_flops
from ._flops import measure_matmul_flops as measure_matmul_flops
from ._flops import model_flops as model_flops
from ._flops import model_flops_terms as model_flops_terms
from ._flops import table_peak_flops as table_peak_flops
from ._optimizer import OPTIMIZERS as OPTIMIZERS
from ._optimizer import CodebookRoutingError as CodebookRoutingError
from ._optimizer import OptimizerConfig as OptimizerConfig
from ._optimizer import OptimizerName as OptimizerName
from ._optimizer import guard_no_codebook as guard_no_codebook
from ._optimizer import lr_schedule as lr_schedule
from ._optimizer import make_optimizer as make_optimizer
from ._optimizer import optimizer_from_config as optimizer_from_config
from ._optimizer import param_labels as param_labels
from ._optimizer import per_layer as per_layer
from ._optimizer import split_codebook as split_codebook
from ._optimizer import weight_decay_mask as weight_decay_mask
from ._optimizer import with_ema_codebook as with_ema_codebook
from ._presets import OFFICIAL_LAUNCH as OFFICIAL_LAUNCH
from ._presets import PRESETS as PRESETS
from ._presets import from_official as from_official
from ._run_config import DATA_KINDS as DATA_KINDS
from ._run_config import DataConfig as DataConfig
from ._run_config import DataKind as DataKind
from ._run_config import RunConfig as RunConfig
from ._steps import TrainState as TrainState
from ._steps import eval_step as eval_step
from ._steps import evaluate as evaluate
from ._steps import init_train_state as init_train_state
from ._steps import make_eval_step as make_eval_step
from ._steps import make_mesh as make_mesh
from ._steps import make_train_step as make_train_step
from ._steps import shard_batch as shard_batch
from ._steps import shard_train_state as shard_train_state
from ._steps import train_step as train_step
from ._throughput import measure_throughput as measure_throughput
from .runs import for_mesh as for_mesh
from .runs import load_run as load_run
from .runs import new_train_state as new_train_state

"""wn_transform: weight normalization (Salimans & Kingma, 2016) for any PyTorch model.

    model = apply_weight_norm(model, sample_batch)   # w = g * v/||v||, data-dependent init
    ...train...
    plain = fold_weight_norm(model)                  # plain weights, same function
"""

from .apply import apply_weight_norm, plan_weight_norm, weight_norm_report
from .checkpoint import CheckpointError
from .errors import BatchError, FoldError, NoTargetsError, SelectionError, WeightNormError
from .export import ExportError, ExportMismatchError, ExportReport, ExportWarning, export_onnx
from .fold import FoundWeightNorm, find_weight_norms, fold_weight_norm
from .kernels import KernelStatus, kernel_status
from .mean_only_bn import MeanOnlyBatchNorm, update_bn
from .norm import UnitLayout, compose_weight, unit_norm
from .parametrization import WeightNorm, no_weight_cache
from .report import WeightNormReport
from .state_dict import StateDictWeightNorm, convert_state_dict, find_state_dict_weight_norms, fold_state_dict
from .targets import Skipped, Target

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "CheckpointError",
    "ExportError",
    "ExportMismatchError",
    "ExportReport",
    "ExportWarning",
    "FoldError",
    "FoundWeightNorm",
    "KernelStatus",
    "MeanOnlyBatchNorm",
    "NoTargetsError",
    "SelectionError",
    "Skipped",
    "StateDictWeightNorm",
    "Target",
    "UnitLayout",
    "WeightNorm",
    "WeightNormError",
    "WeightNormReport",
    "__version__",
    "apply_weight_norm",
    "compose_weight",
    "convert_state_dict",
    "export_onnx",
    "find_state_dict_weight_norms",
    "find_weight_norms",
    "fold_state_dict",
    "fold_weight_norm",
    "kernel_status",
    "no_weight_cache",
    "plan_weight_norm",
    "unit_norm",
    "update_bn",
    "weight_norm_report",
]

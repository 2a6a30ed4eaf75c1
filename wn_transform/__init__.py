"""wn_transform: weight normalization (Salimans & Kingma, 2016) for any PyTorch model.

    model = apply_weight_norm(model, sample_batch)   # w = g * v/||v||, data-dependent init
    ...train...
    plain = fold_weight_norm(model)                  # plain weights, same function
"""

from .apply import apply_weight_norm, plan_weight_norm, weight_norm_report
from .errors import BatchError, FoldError, NoTargetsError, SelectionError, WeightNormError
from .fold import FoundWeightNorm, find_weight_norms, fold_weight_norm
from .norm import UnitLayout, compose_weight, unit_norm
from .parametrization import WeightNorm
from .report import WeightNormReport
from .targets import Skipped, Target

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "FoldError",
    "FoundWeightNorm",
    "NoTargetsError",
    "SelectionError",
    "Skipped",
    "Target",
    "UnitLayout",
    "WeightNorm",
    "WeightNormError",
    "WeightNormReport",
    "__version__",
    "apply_weight_norm",
    "compose_weight",
    "find_weight_norms",
    "fold_weight_norm",
    "plan_weight_norm",
    "unit_norm",
    "weight_norm_report",
]

"""The one training loop (multi-stage, keep-best, resumable, DDP) and the one selection rule.

The names below are imported on first use (PEP 562): `training.selection` is torch-free and the
decision rules (methods/decision.py) use it on the ONNX predict path, which must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils import lazy_exports

if TYPE_CHECKING:  # `x as x`: explicit re-exports, for type checkers and linters
    from .selection import Selection as Selection
    from .selection import select_best as select_best
    from .trainer import Stage as Stage
    from .trainer import StageResult as StageResult
    from .trainer import Trainer as Trainer
    from .trainer import TrainResult as TrainResult
    from .trainer import shard_rows as shard_rows
    from .trainer import stage_from_dict as stage_from_dict
    from .trainer import to_device as to_device
    from .trainer import unwrap as unwrap

# public name -> the submodule that defines it
_EXPORTS = {
    "Selection": ".selection",
    "select_best": ".selection",
    "Stage": ".trainer",
    "StageResult": ".trainer",
    "TrainResult": ".trainer",
    "Trainer": ".trainer",
    "shard_rows": ".trainer",
    "stage_from_dict": ".trainer",
    "to_device": ".trainer",
    "unwrap": ".trainer",
}
__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

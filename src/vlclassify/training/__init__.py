"""The one training loop (multi-stage, keep-best, resumable, DDP) and the one selection rule."""

from .selection import Selection, select_best
from .trainer import Stage, StageResult, Trainer, TrainResult, shard_rows, stage_from_dict, to_device, unwrap

__all__ = [
    "Selection",
    "Stage",
    "StageResult",
    "TrainResult",
    "Trainer",
    "select_best",
    "shard_rows",
    "stage_from_dict",
    "to_device",
    "unwrap",
]

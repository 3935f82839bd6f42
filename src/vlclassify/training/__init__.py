"""Multi-stage training with best-checkpoint selection, atomic checkpoints, resume and DDP."""

from .trainer import Stage, StageResult, Trainer, TrainResult, lr_factor, stage_from_dict, to_device, unwrap

__all__ = ["Stage", "StageResult", "Trainer", "TrainResult", "lr_factor", "stage_from_dict", "to_device", "unwrap"]

"""Learning-rate schedules shared by the few-shot trainers."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, base_lr: float, min_lr: float = 0.0, warmup: int = 0) -> float:
    """Linear warm-up from ~0 to `base_lr` over `warmup` steps, then cosine down to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

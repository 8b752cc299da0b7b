"""CoOp's learning-rate schedule, which is not one of ``transformers``' scheduler names.

Dassl's ``ConstantWarmupScheduler`` wrapping ``CosineAnnealingLR(T_max=max_epoch)``: the first ``warmup_epochs``
epochs run at the constant ``warmup_lr``; epoch ``e >= warmup_epochs`` runs at
``lr * 0.5 * (1 + cos(pi * (e - warmup_epochs) / num_epochs))``. The rate changes only between epochs.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

COOP_EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp's training length per shot count


def coop_lr_factor(
    step: int, steps_per_epoch: int, num_epochs: int, warmup_epochs: int, warmup_factor: float
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``."""
    epoch = step // steps_per_epoch
    if epoch < warmup_epochs:
        return warmup_factor
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / num_epochs))


def coop_scheduler(
    optimizer: Optimizer, steps_per_epoch: int, num_epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5
) -> LambdaLR:
    """A per-step ``LambdaLR`` that reproduces CoOp's per-epoch schedule (all param groups share one base lr)."""
    if steps_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f"steps_per_epoch and num_epochs must be >= 1, got {steps_per_epoch} and {num_epochs}.")
    base_lr = optimizer.param_groups[0]["lr"]
    warmup_factor = warmup_lr / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        return coop_lr_factor(step, steps_per_epoch, num_epochs, warmup_epochs, warmup_factor)

    return LambdaLR(optimizer, factor)

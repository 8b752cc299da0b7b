import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from cmp_hf.schedulers import coop_scheduler


def dassl_reference(base_lr, num_epochs, warmup_epochs, warmup_lr):
    """Per-epoch rates of Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=num_epochs)), stepped per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    cosine = CosineAnnealingLR(torch.optim.SGD([param], lr=base_lr), T_max=num_epochs)
    rates = []
    for epoch in range(num_epochs):
        if epoch < warmup_epochs:
            rates.append(warmup_lr)
        else:
            rates.append(cosine.get_last_lr()[0])
            cosine.optimizer.step()
            cosine.step()
    return rates


@pytest.mark.parametrize(
    ("steps_per_epoch", "num_epochs", "warmup_epochs"), [(3, 4, 1), (1, 10, 1), (5, 6, 2), (2, 3, 0)]
)
def test_matches_dassl_schedule(steps_per_epoch, num_epochs, warmup_epochs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-3)
    scheduler = coop_scheduler(optimizer, steps_per_epoch, num_epochs, warmup_epochs, warmup_lr=1e-5)
    rates = []
    for _ in range(steps_per_epoch * num_epochs):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [r for r in dassl_reference(2e-3, num_epochs, warmup_epochs, 1e-5) for _ in range(steps_per_epoch)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[-1] > 0  # cosine over num_epochs never reaches zero inside the run (Dassl's T_max)


def test_rejects_empty_epochs():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="steps_per_epoch and num_epochs must be >= 1"):
        coop_scheduler(optimizer, 0, 3)
    assert math.isclose(coop_scheduler(optimizer, 1, 1, warmup_epochs=0).get_last_lr()[0], 1.0)

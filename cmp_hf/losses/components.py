"""Running means of the named loss terms a trainer logs (``ce``, ``cmp``, each active baseline, ...).

Kept on every process as tensors and reduced over processes only when a log line is written, so that logging costs
one collective per log, not one per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LossComponents:
    """Sample-weighted running sums of named loss terms, reduced over processes only when reported.

    The names are the same on every process (they follow the config), so the reduction lines up.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None

    def add(self, terms: dict[str, torch.Tensor], n: int) -> None:
        self.names = list(terms)
        values = torch.stack([value.detach().float() * n for value in terms.values()])
        values = torch.cat([values, values.new_tensor([n])])
        self.sums = values if self.sums is None else self.sums + values

    def reset(self) -> None:
        self.sums = None

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor], prefix: str = "") -> dict[str, float]:
        """Means since the last pop, over all processes; every process must call it (it is a collective)."""
        if self.sums is None:
            return {}
        total = reduce(self.sums).tolist()
        self.sums = None
        return {f"{prefix}{name}": value / total[-1] for name, value in zip(self.names, total[:-1], strict=True)}

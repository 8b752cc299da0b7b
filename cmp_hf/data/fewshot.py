"""Few-shot sampling: k examples per class, drawn with a seed, the same on every machine and process."""

from __future__ import annotations

import numpy as np
from datasets import Dataset


def sample_few_shot(dataset: Dataset, shots: int, label_column: str = "label", seed: int = 0) -> Dataset:
    """Keep ``shots`` rows of every class, chosen without replacement by ``numpy.random.default_rng(seed)``.

    The choice depends only on the labels, their order and the seed. Raises when a class has fewer rows.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}.")
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < shots:
            raise ValueError(f"Class {label} has {len(rows)} rows, fewer than shots={shots}: lower shots.")
        chosen.append(rng.choice(rows, size=shots, replace=False))
    return dataset.select(np.sort(np.concatenate(chosen)).tolist())

"""The few-shot protocol: k training and min(k, 4) validation examples per class, drawn with a seed, the same on
every machine and process, saved with a run so it can be reused; and CoCoOp's base-to-novel class split."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from datasets import ClassLabel, Dataset

from ..atomic import write_json
from ..constants import FEWSHOT_SPLIT_NAME


@dataclass
class FewShotSplit:
    """Row indices of the few-shot training and validation sets inside a pool (a dataset split)."""

    shots: int
    seed: int
    pool_fingerprint: str
    train: list[int]
    val: list[int]

    def save(self, directory: str) -> None:
        write_json(os.path.join(directory, FEWSHOT_SPLIT_NAME), asdict(self))

    @classmethod
    def load(cls, directory: str) -> FewShotSplit | None:
        path = os.path.join(directory, FEWSHOT_SPLIT_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


def few_shot_split(labels: np.ndarray, shots: int, seed: int, val_shots: int | None = None) -> tuple[list, list]:
    """Per class, ``shots`` training rows and then ``val_shots`` (default min(shots, 4), as CoOp) validation rows
    from the rest, without replacement, from ``numpy.random.default_rng(seed)``. Raises if a class is too small."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}.")
    val_shots = min(shots, 4) if val_shots is None else val_shots
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < shots + val_shots:
            raise ValueError(
                f"Class {label} has {len(rows)} rows, fewer than shots + validation shots = {shots} + {val_shots}: "
                "lower shots."
            )
        chosen = rng.permutation(rows)[: shots + val_shots]
        train.extend(chosen[:shots].tolist())
        val.extend(chosen[shots:].tolist())
    return sorted(train), sorted(val)


def sample_few_shot(dataset: Dataset, shots: int, label_column: str = "label", seed: int = 0) -> Dataset:
    """Keep ``shots`` rows of every class (the training half of :func:`few_shot_split` with no validation rows)."""
    train, _ = few_shot_split(np.asarray(dataset[label_column]), shots, seed, val_shots=0)
    return dataset.select(train)


def few_shot_sets(
    pool: Dataset, shots: int, seed: int, label_column: str = "label", run_dir: str | None = None
) -> tuple[Dataset, Dataset]:
    """Few-shot training and validation sets of ``pool``; with ``run_dir``, reuse the split saved there (if it was
    drawn from the same pool with the same shots and seed) or save the new one."""
    saved = FewShotSplit.load(run_dir) if run_dir else None
    if saved is not None and (saved.shots, saved.seed, saved.pool_fingerprint) == (shots, seed, pool._fingerprint):
        split = saved
    else:
        train, val = few_shot_split(np.asarray(pool[label_column]), shots, seed)
        split = FewShotSplit(shots, seed, pool._fingerprint, train, val)
        if run_dir:
            split.save(run_dir)
    return pool.select(split.train), pool.select(split.val)


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's split: the first ceil(C/2) classes are base, the rest novel."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def subset_classes(dataset: Dataset, classes: list[int], label_column: str = "label") -> Dataset:
    """Rows of ``classes`` only, relabelled 0..len(classes)-1 with a ClassLabel of their names."""
    names = dataset.features[label_column].names
    position = {c: i for i, c in enumerate(classes)}
    labels = np.asarray(dataset.with_format("numpy")[label_column])
    keep = np.flatnonzero(np.isin(labels, classes))
    subset = dataset.select(keep).remove_columns(label_column)
    return subset.add_column(
        label_column, [position[int(y)] for y in labels[keep]], feature=ClassLabel(names=[names[c] for c in classes])
    )

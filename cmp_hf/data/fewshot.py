"""The few-shot protocol: k training and min(k, 4) validation examples per class, drawn with a seed, the same on
every machine and process, saved with a run so it can be reused; and CoCoOp's base-to-novel class split.

Two samplers (``FEWSHOT_SAMPLINGS``): "numpy", cmp_hf's own (per class, a ``numpy`` permutation of the pool's rows;
the validation rows are the next ones of the same permutation), and "coop", CoOp's exactly: Dassl's
``DatasetBase.generate_fewshot_dataset`` with Python's ``random`` seeded by the run's seed (``set_random_seed`` is the
first thing CoOp's ``train.py`` does, and building the dataset is the first draw), ``random.sample`` of k rows per
label with labels in order of first appearance in the split (Dassl groups them in a dict), a class smaller than k
kept whole, then min(k, 4) from CoOp's own validation split with the same generator. Given CoOp's splits in CoOp's
order (``cmp_hf.data.coop_layout``), the same seed and shots give the same images as CoOp.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from datasets import ClassLabel, Dataset

from ..atomic import write_json
from ..constants import FEWSHOT_SPLIT_NAME

FEWSHOT_SAMPLINGS = ("numpy", "coop")


@dataclass
class FewShotSplit:
    """Row indices of the few-shot training and validation sets inside a pool (a dataset split); with
    ``val_pool_fingerprint``, the validation rows index that other split (CoOp's validation split)."""

    shots: int
    seed: int
    pool_fingerprint: str
    train: list[int]
    val: list[int]
    sampling: str = "numpy"
    val_pool_fingerprint: str | None = None

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


def dassl_few_shot(labels: Sequence[int], shots: int, rng: random.Random) -> list[int]:
    """Rows Dassl's ``generate_fewshot_dataset`` keeps from a split with these labels, in its order: per label (in
    order of first appearance) ``rng.sample`` of that label's rows (in split order), all of them if fewer."""
    by_label: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(row)
    chosen = []
    for rows in by_label.values():
        chosen.extend(rng.sample(rows, shots) if len(rows) >= shots else rows)
    return chosen


def coop_few_shot_split(
    labels: Sequence[int], shots: int, seed: int, val_labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """CoOp's draw: ``shots`` rows per class of the training split, then min(shots, 4) of ``val_labels`` (CoOp's
    validation split), one ``random.Random(seed)`` for both. Without a validation split (a Hub copy, ImageNet, whose
    CoOp validation set is its test set) the validation rows are drawn the same way from the training rows left."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}.")
    rng = random.Random(seed)
    train = dassl_few_shot(labels, shots, rng)
    if val_labels is not None:
        return train, dassl_few_shot(val_labels, min(shots, 4), rng)
    rest = sorted(set(range(len(labels))) - set(train))
    return train, [rest[i] for i in dassl_few_shot([labels[row] for row in rest], min(shots, 4), rng)]


def sample_few_shot(dataset: Dataset, shots: int, label_column: str = "label", seed: int = 0) -> Dataset:
    """Keep ``shots`` rows of every class (the training half of :func:`few_shot_split` with no validation rows)."""
    train, _ = few_shot_split(np.asarray(dataset[label_column]), shots, seed, val_shots=0)
    return dataset.select(train)


def examples_per_class(dataset: Dataset | None, label_column: str = "label") -> str:
    """How many shots a training set holds: "16" for a balanced k-shot set, "3-9" otherwise, "-" when unknown (a
    stream, or no rows)."""
    if dataset is None or len(dataset) == 0:
        return "-"
    counts = np.bincount(np.asarray(dataset.with_format("numpy")[label_column]))
    return f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"


def few_shot_sets(
    pool: Dataset,
    shots: int,
    seed: int,
    label_column: str = "label",
    run_dir: str | None = None,
    sampling: str = "numpy",
    val_pool: Dataset | None = None,
) -> tuple[Dataset, Dataset]:
    """Few-shot training and validation sets of ``pool`` (``sampling`` "coop": the validation set from ``val_pool``
    where given, CoOp's validation split); with ``run_dir``, reuse the split saved there (if it was drawn from the
    same pools with the same shots, seed and sampler) or save the new one."""
    if sampling not in FEWSHOT_SAMPLINGS:
        raise ValueError(f"Unknown fewshot_sampling {sampling!r}: use one of {FEWSHOT_SAMPLINGS}.")
    val_pool = val_pool if sampling == "coop" else None
    val_fingerprint = None if val_pool is None else val_pool._fingerprint
    wanted = (shots, seed, pool._fingerprint, sampling, val_fingerprint)
    saved = FewShotSplit.load(run_dir) if run_dir else None
    if saved is not None and (saved.shots, saved.seed, saved.pool_fingerprint, saved.sampling,
                              saved.val_pool_fingerprint) == wanted:  # fmt: skip
        split = saved
    else:
        labels = np.asarray(pool[label_column])
        if sampling == "coop":
            val_labels = None if val_pool is None else np.asarray(val_pool[label_column]).tolist()
            train, val = coop_few_shot_split(labels.tolist(), shots, seed, val_labels)
        else:
            train, val = few_shot_split(labels, shots, seed)
        split = FewShotSplit(shots, seed, pool._fingerprint, train, val, sampling, val_fingerprint)
        if run_dir:
            split.save(run_dir)
    return pool.select(split.train), (pool if val_pool is None else val_pool).select(split.val)


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

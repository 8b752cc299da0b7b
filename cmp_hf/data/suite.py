"""The CoOp / CMP benchmark suite: where each dataset lives on the Hub and how to turn it into CoOp's task.

Repos, columns and splits come from the repos' dataset cards and viewers and from code that loads them (mteb,
fusion_bench, CLIP_benchmark); CoOp's names, label orders and templates from CoOp's ``datasets/*.py`` and
``trainers/zsclip.py``. Each entry records in ``verified`` / ``unverified`` which is which. Every entry maps the
repo's own class names to CoOp's names *by name* (or, where a shipped list pins them, checks them position by
position) and sorts them into CoOp's label order, so a repo whose label order differs (Food101 swaps two labels,
Caltech101 drops two classes and reorders, UCF101 sorts case-sensitively) still yields CoOp's labels. Where a
shipped list in ``resources/`` gives the names (SUN397, Flowers102, UCF101, CIFAR-100), a repo whose names drift
from it is refused on load instead of training on another label map.

Each entry can read a local copy instead of the Hub (``data_dir``: a ``save_to_disk`` DatasetDict with the repo's
split names and columns, plus ``classnames.txt`` where the repo has one), through the same code.

Splits: ``train`` is the pool the few-shot training and validation sets are drawn from, ``test`` the evaluation
set. Where the Hub test split is not CoOp's (Caltech101, Flowers102, Food101, DTD, EuroSAT: CoOp re-split all
images at random), numbers are not comparable with CoOp's tables; ``coop_test`` says so.

``coop_root`` reads CoOp's own data folder instead (``cmp_hf.data.coop_layout``; ``hub:<repo>`` a Hub repo holding
it): CoOp's train / val / test splits exactly, every test set CoOp's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk

from .coop_hub import resolve_coop_root
from .coop_layout import load_coop_folder, unique_names

IMAGENET_A_INDICES = (6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988)  # fmt: skip  # noqa: E501
IMAGENET_R_INDICES = (1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988)  # fmt: skip  # noqa: E501

EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}  # fmt: skip
CALTECH_RENAMES = {"airplanes": "airplane", "faces": "face", "leopards": "leopard", "motorbikes": "motorbike"}
CALTECH_FIRST = ("faces", "leopards", "motorbikes")  # capitalised folders, first in CoOp's case-sensitive sort
CIFAR100_TYPOS = {"cra": "crab"}  # an older uoft-cs/cifar100 revision dropped the 'b' of class 26


@cache
def resource_lines(filename: str) -> tuple[str, ...]:
    """The non-comment lines of a list shipped in ``cmp_hf/data/resources`` (each file names its source)."""
    text = resources.files("cmp_hf.data").joinpath("resources", filename).read_text("utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def imagenet_classnames() -> tuple[str, ...]:
    """CLIP's (= CoOp's) 1000 ImageNet names, shipped with the package (from open_clip, MIT)."""
    return resource_lines("imagenet_classnames.txt")


def sun397_classes() -> list[tuple[str, str]]:
    """(name in tanganke/sun397, CoOp name) per class, in ClassName.txt (= CoOp label) order.

    CoOp reverses the path parts of ClassName.txt ('/d/desert/sand' -> 'sand desert', '/b/bus_interior' ->
    'bus_interior'); the repo joins them in order with spaces ('desert sand', 'bus interior'), which loses the
    difference between '/' and '_', so only the shipped list can tell 'bus interior' from a qualifier."""
    parts = [path.split("/")[2:] for path in resource_lines("sun397_classnames.txt")]
    return [(" ".join(p).replace("_", " "), " ".join(reversed(p))) for p in parts]


def flowers102_classes() -> list[tuple[str, str]]:
    """(TFDS name, the repo's, CoOp's cat_to_name.json name) per class id - 1: they differ at 'pink-yellow dahlia?'."""
    return [(tfds, coop) for coop, tfds in (line.split("\t") for line in resource_lines("flowers102_classnames.tsv"))]


def ucf101_classes() -> list[tuple[str, str]]:
    """(CamelCase name, CoOp name) in classInd.txt (= CoOp label) order; flwrlabs/ucf101 puts HammerThrow first."""
    names = [line.split()[1] for line in resource_lines("ucf101_classInd.txt")]
    return [(name, ucf101_name(name)) for name in names]


def cifar100_classes() -> list[tuple[str, str]]:
    """(name, name) per fine label: CLIP's CIFAR-100 names, which the repo's must match position by position."""
    return [(name, name) for name in resource_lines("cifar100_classnames.txt")]


def cifar100_key(name: str) -> str:
    return CIFAR100_TYPOS.get(name, name).replace("_", " ")


def _keep(name: str) -> str:
    return name


def cars_name(name: str) -> str:
    """'AM General Hummer SUV 2000' -> '2000 AM General Hummer SUV' (CoOp puts the year first)."""
    parts = name.split()
    return " ".join([parts[-1], *parts[:-1]])


def ucf101_name(name: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply_Eye_Makeup' (CoOp's ``re.findall('[A-Z][^A-Z]*')`` rule)."""
    return "_".join(re.findall("[A-Z][^A-Z]*", name))


def caltech_name(name: str) -> str:
    return CALTECH_RENAMES.get(name, name).replace("_", " ")


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of the suite: its Hub repo, its schema, and the rules that give CoOp's classes."""

    key: str
    hub_id: str
    image_column: str
    label_column: str
    splits: dict[str, str | tuple[str, ...]]  # our split -> the repo's split (a tuple: concatenated)
    template: str  # CoOp's hand-crafted zero-shot template
    names_from: str = "features"  # "features" (ClassLabel), "classnames.txt" (repo root), "imagenet"
    rename: Callable[[str], str] = _keep  # repo name -> CoOp name
    # A shipped list: (name the repo must have, CoOp name) in CoOp's label order. Repo names are looked up in it
    # ("name") or compared with it label by label ("position"), after repo_key; any drift stops the load.
    reference: Callable[[], list[tuple[str, str]]] | None = None
    match: str = "name"
    repo_key: Callable[[str], str] = _keep
    drop: tuple[str, ...] = ()  # repo classes CoOp does not use
    order: str = "repo"  # CoOp label order: "repo", "sorted" (Python sort of repo names), "caltech"
    imagenet_indices: tuple[int, ...] | None = None  # 200-class ImageNet subsets (A, R)
    mid_frames: bool = False  # UCF101: keep the middle frame of each video clip
    coop_test: bool = True  # is the Hub test split CoOp's test set?
    fallback: str | None = None  # another repo with the same columns, tried when hub_id fails to load
    fallback_splits: dict[str, str | tuple[str, ...]] | None = None  # its split names, if they differ
    config_name: str | None = None
    verified: str = ""  # facts checked against public sources (quoted in drift errors)
    unverified: str = ""  # facts to confirm on the first real load

    def raw_class_names(self, dataset: Dataset, data_dir: str | None, revision: str | None) -> list[str]:
        if self.names_from == "imagenet":
            names = imagenet_classnames()
            return [names[i] for i in self.imagenet_indices] if self.imagenet_indices else list(names)
        if self.names_from == "classnames.txt":
            return _read_classnames(self.hub_id, data_dir, revision)
        feature = dataset.features[self.label_column]
        if not isinstance(feature, ClassLabel):
            raise ValueError(f"{self.key}: column {self.label_column!r} is not a ClassLabel ({feature!r}).")
        return list(feature.names)

    def coop_classes(self, raw_names: list[str], source: str, revision: str | None) -> tuple[list[str], np.ndarray]:
        """CoOp's class names in CoOp's order, and for each repo label its CoOp label (-1: dropped).

        ``source`` and ``revision`` name the repo (or local copy) in the error raised when its names drift."""
        if self.reference is not None:
            return self._map_to_reference(raw_names, source, revision)
        kept = [i for i, name in enumerate(raw_names) if name not in self.drop]
        if self.order == "sorted":
            kept.sort(key=lambda i: raw_names[i])
        elif self.order == "caltech":
            kept.sort(key=lambda i: (raw_names[i] not in CALTECH_FIRST, raw_names[i]))
        mapping = np.full(len(raw_names), -1, dtype=np.int64)
        mapping[kept] = np.arange(len(kept))
        return [self.rename(raw_names[i]) for i in kept], mapping

    def _map_to_reference(
        self, raw_names: list[str], source: str, revision: str | None
    ) -> tuple[list[str], np.ndarray]:
        reference = self.reference()
        wanted = [repo_name for repo_name, _ in reference]
        keys = [self.repo_key(name) for name in raw_names]
        problem = None
        if self.match == "position":
            first = next((i for i, (key, want) in enumerate(zip(keys, wanted, strict=False)) if key != want), None)
            if first is not None:
                problem = f"label {first} is {raw_names[first]!r}, the shipped list expects {wanted[first]!r}"
            elif len(keys) != len(wanted):
                problem = f"it has {len(keys)} classes, the shipped list {len(wanted)}"
            mapping = np.arange(len(keys), dtype=np.int64)
        else:
            index, present = {want: i for i, want in enumerate(wanted)}, set(keys)
            first = next((i for i, key in enumerate(keys) if key not in index), None)
            missing = next((i for i, want in enumerate(wanted) if want not in present), None)
            if first is not None:
                problem = f"label {first} is {raw_names[first]!r}, which is not in the shipped list"
            elif missing is not None:
                problem = f"it lacks {wanted[missing]!r} (CoOp label {missing})"
            elif len(keys) != len(wanted):
                problem = f"it has {len(keys)} classes for {len(wanted)} names (a name repeats)"
            mapping = np.array([index.get(key, -1) for key in keys], dtype=np.int64)
        if problem is not None:
            raise ValueError(
                f"{self.key}: the class names of {source} (revision {revision or 'default'}) drift "
                f"from the list this entry maps by: {problem}. Training on it would use another label map than "
                f"CoOp's. Load a revision whose names match (revision=...), or check the new names against CoOp's "
                f"and update cmp_hf/data/resources and this entry. Verified: {self.verified}. "
                f"Unverified: {self.unverified}."
            )
        return [coop for _, coop in reference], mapping


def _read_classnames(hub_id: str, data_dir: str | None, revision: str | None) -> list[str]:
    if data_dir is not None:
        path = os.path.join(data_dir, "classnames.txt")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(hub_id, "classnames.txt", repo_type="dataset", revision=revision)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


TRAIN_TEST = {"train": "train", "test": "test"}
_IMAGENET = dict(template="a photo of a {}.", names_from="imagenet")
_WDS = "columns and splits from the repo card and mteb/CLIP_benchmark code; CLIP's names (open_clip) = CoOp's"
_SHIFT_UNVERIFIED = "names are not in the repo (int labels), so drift cannot be detected on load"

SUITE: dict[str, SuiteDataset] = {
    spec.key: spec
    for spec in [
        SuiteDataset("imagenet", "clip-benchmark/wds_imagenet1k", "jpg", "cls", TRAIN_TEST, **_IMAGENET,
                     fallback="timm/imagenet-1k-wds", fallback_splits={"train": "train", "test": "validation"},
                     verified=_WDS + "; timm/imagenet-1k-wds has train/validation only (its card)",
                     unverified="whether timm's gated repo loads without accepting its terms first"),
        SuiteDataset("caltech101", "mteb/Caltech101", "image", "label", TRAIN_TEST, "a photo of a {}.",
                     rename=caltech_name, drop=("background_google", "faces_easy"), order="caltech",
                     coop_test=False, fallback="dpdl-benchmark/caltech101",
                     verified="TFDS names, order (mteb stats); CoOp's drops, renames, order (datasets/caltech101.py)",
                     unverified="splits of the fallback dpdl-benchmark/caltech101"),
        SuiteDataset("oxford_pets", "timm/oxford-iiit-pet", "image", "label", TRAIN_TEST,
                     "a photo of a {}, a type of pet.", verified="names and order equal CoOp's (repo card, CoOp)"),
        SuiteDataset("stanford_cars", "tanganke/stanford_cars", "image", "label", TRAIN_TEST, "a photo of a {}.",
                     rename=cars_name, verified="order = CoOp's; every name ends in the year (repo viewer)"),
        SuiteDataset("flowers102", "dpdl-benchmark/oxford_flowers102", "image", "label",
                     {"train": ("train", "validation"), "test": "test"}, "a photo of a {}, a type of flower.",
                     reference=flowers102_classes, match="position", coop_test=False,
                     verified="splits 1,020/1,020/6,149 (repo card); TFDS names from tensorflow-datasets 4.9.10; "
                              "CoOp's cat_to_name.json names from CoOp-derived repos (azshue/TPT, MCG-NJU/AWT)",
                     unverified="that the repo's ClassLabel names are TFDS's, 'pink-yellow dahlia?' included"),
        SuiteDataset("food101", "ethz/food101", "image", "label", {"train": "train", "test": "validation"},
                     "a photo of {}, a type of food.", order="sorted", coop_test=False,
                     verified="classes.txt order, cheesecake (16) before cheese_plate (17); CoOp sorts them"),
        SuiteDataset("fgvc_aircraft", "clip-benchmark/wds_fgvc_aircraft", "jpg", "cls", TRAIN_TEST,
                     "a photo of a {}, a type of aircraft.", names_from="classnames.txt",
                     verified="splits = CoOp's train and test (mteb stats)",
                     unverified="that classnames.txt is variants.txt verbatim"),
        SuiteDataset("sun397", "tanganke/sun397", "image", "label", TRAIN_TEST, "a photo of a {}.",
                     reference=sun397_classes,
                     verified="ClassName.txt from tensorflow-datasets 4.9.10; CoOp's reversal (datasets/sun397.py) "
                              "gives the 397 names azshue/TPT and MCG-NJU/AWT list",
                     unverified="that the repo's names are ClassName.txt's path parts joined with spaces, "
                                "and that its test split is Testing_01"),
        SuiteDataset("dtd", "tanganke/dtd", "image", "label", TRAIN_TEST, "{} texture.", coop_test=False,
                     verified="names and order equal CoOp's (mirrors by a DTD author)"),
        SuiteDataset("eurosat", "timm/eurosat-rgb", "image", "label", TRAIN_TEST,
                     "a centered satellite photo of {}.", rename=lambda n: EUROSAT_NAMES.get(n, n), coop_test=False,
                     verified="order = CoOp's sorted folders; CoOp's NEW_CNAMES (datasets/eurosat.py)"),
        SuiteDataset("ucf101", "flwrlabs/ucf101", "image", "label", TRAIN_TEST, "a photo of a person doing {}.",
                     reference=ucf101_classes, mid_frames=True, fallback="mteb/ucf101",
                     verified="classInd.txt order (public copies of ucfTrainTestlist) and CoOp's renaming "
                              "(datasets/ucf101.py)",
                     unverified="that the repo's names are classInd.txt's CamelCase names; download size"),
        SuiteDataset("cifar10", "uoft-cs/cifar10", "img", "label", TRAIN_TEST, "a photo of a {}.", coop_test=False,
                     verified="columns img/label (repo card)"),
        SuiteDataset("cifar100", "uoft-cs/cifar100", "img", "fine_label", TRAIN_TEST, "a photo of a {}.",
                     reference=cifar100_classes, match="position", repo_key=cifar100_key, coop_test=False,
                     verified="CLIP's 100 names (openai/CLIP data/prompts.md); columns img/fine_label (repo card)",
                     unverified="the names of the current revision; only the typo 'cra' (crab) is known"),
        SuiteDataset("imagenet_v2", "clip-benchmark/wds_imagenetv2", "webp", "cls", {"test": "test"}, **_IMAGENET,
                     verified=_WDS, unverified=_SHIFT_UNVERIFIED),
        SuiteDataset("imagenet_sketch", "clip-benchmark/wds_imagenet_sketch", "jpg", "cls", {"test": "test"},
                     **_IMAGENET, verified=_WDS, unverified=_SHIFT_UNVERIFIED),
        SuiteDataset("imagenet_a", "clip-benchmark/wds_imagenet-a", "jpg", "cls", {"test": "test"}, **_IMAGENET,
                     imagenet_indices=IMAGENET_A_INDICES, verified=_WDS + "; CoOp's 200 indices",
                     unverified="image column 'jpg' (the load checks it)"),
        SuiteDataset("imagenet_r", "clip-benchmark/wds_imagenet-r", "jpg", "cls", {"test": "test"}, **_IMAGENET,
                     imagenet_indices=IMAGENET_R_INDICES, verified=_WDS + "; CoOp's 200 indices",
                     unverified=_SHIFT_UNVERIFIED),
    ]
}  # fmt: skip
DOMAIN_SHIFTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@dataclass
class SuiteData:
    """A suite dataset in CoOp's form: splits with columns ``image`` and ``label`` (a ClassLabel), and the exact
    CoOp class names the prompts use (the ClassLabel's, except that repeated names are made unique there)."""

    spec: SuiteDataset
    splits: DatasetDict
    class_names: list[str] = field(default_factory=list)
    coop_splits: bool = False  # read from CoOp's data folder: CoOp's splits (with "val"), whatever the Hub has

    @property
    def coop_test(self) -> bool:
        """Whether the test split is CoOp's, so that numbers compare with CoOp-family tables."""
        return self.coop_splits or self.spec.coop_test


def load_suite_dataset(
    key: str, data_dir: str | None = None, revision: str | None = None, coop_root: str | None = None
) -> SuiteData:
    """Load ``key`` from its Hub repo (or ``data_dir``) and normalise it to CoOp's classes and labels; with
    ``coop_root`` (CoOp's data folder, or ``hub:<repo id>``), read CoOp's own splits from there instead."""
    if key not in SUITE:
        raise ValueError(f"Unknown suite dataset {key!r}: choose one of {sorted(SUITE)}.")
    spec = SUITE[key]
    if coop_root is not None:
        if data_dir is not None:
            raise ValueError(f"{key}: set data_dir (a Hub-schema copy) or data_root (CoOp's folder), not both.")
        splits, class_names = load_coop_folder(key, resolve_coop_root(coop_root, key, revision))
        return SuiteData(spec, splits, class_names, coop_splits=True)
    raw, source, revision, split_map = _load_raw(spec, data_dir, revision)
    wanted = [split for theirs in split_map.values() for split in _as_tuple(theirs)]
    missing = [split for split in wanted if split not in raw]
    if missing:
        raise ValueError(f"{key}: splits {missing} are missing from {source} (it has {list(raw)}).")
    first = raw[wanted[0]]
    for column in (spec.image_column, spec.label_column):
        if column not in first.column_names:
            raise ValueError(f"{key}: column {column!r} is missing (columns: {first.column_names}).")
    class_names, mapping = spec.coop_classes(spec.raw_class_names(first, data_dir, revision), source, revision)
    splits = DatasetDict(
        {
            ours: _normalise(concatenate_datasets([raw[s] for s in _as_tuple(theirs)]), spec, mapping, class_names)
            for ours, theirs in split_map.items()
        }
    )
    return SuiteData(spec, splits, class_names)


def _as_tuple(splits: str | tuple[str, ...]) -> tuple[str, ...]:
    return (splits,) if isinstance(splits, str) else splits


def _load_raw(spec: SuiteDataset, data_dir: str | None, revision: str | None):
    """The raw DatasetDict, where it came from, its revision and its split map (the fallback's may differ)."""
    if data_dir is not None:
        return load_from_disk(data_dir), data_dir, None, spec.splits
    try:
        return load_dataset(spec.hub_id, spec.config_name, revision=revision), spec.hub_id, revision, spec.splits
    except Exception as error:  # a gated or vanished repo: try the fallback with the same columns
        if spec.fallback is None:
            raise
        import logging

        logging.getLogger(__name__).warning("%s failed (%s); trying %s", spec.hub_id, error, spec.fallback)
        raw = load_dataset(spec.fallback, spec.config_name)
        return raw, spec.fallback, None, spec.fallback_splits or spec.splits


def _normalise(dataset: Dataset, spec: SuiteDataset, mapping: np.ndarray, class_names: list[str]) -> Dataset:
    if spec.mid_frames:
        dataset = dataset.select(middle_frame_rows(dataset))
    labels = mapping[np.asarray(dataset.with_format("numpy")[spec.label_column])]
    keep = np.flatnonzero(labels >= 0)
    dataset = dataset.select_columns([spec.image_column]).select(keep)
    if spec.image_column != "image":
        dataset = dataset.rename_column(spec.image_column, "image")
    return dataset.add_column("label", labels[keep].tolist(), feature=ClassLabel(names=unique_names(class_names)))


def middle_frame_rows(dataset: Dataset) -> list[int]:
    """Rows of the middle frame of each (video_id, clip_id), as CoOp's UCF-101-midframes (sorted by frame)."""
    table = dataset.select_columns(["video_id", "clip_id", "frame"]).with_format("numpy")[:]
    clips: dict[tuple, list[tuple[int, int]]] = {}
    for row, key in enumerate(zip(table["video_id"].tolist(), table["clip_id"].tolist(), strict=True)):
        clips.setdefault(key, []).append((int(table["frame"][row]), row))
    return sorted(sorted(frames)[len(frames) // 2][1] for frames in clips.values())

"""Local copies of suite datasets with their Hub repos' schemas, and the names each entry must yield: built from
the shipped name lists, for the suite tests and the recipe tests (tests never import each other)."""

import re
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

import cmp_hf.data.suite as suite
from cmp_hf.data import SUITE
from cmp_hf.data.suite import IMAGENET_A_INDICES, IMAGENET_R_INDICES, imagenet_classnames

IMAGENET = list(imagenet_classnames())
RESOURCES = Path(suite.__file__).parent / "resources"


def resource(name):
    return [line for line in (RESOURCES / name).read_text("utf-8").splitlines() if line and not line.startswith("#")]


# The repos' names as the registry expects them, built from the shipped lists with the sources' own rules.
SUN_PATHS = resource("sun397_classnames.txt")  # ClassName.txt: /d/desert/sand
SUN_REPO = [" ".join(p.split("/")[2:]).replace("_", " ") for p in SUN_PATHS]  # tanganke: 'desert sand'
SUN_COOP = [" ".join(p.split("/")[2:][::-1]) for p in SUN_PATHS]  # CoOp datasets/sun397.py: 'sand desert'
SUN_REPO_ORDER = SUN_REPO[:206] + SUN_REPO[206:208][::-1] + SUN_REPO[208:]  # a repo sorting 'jail cell' first
CLASS_IND = [line.split()[1] for line in resource("ucf101_classInd.txt")]
UCF_REPO = sorted(CLASS_IND)  # flwrlabs/ucf101: a case-sensitive sort puts HammerThrow before Hammering
UCF_COOP = ["_".join(re.findall("[A-Z][^A-Z]*", name)) for name in CLASS_IND]
FLOWERS = [line.split("\t") for line in resource("flowers102_classnames.tsv")]  # CoOp name, TFDS name
CIFAR100 = resource("cifar100_classnames.txt")
CIFAR100_REPO = [name.replace(" ", "_") for name in CIFAR100]
CIFAR100_REPO[26] = "cra"  # the typo of an older uoft-cs/cifar100 revision
# key -> {repo name: CoOp name} for the entries mapped through a shipped list
PAIRS = {
    "sun397": dict(zip(SUN_REPO, SUN_COOP, strict=True)),
    "ucf101": dict(zip(CLASS_IND, UCF_COOP, strict=True)),
    "flowers102": {tfds: coop for coop, tfds in FLOWERS},
    "cifar100": dict(zip(CIFAR100_REPO, CIFAR100, strict=True)),
}
# key -> (repo class names in repo label order, CoOp names in CoOp order); None: names come from the ImageNet list
CASES = {
    "imagenet": None,
    "imagenet_v2": None,
    "imagenet_sketch": None,
    "imagenet_a": None,
    "imagenet_r": None,
    "caltech101": (
        ["accordion", "airplanes", "anchor", "background_google", "faces", "faces_easy", "leopards", "motorbikes",
         "water_lilly"],
        ["face", "leopard", "motorbike", "accordion", "airplane", "anchor", "water lilly"],
    ),
    "oxford_pets": (["abyssinian", "american_bulldog", "yorkshire_terrier"],) * 2,
    "stanford_cars": (
        ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"],
        ["2000 AM General Hummer SUV", "2012 Ram C/V Cargo Van Minivan"],
    ),
    "flowers102": ([tfds for _, tfds in FLOWERS], [coop for coop, _ in FLOWERS]),
    "food101": (
        ["apple_pie", "cheesecake", "cheese_plate", "waffles"],
        ["apple_pie", "cheese_plate", "cheesecake", "waffles"],
    ),
    "fgvc_aircraft": (["707-320", "F-16A/B", "Tu-154"],) * 2,
    "sun397": (SUN_REPO_ORDER, SUN_COOP),
    "dtd": (["banded", "blotchy", "zigzagged"],) * 2,
    "eurosat": (["AnnualCrop", "Forest", "SeaLake"], ["Annual Crop Land", "Forest", "Sea or Lake"]),
    "ucf101": (UCF_REPO, UCF_COOP),
    "cifar10": (["airplane", "automobile", "truck"],) * 2,
    "cifar100": (CIFAR100_REPO, CIFAR100),
}  # fmt: skip


def expected_names(key):
    if CASES[key] is not None:
        return CASES[key]
    indices = {"imagenet_a": IMAGENET_A_INDICES, "imagenet_r": IMAGENET_R_INDICES}.get(key)
    names = [IMAGENET[i] for i in indices] if indices else IMAGENET
    return names, names


def coop_name(key, raw_name):
    return PAIRS[key][raw_name] if key in PAIRS else SUITE[key].rename(raw_name)


def repo_splits(spec):
    return [split for theirs in spec.splits.values() for split in ((theirs,) if isinstance(theirs, str) else theirs)]


def local_copy(key, directory, rows_per_class=3, raw_names=None):
    """A save_to_disk DatasetDict with the repo's splits and columns (and classnames.txt where the repo has one)."""
    spec = SUITE[key]
    raw_names = raw_names or expected_names(key)[0]
    rng = np.random.default_rng(0)
    labels = np.arange(len(raw_names))
    if len(raw_names) > 20:  # long lists: a few labels, the first, the last and UCF101's Hammer* pair
        labels = np.array(sorted({0, 1, 34, 35, len(raw_names) - 1}))
    labels = np.repeat(labels, rows_per_class)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in labels]
    label_feature = ClassLabel(names=raw_names) if spec.names_from == "features" else Value("int64")
    columns = {spec.image_column: images, spec.label_column: labels.tolist()}
    features = {spec.image_column: Image(), spec.label_column: label_feature}
    if spec.mid_frames:  # every row is a frame: 3 frames of one clip per label, listed out of order
        columns.update(
            video_id=[f"v{y}" for y in labels], clip_id=[0] * len(labels), frame=[2, 0, 1] * (len(labels) // 3)
        )
        features.update(video_id=Value("string"), clip_id=Value("int64"), frame=Value("int64"))
    split = Dataset.from_dict(columns, features=Features(features))
    DatasetDict({theirs: split for theirs in repo_splits(spec)}).save_to_disk(str(directory))
    if spec.names_from == "classnames.txt":
        (directory / "classnames.txt").write_text("\n".join(raw_names) + "\n")
    return labels

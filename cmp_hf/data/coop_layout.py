"""CoOp's data folder, read as CoOp reads it: exactly CoOp's train / val / test images, labels and class names.

Most people who run CoOp-family code have the folder that CoOp's DATASETS.md describes (``$DATA/oxford_pets/images``
+ ``split_zhou_OxfordPets.json``, ``$DATA/imagenet/images/{train,val}`` + ``classnames.txt``, ...). This module reads
it with the rules of CoOp's ``datasets/*.py`` (Dassl's ``Datum`` lists) and returns ``datasets`` objects:

* the ten re-split datasets: ``split_zhou_<Name>.json``, ``{"train"|"val"|"test": [[image path, label, class
  name], ...]}``, image paths relative to the dataset's image folder (StanfordCars: to the dataset folder), rows in
  the JSON's order (the order Dassl's few-shot draw walks);
* FGVCAircraft: ``variants.txt`` (label order) and ``images_variant_{train,val,test}.txt`` (``<image id> <variant>``);
* ImageNet: ``classnames.txt`` (``<wnid> <name>``), labels by sorted wnid folder of ``images/train``, test =
  ``images/val``; no validation split (CoOp validates on the test set; cmp_hf draws its few-shot validation images
  from the training images left instead, ``cmp_hf.data.fewshot``);
* the shifts, test only: ImageNet-V2 (folders ``0``..``999`` = label, names by ``classnames.txt`` line), -Sketch,
  -A and -R (sorted wnid folders, ``README.txt`` skipped, names from each folder's ``classnames.txt``).

Class names are the ones CoOp's datasets carry (Dassl's ``get_lab2cname`` of the training split, underscores kept:
the prompt replaces them by spaces as CoOp's trainers do). Images inside a wnid folder are listed as Dassl's
``listdir_nohidden`` lists them, in ``os.listdir`` order: the few-shot draw on ImageNet then picks the images CoOp
picks on the same disk, and may pick others on another file system (CoOp's own runs have the same property).

``hub:<repo id>`` instead of a folder reads a Hub repo that carries this layout (``cmp_hf.data.coop_hub``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image


@dataclass(frozen=True)
class CoOpLayout:
    """Where one dataset lives under CoOp's root, and which of CoOp's readers reads it."""

    folder: str  # CoOp's ``dataset_dir``
    image_dir: str  # relative to folder ("": paths in the split file are relative to the folder itself)
    reader: str  # "split_json", "fgvc_aircraft", "imagenet", "imagenet_v2", "wnid_folders"
    split_file: str | None = None


COOP_LAYOUTS: dict[str, CoOpLayout] = {
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_json", "split_zhou_OxfordPets.json"),
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_json", "split_zhou_Caltech101.json"),
    "stanford_cars": CoOpLayout("stanford_cars", "", "split_json", "split_zhou_StanfordCars.json"),
    "flowers102": CoOpLayout("oxford_flowers", "jpg", "split_json", "split_zhou_OxfordFlowers.json"),
    "food101": CoOpLayout("food-101", "images", "split_json", "split_zhou_Food101.json"),
    "fgvc_aircraft": CoOpLayout("fgvc_aircraft", "images", "fgvc_aircraft"),
    "sun397": CoOpLayout("sun397", "SUN397", "split_json", "split_zhou_SUN397.json"),
    "dtd": CoOpLayout("dtd", "images", "split_json", "split_zhou_DescribableTextures.json"),
    "eurosat": CoOpLayout("eurosat", "2750", "split_json", "split_zhou_EuroSAT.json"),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_json", "split_zhou_UCF101.json"),
    "imagenet": CoOpLayout("imagenet", "images", "imagenet"),
    "imagenet_v2": CoOpLayout("imagenetv2", "imagenetv2-matched-frequency-format-val", "imagenet_v2"),
    "imagenet_sketch": CoOpLayout("imagenet-sketch", "images", "wnid_folders"),
    "imagenet_a": CoOpLayout("imagenet-adversarial", "imagenet-a", "wnid_folders"),
    "imagenet_r": CoOpLayout("imagenet-rendition", "imagenet-r", "wnid_folders"),
}
WNID_FOLDERS_IGNORED = ("README.txt",)  # CoOp's TO_BE_IGNORED (ImageNet-A / -R)

Rows = list[tuple[str, int, str]]  # (image path, label, class name): one Dassl Datum each


def load_coop_folder(key: str, root: str) -> tuple[DatasetDict, list[str]]:
    """``key``'s splits under CoOp's root folder (columns ``image``, ``label``) and CoOp's class names by label."""
    if key not in COOP_LAYOUTS:
        raise ValueError(
            f"{key} is not one of CoOp's datasets, so CoOp's data folder has no copy of it ({sorted(COOP_LAYOUTS)} "
            "are): load it from the Hub or data_dir (leave data_root unset)."
        )
    layout = COOP_LAYOUTS[key]
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), layout.folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{key}: CoOp's data folder {root} has no {layout.folder}/ (CoOp's DATASETS.md layout: "
            f"{os.path.join(root, layout.folder, layout.image_dir)}): download it there or fix data_root."
        )
    image_dir = os.path.join(folder, layout.image_dir)
    splits = READERS[layout.reader](key, folder, image_dir, layout)
    names = class_names_of(key, splits["train" if "train" in splits else "test"])
    features = Features({"image": Image(), "label": ClassLabel(names=unique_names(names))})
    dataset = DatasetDict(
        {
            split: Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}, features)
            for split, rows in splits.items()
        }
    )
    return dataset, names


def class_names_of(key: str, rows: Rows) -> list[str]:
    """Dassl's ``get_lab2cname``: the class name of each label 0..C-1, from the rows carrying it; a label without
    rows or with two names is an error (CoOp would silently keep one of them)."""
    names: dict[int, str] = {}
    for path, label, name in rows:
        if names.setdefault(label, name) != name:
            raise ValueError(f"{key}: label {label} is named both {names[label]!r} and {name!r} ({path}).")
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing or not names:
        raise ValueError(f"{key}: labels {missing or [0]} have no images in the split the names are read from.")
    return [names[label] for label in range(len(names))]


def _read_split_json(key: str, folder: str, image_dir: str, layout: CoOpLayout) -> dict[str, Rows]:
    path = os.path.join(folder, layout.split_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{key}: {path} is missing. CoOp's split files are linked from CoOp's DATASETS.md; put "
            f"{layout.split_file} in {folder}."
        )
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    missing = [name for name in ("train", "val", "test") if name not in split]
    if missing:
        raise ValueError(f"{key}: {path} has no {missing} lists (CoOp's split files have train, val and test).")
    return _check_images_exist(key, {
        name: [(os.path.join(image_dir, impath), int(label), classname) for impath, label, classname in split[name]]
        for name in ("train", "val", "test")
    })  # fmt: skip


def _read_fgvc_aircraft(key: str, folder: str, image_dir: str, layout: CoOpLayout) -> dict[str, Rows]:
    with open(_required(key, folder, "variants.txt"), encoding="utf-8") as f:
        label_of = {line.strip(): i for i, line in enumerate(f.readlines())}
    splits = {}
    for split in ("train", "val", "test"):
        with open(_required(key, folder, f"images_variant_{split}.txt"), encoding="utf-8") as f:
            parts = [line.strip().split(" ") for line in f.readlines()]
        unknown = sorted({" ".join(p[1:]) for p in parts} - set(label_of))
        if unknown:
            raise ValueError(f"{key}: images_variant_{split}.txt names variants not in variants.txt: {unknown[:5]}.")
        splits[split] = [
            (os.path.join(image_dir, p[0] + ".jpg"), label_of[" ".join(p[1:])], " ".join(p[1:])) for p in parts
        ]
    return _check_images_exist(key, splits)


def read_classnames(key: str, folder: str) -> dict[str, str]:
    """CoOp's ``ImageNet.read_classnames``: wnid -> name, in file order, from ``<folder>/classnames.txt``."""
    names = {}
    with open(_required(key, folder, "classnames.txt"), encoding="utf-8") as f:
        for line in f.readlines():
            parts = line.strip().split(" ")
            names[parts[0]] = " ".join(parts[1:])
    return names


def _read_imagenet(key: str, folder: str, image_dir: str, layout: CoOpLayout) -> dict[str, Rows]:
    names = read_classnames(key, folder)
    splits = {}
    for ours, theirs in (("train", "train"), ("test", "val")):
        split_dir = os.path.join(image_dir, theirs)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"{key}: {split_dir} is missing (CoOp's layout: images/train and images/val).")
        wnids = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
        splits[ours] = _folder_rows(key, split_dir, wnids, [names.get(w) for w in wnids])
    return splits


def _read_imagenet_v2(key: str, folder: str, image_dir: str, layout: CoOpLayout) -> dict[str, Rows]:
    names = list(read_classnames(key, folder).values())
    return {"test": _folder_rows(key, image_dir, [str(label) for label in range(len(names))], names)}


def _read_wnid_folders(key: str, folder: str, image_dir: str, layout: CoOpLayout) -> dict[str, Rows]:
    names = read_classnames(key, folder)
    wnids = [w for w in _listdir_nohidden(key, image_dir, sort=True) if w not in WNID_FOLDERS_IGNORED]
    return {"test": _folder_rows(key, image_dir, wnids, [names.get(w) for w in wnids])}


def _folder_rows(key: str, split_dir: str, folders: list[str], names: list[str | None]) -> Rows:
    """Every image of each class folder, label = position in ``folders``, in Dassl's listing order."""
    unnamed = [f for f, name in zip(folders, names, strict=True) if name is None]
    if unnamed:
        raise ValueError(f"{key}: classnames.txt names no class for the folders {unnamed[:5]} of {split_dir}.")
    return [
        (os.path.join(split_dir, sub, image), label, name)
        for label, (sub, name) in enumerate(zip(folders, names, strict=True))
        for image in _listdir_nohidden(key, os.path.join(split_dir, sub))
    ]


def _listdir_nohidden(key: str, path: str, sort: bool = False) -> list[str]:
    """Dassl's ``listdir_nohidden``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}: {path} is missing from CoOp's data folder.")
    items = [name for name in os.listdir(path) if not name.startswith(".")]
    return sorted(items) if sort else items


def _required(key: str, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: {path} is missing (CoOp's DATASETS.md puts {name} in {folder}).")
    return path


def _check_images_exist(key: str, splits: dict[str, Rows]) -> dict[str, Rows]:
    """Every image the split files name, before anything is built (a partial copy fails here, not mid-training);
    the folder readers list what exists and need no check."""
    missing = [path for rows in splits.values() for path, _, _ in rows if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{key}: {len(missing)} images named by CoOp's split files are missing, e.g. {missing[0]}: the data "
            "folder is incomplete or laid out differently from CoOp's DATASETS.md."
        )
    return splits


def unique_names(names: list[str]) -> list[str]:
    """``datasets.ClassLabel`` needs unique names; CLIP's ImageNet list repeats two. Repeats get their label index
    appended ("missile (744)") in the ClassLabel only: the exact names are returned beside it."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name} ({i})" for i, name in enumerate(names)]


READERS = {
    "split_json": _read_split_json,
    "fgvc_aircraft": _read_fgvc_aircraft,
    "imagenet": _read_imagenet,
    "imagenet_v2": _read_imagenet_v2,
    "wnid_folders": _read_wnid_folders,
}

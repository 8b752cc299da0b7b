"""Every suite entry against a local copy with its Hub repo's schema: clean CoOp names, CoOp label order, labels
mapped by name, drops, the ImageNet subsets, UCF101's middle frames."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from cmp_hf.data import SUITE, load_suite_dataset
from cmp_hf.data.suite import IMAGENET_A_INDICES, IMAGENET_R_INDICES, imagenet_classnames, unique_names

IMAGENET = list(imagenet_classnames())
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
    "flowers102": (["pink primrose", "hard-leaved pocket orchid"],) * 2,
    "food101": (
        ["apple_pie", "cheesecake", "cheese_plate", "waffles"],
        ["apple_pie", "cheese_plate", "cheesecake", "waffles"],
    ),
    "fgvc_aircraft": (["707-320", "F-16A/B", "Tu-154"],) * 2,
    "sun397": (
        ["abbey", "apartment building outdoor", "apse indoor", "bamboo forest"],
        ["abbey", "outdoor apartment_building", "indoor apse", "bamboo_forest"],
    ),
    "dtd": (["banded", "blotchy", "zigzagged"],) * 2,
    "eurosat": (["AnnualCrop", "Forest", "SeaLake"], ["Annual Crop Land", "Forest", "Sea or Lake"]),
    "ucf101": (["ApplyEyeMakeup", "YoYo", "JumpRope"], ["Apply_Eye_Makeup", "Yo_Yo", "Jump_Rope"]),
    "cifar10": (["airplane", "automobile", "truck"],) * 2,
    "cifar100": (["apple", "aquarium_fish", "maple_tree"], ["apple", "aquarium fish", "maple tree"]),
}  # fmt: skip


def expected_names(key):
    if CASES[key] is not None:
        return CASES[key]
    indices = {"imagenet_a": IMAGENET_A_INDICES, "imagenet_r": IMAGENET_R_INDICES}.get(key)
    names = [IMAGENET[i] for i in indices] if indices else IMAGENET
    return names, names


def local_copy(key, directory, rows_per_class=3):
    """A save_to_disk DatasetDict with the repo's columns (and classnames.txt where the repo has one)."""
    spec = SUITE[key]
    raw_names, _ = expected_names(key)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(raw_names)), rows_per_class)
    if len(raw_names) > 20:  # the ImageNet lists: a few rows of a few labels, including the last one
        labels = np.array([0, 1, 1, len(raw_names) - 1, len(raw_names) - 1, len(raw_names) - 1])
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in labels]
    label_feature = ClassLabel(names=raw_names) if spec.names_from == "features" else Value("int64")
    columns = {spec.image_column: images, spec.label_column: labels.tolist()}
    features = {spec.image_column: Image(), spec.label_column: label_feature}
    if spec.mid_frames:  # every row is a frame: 3 frames of one clip per label, listed out of order
        columns.update(video_id=[f"v{y}" for y in labels], clip_id=[0] * len(labels), frame=[2, 0, 1] * len(raw_names))
        features.update(video_id=Value("string"), clip_id=Value("int64"), frame=Value("int64"))
    split = Dataset.from_dict(columns, features=Features(features))
    DatasetDict({theirs: split for theirs in spec.splits.values()}).save_to_disk(str(directory))
    if spec.names_from == "classnames.txt":
        (directory / "classnames.txt").write_text("\n".join(raw_names) + "\n")
    return labels


@pytest.mark.parametrize("key", sorted(SUITE))
def test_suite_entry_yields_coop_classes_and_labels(key, tmp_path):
    assert set(CASES) == set(SUITE)  # every registry entry has a case here
    raw_names, coop_names = expected_names(key)
    raw_labels = local_copy(key, tmp_path / key)
    data = load_suite_dataset(key, data_dir=str(tmp_path / key))
    assert data.class_names == coop_names
    assert set(data.splits) == set(SUITE[key].splits)
    for split in data.splits.values():
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == unique_names(coop_names)
        kept_raw = [y for y in raw_labels if raw_names[y] in {n for n in raw_names if n not in SUITE[key].drop}]
        if SUITE[key].mid_frames:
            kept_raw = sorted(set(kept_raw))  # one middle frame per clip
        assert len(split) == len(kept_raw)
        # label mapping by name: each row's CoOp name is the clean form of its repo name
        got = [coop_names[y] for y in split["label"]]
        assert got == [SUITE[key].rename(raw_names[y]) for y in kept_raw]


def test_food101_swap_and_caltech_drops_are_by_name(tmp_path):
    local_copy("food101", tmp_path / "food")
    food = load_suite_dataset("food101", data_dir=str(tmp_path / "food")).splits["test"]
    # repo label 1 (cheesecake) becomes CoOp label 2; repo label 2 (cheese_plate) becomes 1
    assert food.features["label"].names[1:3] == ["cheese_plate", "cheesecake"]
    local_copy("caltech101", tmp_path / "caltech")
    caltech = load_suite_dataset("caltech101", data_dir=str(tmp_path / "caltech")).splits["train"]
    assert len(caltech) == 7 * 3  # 9 repo classes x 3 rows, background_google and faces_easy dropped


def test_ucf101_keeps_the_middle_frame(tmp_path):
    local_copy("ucf101", tmp_path / "ucf")
    raw = DatasetDict.load_from_disk(str(tmp_path / "ucf"))["train"]
    data = load_suite_dataset("ucf101", data_dir=str(tmp_path / "ucf")).splits["train"]
    assert len(data) == 3
    # frames of each clip are [2, 0, 1]: the middle of the sorted frames is frame 1, the clip's third row
    middle_rows = [2, 5, 8]
    assert [np.asarray(im).tobytes() for im in data["image"]] == [
        np.asarray(raw[i]["image"]).tobytes() for i in middle_rows
    ]


def test_repeated_imagenet_names_stay_exact_for_prompts(tmp_path):
    local_copy("imagenet", tmp_path / "imagenet")
    data = load_suite_dataset("imagenet", data_dir=str(tmp_path / "imagenet"))
    assert data.class_names.count("missile") == 2 and data.class_names.count("sunglasses") == 2
    label_names = data.splits["test"].features["label"].names
    assert (
        label_names[744] == "missile (744)" and label_names[657] == "missile (657)" and len(set(label_names)) == 1000
    )


def test_imagenet_subsets_are_200_way():
    assert len(IMAGENET_A_INDICES) == len(IMAGENET_R_INDICES) == 200
    assert len(IMAGENET) == 1000 and IMAGENET[0] == "tench" and IMAGENET[-1] == "toilet paper"


def test_unknown_key_and_missing_columns_are_reported(tmp_path):
    with pytest.raises(ValueError, match="Unknown suite dataset 'imagenet2'"):
        load_suite_dataset("imagenet2")
    DatasetDict({"train": Dataset.from_dict({"image": [1], "label": [0]}), "test": Dataset.from_dict(
        {"image": [1], "label": [0]})}).save_to_disk(str(tmp_path / "bad"))  # fmt: skip
    with pytest.raises(ValueError, match="column 'img' is missing"):
        load_suite_dataset("cifar10", data_dir=str(tmp_path / "bad"))

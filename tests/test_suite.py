"""Every suite entry against a local copy with its Hub repo's schema: clean CoOp names, CoOp label order, labels
mapped by name, drops, the ImageNet subsets, UCF101's middle frames, and the refusal of repos whose names drift
from the shipped lists."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from suite_copies import CASES, CIFAR100_REPO, IMAGENET, UCF_REPO, coop_name, expected_names, local_copy

import cmp_hf.data.suite as suite
from cmp_hf.data import SUITE, few_shot_split, load_suite_dataset
from cmp_hf.data.suite import IMAGENET_A_INDICES, IMAGENET_R_INDICES, unique_names


@pytest.mark.parametrize("key", sorted(SUITE))
def test_suite_entry_yields_coop_classes_and_labels(key, tmp_path):
    assert set(CASES) == set(SUITE)  # every registry entry has a case here
    raw_names, coop_names = expected_names(key)
    raw_labels = local_copy(key, tmp_path / key)
    data = load_suite_dataset(key, data_dir=str(tmp_path / key))
    assert data.class_names == coop_names
    assert set(data.splits) == set(SUITE[key].splits)
    for ours, split in data.splits.items():
        theirs = SUITE[key].splits[ours]
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == unique_names(coop_names)
        kept_raw = [y for y in raw_labels if raw_names[y] in {n for n in raw_names if n not in SUITE[key].drop}]
        if SUITE[key].mid_frames:
            kept_raw = sorted(set(kept_raw))  # one middle frame per clip
        pooled = 1 if isinstance(theirs, str) else len(theirs)  # Flowers102: train + validation form the pool
        assert len(split) == pooled * len(kept_raw)
        # label mapping by name: each row's CoOp name is the clean form of its repo name
        got = [coop_names[y] for y in split["label"]]
        assert got == pooled * [coop_name(key, raw_names[y]) for y in kept_raw]


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
    assert len(data) == len(raw) // 3
    # frames of each clip are [2, 0, 1]: the middle of the sorted frames is frame 1, the clip's third row
    middle_rows = list(range(2, len(raw), 3))
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


def test_sun397_names_are_coops_reversed_paths(tmp_path):
    local_copy("sun397", tmp_path / "sun")
    names = load_suite_dataset("sun397", data_dir=str(tmp_path / "sun")).class_names
    assert len(names) == len(set(names)) == 397
    # CoOp's names (as CoOp-derived repos list them): single-level classes keep their words in order ...
    for kept in ("bus_interior", "home_office", "shoe_shop", "railroad_track", "jail_cell", "office"):
        assert kept in names
    # ... and multi-level ones are reversed, whatever the last word
    for reversed_name in ("sand desert", "east_asia temple", "indoor_procenium theater", "plunge waterfall",
                          "barrel_storage wine_cellar", "backseat car_interior", "coral_reef underwater",
                          "establishment poolroom", "outdoor apartment_building"):  # fmt: skip
        assert reversed_name in names
    assert names[206:208] == ["indoor jail", "jail_cell"]  # CoOp's ClassName.txt order, though the copy swaps them


def test_ucf101_labels_follow_class_ind(tmp_path):
    local_copy("ucf101", tmp_path / "ucf")
    data = load_suite_dataset("ucf101", data_dir=str(tmp_path / "ucf"))
    assert data.class_names[34:36] == ["Hammering", "Hammer_Throw"]
    assert data.class_names[46:48] == ["Jumping_Jack", "Jump_Rope"]
    assert data.class_names[-1] == "Yo_Yo" and len(data.class_names) == 101
    # the copy's label 34 is HammerThrow (case-sensitive sort): its rows get CoOp's label 35
    assert UCF_REPO[34] == "HammerThrow" and sorted(set(data.splits["test"]["label"])) == [0, 1, 34, 35, 100]


def test_flowers102_uses_coop_names_and_pools_train_and_validation(tmp_path):
    labels = local_copy("flowers102", tmp_path / "flowers", rows_per_class=10)  # the repo: 10 per class per split
    data = load_suite_dataset("flowers102", data_dir=str(tmp_path / "flowers"))
    assert data.class_names[59] == "pink-yellow dahlia" and data.class_names[77] == "lotus"
    assert not any(name.endswith("?") for name in data.class_names)
    # CoOp's 16 shots + 4 validation images need the pooled 20 per class; the repo's train split alone has 10
    few_shot_split(np.asarray(data.splits["train"]["label"]), shots=16, seed=1)
    with pytest.raises(ValueError, match="fewer than shots"):
        few_shot_split(labels, shots=16, seed=1)


def test_cifar100_accepts_the_known_typo_only(tmp_path):
    local_copy("cifar100", tmp_path / "ok")
    assert load_suite_dataset("cifar100", data_dir=str(tmp_path / "ok")).class_names[26] == "crab"
    drifted = CIFAR100_REPO.copy()
    drifted[30], drifted[31] = drifted[31], drifted[30]
    local_copy("cifar100", tmp_path / "bad", raw_names=drifted)
    with pytest.raises(ValueError, match=r"revision default\) drift .*label 30 is 'elephant'.*expects 'dolphin'"):
        load_suite_dataset("cifar100", data_dir=str(tmp_path / "bad"))


@pytest.mark.parametrize(
    ("key", "edit", "problem"),
    [
        ("sun397", lambda n: n[:5] + ["amusement park x"] + n[6:], "label 5 is 'amusement park x', which is not"),
        ("ucf101", lambda n: n[:-1], "lacks 'YoYo' .CoOp label 100."),
        ("flowers102", lambda n: [n[0], n[2], n[1], *n[3:]], "label 1 is 'canterbury bells', .* expects 'hard-leaved"),
    ],
)  # fmt: skip
def test_drifting_names_or_order_are_refused(key, edit, problem, tmp_path):
    local_copy(key, tmp_path / key, raw_names=edit(list(CASES[key][0])))
    with pytest.raises(ValueError, match=f"{key}: the class names of {tmp_path / key} .*{problem}.*Unverified: "):
        load_suite_dataset(key, data_dir=str(tmp_path / key))


def test_imagenet_fallback_reads_timms_validation_split_as_test(tmp_path, monkeypatch):
    local_copy("imagenet", tmp_path / "in")
    timm = DatasetDict.load_from_disk(str(tmp_path / "in"))
    timm = DatasetDict({"train": timm["train"], "validation": timm["test"].select([0, 1])})  # timm's split names

    def hub(repo, config=None, revision=None):
        if repo != "timm/imagenet-1k-wds":
            raise ConnectionError(f"{repo} is unreachable")
        return timm

    monkeypatch.setattr(suite, "load_dataset", hub)
    data = load_suite_dataset("imagenet")
    assert len(data.splits["train"]) == len(timm["train"]) and len(data.splits["test"]) == 2

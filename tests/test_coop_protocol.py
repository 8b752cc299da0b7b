"""CoOp's protocol exactly: its data folder (split files, FGVCAircraft's lists, ImageNet-style folders), read from
disk or from a (loopback) Hub repo; and its few-shot draw, against a transcription of Dassl's algorithm."""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import hub_env, run
from hub_server import FakeHub, Repo
from PIL import Image

from cmp_hf import CMPConfig
from cmp_hf.data import coop_few_shot_split, few_shot_sets, load_suite_dataset
from cmp_hf.data.fewshot import FewShotSplit
from cmp_hf.scripts.train import ScriptArguments, load_run_data

PETS = ["abyssinian", "american_bulldog", "basset_hound", "beagle", "bombay"]
SHOTS = 3


def write_image(path: Path, value: int) -> None:
    """A 4 x 4 image whose pixels say which file it is (PNG bytes: CoOp's '.jpg' names are only names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, value // 256, 7)).save(path, format="PNG")


def pixel(image) -> tuple[int, int]:
    r, g, _ = image.convert("RGB").getpixel((0, 0))
    return r + 256 * g


def uneven_rows(rng: random.Random, counts: dict[int, int], names: list[str], prefix: str, start: int) -> list:
    """[[image path, label, class name], ...] in a shuffled order (labels first appear out of order); the image's
    pixel value is its position ``start + i`` among all the folder's images."""
    labels = [label for label, n in counts.items() for _ in range(n)]
    rng.shuffle(labels)
    return [[f"{prefix}/{names[y]}_{start + i}.jpg", y, names[y]] for i, y in enumerate(labels)]


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> tuple[Path, dict]:
    """A CoOp data folder: OxfordPets and StanfordCars (split files), FGVCAircraft, ImageNet, -V2 and -A."""
    root, rng = tmp_path_factory.mktemp("coop_data"), random.Random(0)
    split = {}
    counts = {"train": {0: 6, 1: 2, 2: 9, 3: 4, 4: 5}, "val": {0: 3, 1: 5, 2: 1, 3: 4, 4: 2}, "test": {y: 2 for y in
              range(5)}}  # fmt: skip
    start = 0
    for name, per_class in counts.items():
        split[name] = uneven_rows(rng, per_class, PETS, "pets", start)
        start += len(split[name])
    for name in split:
        assert len(split[name]) == sum(counts[name].values())
        for path, _, _ in split[name]:
            write_image(root / "oxford_pets" / "images" / path, int(path.rsplit("_", 1)[1].split(".")[0]))
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))

    cars = {name: [[f"cars_{name}/{i:05d}.jpg", i % 2, ["2012 Tesla Model S", "1993 Geo Metro"][i % 2]] for i in
            range(4)] for name in ("train", "val", "test")}  # fmt: skip
    for rows in cars.values():
        for i, (path, _, _) in enumerate(rows):
            write_image(root / "stanford_cars" / path, 500 + i)
    (root / "stanford_cars" / "split_zhou_StanfordCars.json").write_text(json.dumps(cars))

    aircraft = root / "fgvc_aircraft"
    write_image(aircraft / "images" / "0001.jpg", 600)
    (aircraft / "variants.txt").write_text("707-320\nA300B4\nF/A-18\n")
    for i, name in enumerate(("train", "val", "test")):
        for j in range(3):
            write_image(aircraft / "images" / f"{i}{j}.jpg", 610 + 3 * i + j)
        lines = [f"{i}0 F/A-18", f"{i}1 707-320", f"{i}2 A300B4"]
        (aircraft / f"images_variant_{name}.txt").write_text("\n".join(lines) + "\n")

    wnids = ["n02", "n01", "n03"]  # CoOp labels by sorted folder: n01, n02, n03
    classnames = "n01 tench\nn02 missile\nn03 missile\n"  # CLIP's ImageNet names repeat "missile"
    for split_dir, n in (("train", 5), ("val", 2)):
        for w, wnid in enumerate(wnids):
            for i in range(n):
                write_image(root / "imagenet" / "images" / split_dir / wnid / f"{i}.JPEG", 700 + 10 * w + i)
    (root / "imagenet" / "classnames.txt").write_text(classnames)
    for label in range(3):
        write_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg", label)
    (root / "imagenetv2" / "classnames.txt").write_text(classnames)
    for wnid in ("n03", "n01"):
        write_image(root / "imagenet-adversarial" / "imagenet-a" / wnid / "x.jpg", 800)
    (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("not a class")
    (root / "imagenet-adversarial" / "classnames.txt").write_text(classnames)
    return root, split


# ---- the loader ---------------------------------------------------------------------------------------------------


def test_split_files_give_coops_images_labels_and_names(coop_root):
    root, split = coop_root
    suite = load_suite_dataset("oxford_pets", coop_root=str(root))
    assert suite.coop_splits and suite.coop_test and suite.class_names == PETS
    assert {name: len(ds) for name, ds in suite.splits.items()} == {name: len(rows) for name, rows in split.items()}
    for name, rows in split.items():
        ds = suite.splits[name]
        assert list(ds["label"]) == [label for _, label, _ in rows]  # the JSON's order: the one Dassl's draw walks
        assert [pixel(image) for image in ds["image"]] == [int(p.rsplit("_", 1)[1][:-4]) for p, _, _ in rows]
        assert ds.features["label"].names == PETS

    cars = load_suite_dataset("stanford_cars", coop_root=str(root))  # paths relative to the dataset folder
    assert cars.class_names == ["2012 Tesla Model S", "1993 Geo Metro"]
    assert [pixel(image) for image in cars.splits["test"]["image"]] == [500, 501, 502, 503]


def test_fgvc_aircraft_reads_its_variant_lists(coop_root):
    root, _ = coop_root
    suite = load_suite_dataset("fgvc_aircraft", coop_root=str(root))
    assert suite.class_names == ["707-320", "A300B4", "F/A-18"]  # variants.txt order
    assert list(suite.splits["val"]["label"]) == [2, 0, 1]
    assert [pixel(image) for image in suite.splits["val"]["image"]] == [613, 614, 615]


def test_imagenet_folders_and_shifts(coop_root):
    root, _ = coop_root
    imagenet = load_suite_dataset("imagenet", coop_root=str(root))
    assert list(imagenet.splits) == ["train", "test"]  # CoOp validates ImageNet on its test set
    assert imagenet.class_names == ["tench", "missile", "missile"]  # exact; the ClassLabel makes repeats unique
    assert imagenet.splits["train"].features["label"].names == ["tench", "missile (1)", "missile (2)"]
    train = imagenet.splits["train"]
    assert sorted(zip(train["label"], (pixel(i) for i in train["image"]), strict=True)) == sorted(
        (["n01", "n02", "n03"].index(wnid), 700 + 10 * w + i) for w, wnid in enumerate(["n02", "n01", "n03"])
        for i in range(5)
    )  # fmt: skip
    assert len(imagenet.splits["test"]) == 6

    v2 = load_suite_dataset("imagenet_v2", coop_root=str(root))  # folder k is label k
    assert list(v2.splits) == ["test"] and [pixel(i) for i in v2.splits["test"]["image"]] == [0, 1, 2]
    a = load_suite_dataset("imagenet_a", coop_root=str(root))  # sorted wnid folders, README.txt skipped
    assert a.class_names == ["tench", "missile"] and list(a.splits["test"]["label"]) == [0, 1]


def test_a_broken_folder_is_named_before_anything_is_built(coop_root, tmp_path):
    root, _ = coop_root
    with pytest.raises(ValueError, match="not one of CoOp's datasets"):
        load_suite_dataset("cifar10", coop_root=str(root))
    with pytest.raises(FileNotFoundError, match="has no dtd/"):
        load_suite_dataset("dtd", coop_root=str(root))
    copy = tmp_path / "copy"
    shutil.copytree(root / "oxford_pets", copy / "oxford_pets")
    next((copy / "oxford_pets" / "images" / "pets").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="1 images named by CoOp's split files are missing"):
        load_suite_dataset("oxford_pets", coop_root=str(copy))
    (copy / "oxford_pets" / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(FileNotFoundError, match="split_zhou_OxfordPets.json is missing"):
        load_suite_dataset("oxford_pets", coop_root=str(copy))


HUB_LOAD = """
import json, sys
from cmp_hf.data import load_suite_dataset
suite = load_suite_dataset("oxford_pets", coop_root=sys.argv[1])
print(json.dumps({name: list(ds["label"]) for name, ds in suite.splits.items()} | {"names": suite.class_names}))
"""


@pytest.mark.parametrize("packed", [True, False])
def test_a_hub_repo_with_coops_folder_reads_through_the_same_loader(coop_root, tmp_path, packed):
    """The folder as a zip archive at the repo root (as re-hosting repos pack it) or as plain files."""
    root, split = coop_root
    files = {str(p.relative_to(root)): p.read_bytes() for p in (root / "oxford_pets").rglob("*") if p.is_file()}
    if packed:
        archive = shutil.make_archive(str(tmp_path / "oxford_pets"), "zip", root, "oxford_pets")
        files = {"oxford_pets.zip": Path(archive).read_bytes()}
    with FakeHub() as hub:
        hub.repos["someone/prompt_learning_dataset"] = Repo(files={"README.md": b"card", **files})
        hub.repos["someone/prompt_learning_dataset"].commits.append(("a" * 40, "upload"))
        env = hub_env(tmp_path, hub.endpoint, token=None)
        result = run([sys.executable, "-c", HUB_LOAD, "hub:someone/prompt_learning_dataset"], env)
        missing = run([sys.executable, "-c", HUB_LOAD.replace("oxford_pets", "dtd"),
                       "hub:someone/prompt_learning_dataset"], env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {name: [label for _, label, _ in rows] for name, rows in split.items()} | {"names": PETS}
    assert missing.returncode != 0 and "has no dtd/ folder and no archive of it" in missing.stderr


# ---- CoOp's few-shot draw -----------------------------------------------------------------------------------------


class Datum:
    def __init__(self, impath: str, label: int) -> None:
        self.impath, self.label = impath, label


def dassl_generate_fewshot_dataset(data_source: list[Datum], num_shots: int) -> list[Datum]:
    """Dassl's ``DatasetBase.generate_fewshot_dataset`` (one data source, repeat=False), transcribed."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for _, items in tracker.items():
        dataset.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return dataset


def coop_draw(split: dict, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """What CoOp's OxfordPets does after ``set_random_seed(seed)``: train, then val with min(shots, 4)."""
    random.seed(seed)
    train = [Datum(p, y) for p, y, _ in split["train"]]
    val = [Datum(p, y) for p, y, _ in split["val"]]
    train = dassl_generate_fewshot_dataset(train, num_shots=shots)
    val = dassl_generate_fewshot_dataset(val, num_shots=min(shots, 4))
    return [d.impath for d in train], [d.impath for d in val]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 3, 8])
def test_coop_sampling_draws_dassls_images(coop_root, seed, shots):
    _, split = coop_root
    train, val = coop_few_shot_split([y for _, y, _ in split["train"]], shots, seed, [y for _, y, _ in split["val"]])
    expected_train, expected_val = coop_draw(split, shots, seed)
    assert [split["train"][row][0] for row in train] == expected_train  # a class smaller than shots is kept whole
    assert [split["val"][row][0] for row in val] == expected_val


def test_few_shot_sets_with_coops_sampler_and_validation_split(coop_root, tmp_path):
    root, split = coop_root
    suite = load_suite_dataset("oxford_pets", coop_root=str(root))
    train, val = few_shot_sets(suite.splits["train"], SHOTS, 2, run_dir=str(tmp_path), sampling="coop",
                               val_pool=suite.splits["val"])  # fmt: skip
    expected_train, expected_val = coop_draw(split, SHOTS, 2)
    number = lambda path: int(path.rsplit("_", 1)[1][:-4])  # noqa: E731
    assert [pixel(i) for i in train["image"]] == [number(p) for p in expected_train]
    assert [pixel(i) for i in val["image"]] == [number(p) for p in expected_val]
    saved = FewShotSplit.load(str(tmp_path))
    assert saved.sampling == "coop" and saved.val_pool_fingerprint == suite.splits["val"]._fingerprint
    # without a validation split (a Hub copy, ImageNet) the validation rows come from the training rows left
    rows, val_rows = coop_few_shot_split([2, 2, 2, 0, 0, 0, 0, 1], 2, 5)
    assert not set(rows) & set(val_rows) and len(val_rows) == 3  # class 1 has one row, used for training


def test_the_train_recipe_draws_coops_images_then_keeps_the_base_classes(coop_root, tmp_path):
    root, split = coop_root
    script = ScriptArguments(model_name_or_path="unused", benchmark="oxford_pets", data_root=str(root), shots=SHOTS,
                             base_to_novel=True, fewshot_sampling="coop")  # fmt: skip
    config = CMPConfig(output_dir=str(tmp_path), seed=3, use_cpu=True, report_to="none")
    data = load_run_data(script, config)
    expected_train, expected_val = coop_draw(split, SHOTS, 3)  # CoOp: the draw, then subsample_classes("base")
    base = lambda paths: [p for p in paths if PETS.index(p.split("/")[1].rsplit("_", 1)[0]) < 3]  # noqa: E731
    number = lambda path: int(path.rsplit("_", 1)[1][:-4])  # noqa: E731
    assert [pixel(i) for i in data.train["image"]] == [number(p) for p in base(expected_train)]
    assert [pixel(i) for i in data.evals["val"]["image"]] == [number(p) for p in base(expected_val)]
    assert data.class_names == PETS[:3] and data.coop_test == {"oxford_pets": True}
    assert np.unique(data.transfers["test_novel"][0]["label"]).tolist() == [0, 1]

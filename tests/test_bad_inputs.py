"""Bad inputs a new user feeds cmp_hf: each gets an error that names the problem and the fix, raised before any
training (or is handled correctly, where a correct handling exists). One test id per bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Image, Value
from helpers import ROOT, flip_last_byte, quickstart_config
from hub_server import FakeHub
from PIL import Image as PILImage
from transformers import CLIPModel, CLIPProcessor

from cmp_hf import CalibratedCLIP, CMPConfig, CMPTrainer, PromptConfig, PromptTunedCLIP
from cmp_hf.base_model import check_clip_source
from cmp_hf.data import ImageFeatureCache, to_rgb
from cmp_hf.data.feature_cache import FEATURES_COLUMN
from cmp_hf.scripts.config_file import parse_config_and_overrides, read_config
from cmp_hf.scripts.train import make_parser
from cmp_hf.scripts.train import run as run_recipe


def config(tmp_path, **overrides) -> CMPConfig:
    options = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        max_steps=1, n_ctx=2, image_feature_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return CMPConfig(**{**options, **overrides})


def with_labels(dataset: Dataset, labels: list) -> Dataset:
    return dataset.remove_columns("label").add_column("label", labels)


# ---- 5. silently wrong data: now an error before the model is loaded ---------------------------------------------


@pytest.mark.parametrize(
    "case, make, message",
    [
        ("float_labels", lambda ds: with_labels(ds, [i % 4 + 0.5 for i in range(len(ds))]), "non-integer values"),
        ("string_labels", lambda ds: with_labels(ds, ["red"] * len(ds)), "class_encode_column"),
        ("one_class", lambda ds: ds.filter(lambda row: row["label"] == 2), "holds a single class"),
        ("empty_train_set", lambda ds: ds.select([]), "train_dataset is empty"),
    ],
)
def test_bad_training_labels(case, make, message, tmp_path, train_set, class_names):
    with pytest.raises(ValueError, match=message):
        CMPTrainer("/nonexistent/clip", config(tmp_path), train_dataset=make(train_set), class_names=class_names)


def test_image_column_pointing_at_labels(tmp_path, train_set):
    with pytest.raises(ValueError, match="image column 'label' holds ClassLabel.*set image_column"):
        CMPTrainer("/nonexistent/clip", config(tmp_path, image_column="label"), train_dataset=train_set)


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("class_names_shorter", {"class_names": ["red", "green"], "base_to_novel": True}, "there are 2 class names"),
        ("shots_zero", {"shots": 0}, "shots is 0: set it to the number of training examples per class"),
    ],
)
def test_bad_recipe_data_options(case, overrides, message, tmp_path, testbed):
    # disable_tqdm false: the recipe's console set-up is process-wide, and later tests expect the bars on
    path = quickstart_config(testbed, tmp_path, output_dir=str(tmp_path / "run"), disable_tqdm=False, **overrides)
    with pytest.raises(ValueError, match=message):
        run_recipe([str(path)])
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# ---- images: float arrays refused, paths loaded, unreadable rows named ------------------------------------------


@pytest.fixture
def classifier(tiny_clip_dir, class_names) -> CalibratedCLIP:
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    prompt = PromptConfig(class_names=class_names, n_ctx=2)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), processor.tokenizer, prompt)
    return CalibratedCLIP(model, processor.image_processor)


def probe(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "case, images, error, message",
    [
        ("float_array_0_1", [probe() / 255.0], ValueError, r"dtype float64: pass uint8 pixels in \[0, 255\]"),
        (
            "float_pil_image",
            [PILImage.fromarray((probe()[..., 0] / 255.0).astype(np.float32))],
            ValueError,
            "mode 'F'",
        ),
        ("empty_list", [], ValueError, "No images given"),
        ("tensor_3d", torch.zeros(3, 32, 32), ValueError, r"must be \(N, 3, H, W\).*unsqueeze\(0\)"),
        ("none", None, TypeError, "images is None"),
        ("channels_first_array", [np.zeros((3, 32, 32), np.uint8)], ValueError, "np.moveaxis"),
    ],
)
def test_bad_images_to_predict_proba(case, images, error, message, classifier):
    with pytest.raises(error, match=message):
        classifier.predict_proba(images)


def test_image_paths_are_loaded(classifier, tmp_path):
    images = [PILImage.fromarray(probe(seed)) for seed in range(3)]
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    np.testing.assert_array_equal(classifier.predict_proba(paths), classifier.predict_proba(images))
    np.testing.assert_array_equal(classifier.predict_proba(paths[0]), classifier.predict_proba(images[:1]))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        classifier.predict_proba(str(tmp_path / "missing.png"))


def test_image_column_of_paths_is_cached_like_the_images(classifier, train_set, tmp_path):
    paths = []
    for i, row in enumerate(train_set):
        row["image"].save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    as_paths = Dataset.from_dict({"image": paths, "label": train_set["label"]})
    cache = ImageFeatureCache(classifier.model, classifier.image_processor, str(tmp_path / "cache"))
    from_paths = np.array(cache.features(as_paths).with_format("numpy")[FEATURES_COLUMN])
    from_images = np.array(cache.features(train_set).with_format("numpy")[FEATURES_COLUMN])
    np.testing.assert_array_equal(from_paths, from_images)


def test_corrupt_image_names_its_row_and_column(classifier, train_set, tmp_path):
    images = [{"bytes": row["image"].tobytes() if i == 5 else None, "path": None} for i, row in enumerate(train_set)]
    for i, row in enumerate(train_set):
        if i != 5:
            row["image"].save(tmp_path / f"{i}.png")
            images[i] = {"bytes": (tmp_path / f"{i}.png").read_bytes(), "path": None}
    features = Features({"image": Image(), "label": ClassLabel(names=["red", "green", "blue", "yellow"])})
    broken = Dataset.from_dict({"image": images, "label": train_set["label"]}, features=features)
    cache = ImageFeatureCache(classifier.model, classifier.image_processor, str(tmp_path / "cache"), batch_size=4)
    with pytest.raises(ValueError, match="Cannot read the image in row 5 of column 'image'.*fix or drop that row"):
        cache.features(broken)


def test_to_rgb_keeps_integer_arrays():
    grey = np.arange(64, dtype=np.int64).reshape(8, 8)
    assert np.array_equal(np.asarray(to_rgb(grey))[..., 0], grey)


# ---- 8. configuration mistakes ------------------------------------------------------------------------------------


def test_string_cmp_lambda(tmp_path):
    with pytest.raises(TypeError, match="cmp_lambda must be a number, got the string '0.5': pass cmp_lambda=0.5"):
        config(tmp_path, cmp_lambda="0.5")


@pytest.mark.parametrize("case, text", [("yaml_list", "- a\n- b\n"), ("yaml_bare_string", "just a string\n")])
def test_yaml_that_is_not_a_mapping(case, text, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match="not a mapping: write one `option: value` per line"):
        read_config(str(tmp_path / "c.yaml"))


def test_config_file_with_another_extension(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"seed": 3}))
    with pytest.raises(ValueError, match="'.*c.json' is not a YAML config file.*rename it to .yaml"):
        parse_config_and_overrides(make_parser(), [str(tmp_path / "c.json")])
    (tmp_path / "c.yaml").write_text(json.dumps({"seed": 3, "output_dir": str(tmp_path)}))  # the advice works
    assert parse_config_and_overrides(make_parser(), [str(tmp_path / "c.yaml")])[1].seed == 3


def prompt_dir(tmp_path, clip_dir) -> Path:
    processor = CLIPProcessor.from_pretrained(clip_dir)
    prompt = PromptConfig(class_names=["red", "green"], n_ctx=2)
    PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(clip_dir), processor.tokenizer, prompt).save_pretrained(
        tmp_path / "prompt"
    )
    return tmp_path / "prompt"


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing_absolute_path", FileNotFoundError, "not found: there is no such directory and it is not a valid"),
        ("missing_relative_path_offline", ConnectionError, "no such local directory, and no network"),
        ("empty_dir", ValueError, "not a CLIP: the directory is empty"),
        ("bert_dir", ValueError, "is not a CLIP: its config.json says model_type 'bert'"),
        ("prompt_dir", ValueError, "is a prompt saved by cmp_hf, not a CLIP: pass the CLIP it was trained on"),
    ],
)
def test_model_that_is_not_a_clip(case, error, message, tmp_path, tiny_clip_dir, train_set):
    name = {
        "missing_absolute_path": str(tmp_path / "no" / "clip"),
        "missing_relative_path_offline": "model_cards/no-such-clip",
        "empty_dir": str(tmp_path / "empty"),
        "bert_dir": str(tmp_path / "bert"),
        "prompt_dir": str(tmp_path / "prompt"),
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if case == "prompt_dir":
        prompt_dir(tmp_path, tiny_clip_dir)
    with pytest.raises(error, match=message):
        CMPTrainer(name, config(tmp_path), train_dataset=train_set)


HUB_CHECK = "import sys; from cmp_hf.base_model import check_clip_source; check_clip_source(sys.argv[1])"


@pytest.mark.parametrize("case, message", [("hub_id_not_found", "no such model on the Hub"),
                                           ("hub_unreachable", "no network")])  # fmt: skip
def test_hub_model_id_not_found_or_unreachable(case, message, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1")
    with FakeHub() as hub:
        env["HF_ENDPOINT"] = hub.endpoint if case == "hub_id_not_found" else "http://127.0.0.1:9"
        command = [sys.executable, "-c", HUB_CHECK, "someone/no-such-clip"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_a_real_clip_passes_the_check(tiny_clip_dir):
    check_clip_source(tiny_clip_dir)


# ---- a saved prompt: missing, corrupt or altered files are named; its base model is portable ----------------------


@pytest.mark.parametrize(
    "case, damage, error, message",
    [
        ("adapter_missing", lambda p: (p / "adapter_model.safetensors").unlink(), FileNotFoundError,
         "has no adapter_model.safetensors"),
        ("adapter_corrupt", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 5), ValueError,
         "adapter_model.safetensors is corrupt"),
        ("adapter_bytes_flipped", lambda p: flip_last_byte(p / "adapter_model.safetensors"), ValueError,
         "adapter_model.safetensors does not match the digest recorded in prompt_digest.json"),
        ("prompt_config_missing", lambda p: (p / "prompt_config.json").unlink(), FileNotFoundError,
         "has no prompt_config.json"),
        ("prompt_config_corrupt", lambda p: (p / "prompt_config.json").write_text("{not json"), ValueError,
         "prompt_config.json is corrupt"),
    ],
)  # fmt: skip
def test_damaged_prompt_files_are_named(case, damage, error, message, tmp_path, tiny_clip_dir):
    path = prompt_dir(tmp_path, tiny_clip_dir)
    PromptTunedCLIP.from_pretrained(path)  # intact, it loads
    damage(path)
    with pytest.raises(error, match=message):
        PromptTunedCLIP.from_pretrained(path)


def test_learner_weights_are_verified_too(tmp_path, tiny_clip_dir):
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    prompt = PromptConfig(class_names=["red", "green"], n_ctx=2, learner="cocoop")
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), processor.tokenizer, prompt)
    model.save_pretrained(tmp_path / "p")
    digests = json.loads((tmp_path / "p" / "prompt_digest.json").read_text())["sha256"]
    assert sorted(digests) == ["adapter_model.safetensors", "meta_net.safetensors"]
    flip_last_byte(tmp_path / "p" / "meta_net.safetensors")
    with pytest.raises(ValueError, match="meta_net.safetensors does not match the digest"):
        PromptTunedCLIP.from_pretrained(tmp_path / "p")


def test_base_model_is_recorded_absolute_and_can_be_overridden(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.chdir(Path(tiny_clip_dir).parent)
    relative = os.path.basename(tiny_clip_dir)
    processor = CLIPProcessor.from_pretrained(relative)
    prompt = PromptConfig(class_names=["red", "green"], n_ctx=2)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(relative), processor.tokenizer, prompt)
    model.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "prompt_config.json").read_text())
    assert saved["base_model_name_or_path"] == os.path.abspath(tiny_clip_dir)
    monkeypatch.chdir(tmp_path)  # another working directory: the prompt still loads
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model.eval()(pixel_values=pixels).logits
    torch.testing.assert_close(PromptTunedCLIP.from_pretrained("p")(pixel_values=pixels).logits, expected)

    saved["base_model_name_or_path"] = str(tmp_path / "moved" / "clip")  # the base moved away
    (tmp_path / "p" / "prompt_config.json").write_text(json.dumps(saved))
    with pytest.raises(FileNotFoundError, match=r"base model recorded in prompt_config.json .*moved.*base_model="):
        PromptTunedCLIP.from_pretrained("p")
    loaded = CalibratedCLIP.from_pretrained("p", base_model=tiny_clip_dir)
    torch.testing.assert_close(loaded.logits(pixels), expected)
    assert loaded.model.prompt_config.base_model_name_or_path == os.path.abspath(tiny_clip_dir)


def test_hub_id_base_is_recorded_as_it_is():
    from cmp_hf.base_model import portable_name

    assert portable_name("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"


def test_card_usage_line_names_the_absolute_directory(tmp_path, tiny_clip_dir, train_set, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = CMPTrainer(tiny_clip_dir, config(tmp_path, output_dir="relative-out"), train_dataset=train_set)
    card = trainer._model_card().text
    assert f'CalibratedCLIP.from_pretrained("{os.path.abspath("relative-out")}")' in card


def test_recipe_yaml_round_trip_still_parses(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"seed": 4, "output_dir": str(tmp_path)}))
    assert parse_config_and_overrides(make_parser(), [str(tmp_path / "c.yaml")])[1].seed == 4


def test_labels_value_feature_is_checked_too(tmp_path, train_set, class_names):
    floats = train_set.cast_column("label", Value("float32")).map(lambda row: {"label": row["label"] + 0.25})
    with pytest.raises(ValueError, match=r"non-integer values \(0.25 at row 0\)"):
        CMPTrainer("/nonexistent/clip", config(tmp_path), train_dataset=floats, class_names=class_names)


# ---- each rule lives in one place and is checked once on a path -------------------------------------------------


class Stop(Exception):
    pass


def record_calls(monkeypatch, calls: list, module, name: str) -> None:
    """Append the positional arguments of each call of ``module.name`` to ``calls`` (the call still runs)."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))


def test_the_recipe_checks_each_datasets_labels_once(tmp_path, testbed, monkeypatch):
    import cmp_hf.scripts.train as script
    import cmp_hf.trainer as trainer

    calls = []
    record_calls(monkeypatch, calls, script, "check_labels")
    record_calls(monkeypatch, calls, trainer, "check_labels")
    monkeypatch.setattr(CMPTrainer, "train", lambda *args, **kwargs: (_ for _ in ()).throw(Stop()))
    path = quickstart_config(testbed, tmp_path, output_dir=str(tmp_path / "run"), disable_tqdm=False)
    with pytest.raises(Stop):
        run_recipe([str(path)])
    # the training split before its few-shot draw (the recipe's), then what the trainer is given (its own)
    assert [call[1] for call in calls] == [
        "split 'train'", "train_dataset", "eval_dataset['val']", "eval_dataset['test']"
    ]  # fmt: skip
    fingerprints = [call[0]._fingerprint for call in calls]
    assert len(set(fingerprints)) == len(fingerprints)


def test_a_proda_prompt_passed_to_the_trainer_refuses_focal_loss(tmp_path, tiny_clip_dir, train_set, class_names):
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    prompt = PromptConfig(class_names=class_names, n_ctx=2, learner="proda", proda_num_prompts=4)
    proda = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), processor.tokenizer, prompt)
    args = config(tmp_path, focal_gamma=2.0)  # a CoOp config, which may train with focal loss
    with pytest.raises(ValueError, match="Focal loss and label smoothing cannot train"):
        CMPTrainer(proda, args, train_dataset=train_set, processing_class=processor)

"""Inputs that used to pass silently (issue "Nothing silent"): each is now an error that names the problem and the
fix, or is handled correctly. One test per case; the README's "What a bad input looks like" lists them."""

import errno
import io
import json
import os
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import flip_last_byte
from PIL import Image as PILImage
from transformers import CLIPModel, CLIPProcessor

import dev
from cmp_hf import CalibratedCLIP, CMPConfig, CMPTrainer, PromptConfig, PromptTunedCLIP, cli
from cmp_hf.atomic import OutputWriteError
from cmp_hf.constants import PROMPT_FILES
from cmp_hf.data import to_rgb
from cmp_hf.evaluation import CALIBRATION_METRIC
from cmp_hf.hub import pushed_files
from cmp_hf.metrics import calibration_metrics
from cmp_hf.scripts.config_file import parse_config_and_overrides
from cmp_hf.scripts.train import make_parser
from recipes import report


def saved_prompt(path: Path, clip_dir: str, temperature: float = 1.0) -> PromptTunedCLIP:
    processor = CLIPProcessor.from_pretrained(clip_dir)
    prompt = PromptConfig(class_names=["red", "green", "blue"], n_ctx=2)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(clip_dir), processor.tokenizer, prompt)
    with torch.no_grad():
        model.context.normal_(generator=torch.Generator().manual_seed(0))
    model.calibration.temperature = temperature
    model.save_pretrained(path)
    return model.eval()


# ---- 1. a prompt saved with a digest needs it ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, manifest, error, message",
    [
        ("digest_removed", None, FileNotFoundError, "has no prompt_digest.json, but its prompt_config.json says"),
        ("digest_empty_object", {}, ValueError, "prompt_digest.json is corrupt"),
        ("digest_lists_nothing", {"sha256": {}}, ValueError,
         "records no digest of adapter_model.safetensors, the settings"),
    ],
)  # fmt: skip
def test_lost_digest_is_an_error_even_with_damaged_weights(case, manifest, error, message, tmp_path, tiny_clip_dir):
    saved_prompt(tmp_path / "p", tiny_clip_dir)
    flip_last_byte(tmp_path / "p" / "adapter_model.safetensors")  # damaged: must not load unnoticed
    digest = tmp_path / "p" / "prompt_digest.json"
    digest.unlink() if manifest is None else digest.write_text(json.dumps(manifest))
    with pytest.raises(error, match=message) as raised:
        PromptTunedCLIP.from_pretrained(tmp_path / "p")
    assert "verify_digest=False" in str(raised.value) or case == "digest_empty_object"


def test_verify_digest_false_rescues_a_prompt_and_a_new_save_records_the_digest(tmp_path, tiny_clip_dir):
    model = saved_prompt(tmp_path / "p", tiny_clip_dir)
    (tmp_path / "p" / "prompt_digest.json").unlink()
    rescued = PromptTunedCLIP.from_pretrained(tmp_path / "p", verify_digest=False)
    torch.testing.assert_close(rescued.context, model.context)
    rescued.save_pretrained(tmp_path / "p")
    PromptTunedCLIP.from_pretrained(tmp_path / "p")  # verified again
    assert CalibratedCLIP.from_pretrained(tmp_path / "p", verify_digest=False).class_names == ["red", "green", "blue"]


def test_a_prompt_from_before_digests_is_recognised_by_its_config(tmp_path, tiny_clip_dir):
    saved_prompt(tmp_path / "p", tiny_clip_dir)
    config = json.loads((tmp_path / "p" / "prompt_config.json").read_text())
    assert config.pop("format_version") == 2
    (tmp_path / "p" / "prompt_config.json").write_text(json.dumps(config))  # as cmp_hf 0.1 wrote it
    (tmp_path / "p" / "prompt_digest.json").unlink()
    PromptTunedCLIP.from_pretrained(tmp_path / "p")


# ---- 2. the digest covers every setting that changes the logits ---------------------------------------------------


def reversed_classes(path: Path) -> None:
    config = json.loads((path / "prompt_config.json").read_text())
    config["class_names"] = config["class_names"][::-1]
    (path / "prompt_config.json").write_text(json.dumps(config))


def edited(name: str, key: str, value):
    def edit(path: Path) -> None:
        content = json.loads((path / name).read_text())
        content[key] = value
        (path / name).write_text(json.dumps(content))

    return edit


@pytest.mark.parametrize(
    "case, edit",
    [
        ("class_order_reversed", reversed_classes),
        ("template_changed", edited("prompt_config.json", "template", "a {}.")),
        ("temperature_changed", edited("calibration.json", "temperature", 0.5)),
        ("dac_added", edited("calibration.json", "dac_k", 3)),
        ("calibration_removed", lambda path: (path / "calibration.json").unlink()),
    ],
)
def test_edited_prompt_settings_are_refused(case, edit, tmp_path, tiny_clip_dir):
    saved_prompt(tmp_path / "p", tiny_clip_dir, temperature=2.0)
    PromptTunedCLIP.from_pretrained(tmp_path / "p")
    edit(tmp_path / "p")
    with pytest.raises(ValueError, match="do not match the digest recorded in prompt_digest.json.*verify_digest"):
        PromptTunedCLIP.from_pretrained(tmp_path / "p")


def test_moving_the_base_model_is_not_an_edit(tmp_path, tiny_clip_dir):
    model = saved_prompt(tmp_path / "p", tiny_clip_dir, temperature=2.0)
    edited("prompt_config.json", "base_model_name_or_path", "/elsewhere/clip")(tmp_path / "p")
    loaded = PromptTunedCLIP.from_pretrained(tmp_path / "p", base_model=tiny_clip_dir)
    features = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    torch.testing.assert_close(loaded(image_features=features).logits, model(image_features=features).logits)


# ---- 5. the calibration evaluate module validates its inputs -----------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LOGITS = np.random.default_rng(0).normal(size=(40, 3)) * 3
LABELS = np.random.default_rng(1).integers(0, 3, size=40)


def with_value(array: np.ndarray, row: int, value: float) -> np.ndarray:
    array = array.astype(np.float64).copy()
    array.flat[row * (array.shape[1] if array.ndim == 2 else 1)] = value
    return array


@pytest.mark.parametrize(
    "case, predictions, references, options, message",
    [
        ("nan_logit", with_value(LOGITS, 3, np.nan), LABELS, {}, r"NaN or infinite values in 1 rows \(first: \[3\]\)"),
        ("inf_logit", with_value(LOGITS, 5, np.inf), LABELS, {}, r"NaN or infinite values in 1 rows \(first: \[5\]\)"),
        ("probabilities_scaled", softmax(LOGITS) * 0.8, LABELS, {}, "all in .0, 1. but row 0 sums to 0.8, not 1"),
        ("probabilities_told_but_scaled", softmax(LOGITS) * 0.8, LABELS, {"from_logits": False},
         "from_logits=False, but row 0 sums to 0.8"),
        ("probabilities_told_but_logits", LOGITS, LABELS, {"from_logits": False}, "from_logits=False, but row 0"),
        ("label_one_and_a_half", softmax(LOGITS), with_value(LABELS, 2, 1.5), {}, "row 2 holds 1.5"),
    ],
)  # fmt: skip
def test_calibration_module_refuses_what_it_cannot_read(case, predictions, references, options, message):
    module = evaluate.load(CALIBRATION_METRIC)
    with pytest.raises(ValueError, match=message):
        module.compute(predictions=predictions, references=references, **options)


def test_calibration_module_reads_unambiguous_scores_as_before():
    module = evaluate.load(CALIBRATION_METRIC)
    from_logits = module.compute(predictions=LOGITS, references=LABELS)
    assert module.compute(predictions=softmax(LOGITS), references=LABELS) == pytest.approx(from_logits, abs=1e-9)
    scaled = softmax(LOGITS) * 0.8  # logits in [0, 1] are taken as such when told
    expected = calibration_metrics(LABELS, logits=scaled)["ece"] * 100
    told = module.compute(predictions=scaled, references=LABELS, from_logits=True)
    assert told["ece_pct"] == pytest.approx(expected)


# ---- 6. a run that would train nothing; NaN pixels --------------------------------------------------------------


@pytest.mark.parametrize("epochs", [-1, 0])
def test_no_training_step_is_refused(epochs, tmp_path):
    with pytest.raises(ValueError, match=f"num_train_epochs is {epochs} and max_steps is unset: training would take"):
        CMPConfig(output_dir=str(tmp_path), num_train_epochs=epochs, use_cpu=True, report_to="none")
    argv = ["--output_dir", str(tmp_path), "--num_train_epochs", str(epochs), "--model_name_or_path", "x"]
    with pytest.raises(ValueError, match="training would take no step"):
        parse_config_and_overrides(make_parser(), argv)
    assert CMPConfig(output_dir=str(tmp_path), num_train_epochs=0, max_steps=5, use_cpu=True).max_steps == 5


def test_nan_pixels_are_refused_by_predict_proba(tmp_path, tiny_clip_dir):
    saved_prompt(tmp_path / "p", tiny_clip_dir)
    model = CalibratedCLIP.from_pretrained(tmp_path / "p")
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert np.isfinite(model.predict_proba(pixels)).all()
    pixels[2, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 images \(first: \[2\]\)"):
        model.predict_proba(pixels)


# ---- 4. 16-bit and 32-bit integer images --------------------------------------------------------------------------


def grey_levels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)


def test_16_bit_greyscale_is_scaled_by_its_range(tmp_path, tiny_clip_dir):
    saved_prompt(tmp_path / "p", tiny_clip_dir)
    model = CalibratedCLIP.from_pretrained(tmp_path / "p")
    grey = grey_levels()
    PILImage.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit PNG: mode I;16
    PILImage.fromarray(grey.astype(np.int32)).save(tmp_path / "small_values.tif")  # mode I, values in [0, 255]
    assert PILImage.open(tmp_path / "deep.png").mode == "I;16"
    eight_bit = model.predict_proba(PILImage.fromarray(grey))
    np.testing.assert_array_equal(model.predict_proba(str(tmp_path / "deep.png")), eight_bit)
    np.testing.assert_array_equal(model.predict_proba(PILImage.open(tmp_path / "deep.png")), eight_bit)
    np.testing.assert_array_equal(model.predict_proba(str(tmp_path / "small_values.tif")), eight_bit)
    np.testing.assert_array_equal(np.asarray(to_rgb(PILImage.open(tmp_path / "deep.png")))[..., 0], grey)


def test_32_bit_image_of_unknown_range_is_refused(tmp_path):
    PILImage.fromarray(grey_levels().astype(np.int32) * 257).save(tmp_path / "wide.tif")
    assert PILImage.open(tmp_path / "wide.tif").mode == "I"
    with pytest.raises(ValueError, match=r"32-bit integer image \(PIL mode 'I'\) with values in \[0, 65535\]"):
        to_rgb(str(tmp_path / "wide.tif"))


# ---- 3. overwriting a run replaces all of it ---------------------------------------------------------------------


def test_overwrite_removes_the_replaced_runs_outputs(tmp_path, tiny_clip_dir, train_set):
    out = tmp_path / "out"
    saved_prompt(out, tiny_clip_dir, temperature=2.0)
    old = {"metrics.json": "{}", "run.json": "{}", "README.md": "old card", "notes.txt": "mine",
           "eval/old_set/metrics.json": "{}", "checkpoint-7/trainer_state.json": "{}"}  # fmt: skip
    for name, text in old.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    args = CMPConfig(output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                     max_steps=1, n_ctx=2, image_feature_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        CMPTrainer(tiny_clip_dir, args, train_dataset=train_set).train()
    args.overwrite_output_dir = True
    trainer = CMPTrainer(tiny_clip_dir, args, train_dataset=train_set, eval_dataset={"new_set": train_set})
    trainer.train()
    left = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert left == [".cmp_hf.lock", "notes.txt"]  # this run's lock; the old prompt, card, reports... are gone
    trainer.evaluate()
    trainer.save_model()
    assert [name for name in pushed_files(out) if name.startswith("eval/")] == ["eval/new_set/metrics.json",
        "eval/new_set/reliability.png", "eval/new_set/risk_coverage.png"]  # fmt: skip
    assert not (out / "calibration.json").exists()  # the new prompt is uncalibrated


# ---- 7. the report says which runs its tables lack -----------------------------------------------------------------


def test_report_names_the_runs_missing_from_its_tables(tmp_path, capsys):
    info = dict(dataset="dtd", setting="all_8shot", seed=1, cmp_form="log_ratio", cmp_competitors="all",
                prompt_learner="coop", kgcoop_weight=0.0, cmp_lambda=1.0)  # fmt: skip
    done = tmp_path / "few_shot/dtd/coop/cmp/seed1"
    done.mkdir(parents=True)
    (done / "run.json").write_text(json.dumps(info))
    (done / "metrics.json").write_text(json.dumps({"test": {"accuracy_pct": 50.0, "ece_pct": 5.0}}))
    for name in PROMPT_FILES:  # a finished run: its prompt, run.json and metrics.json
        (done / name).write_text("{}")
    failed = tmp_path / "few_shot/dtd/coop/cmp/seed2"
    failed.mkdir()
    (failed / "sweep_job.json").write_text(json.dumps({"log": "/logs/2.err", "error": "ValueError: bad shots"}))
    killed = tmp_path / "few_shot/dtd/coop/cmp/seed3"
    (killed / "checkpoint-40").mkdir(parents=True)  # a run started outside a sweep, killed after a checkpoint
    markdown = report.main([str(tmp_path)])
    assert "## Runs not in these tables: 2 not finished" in markdown
    assert "| few_shot/dtd/coop/cmp/seed2 | failed | /logs/2.err | ValueError: bad shots |" in markdown
    assert "| few_shot/dtd/coop/cmp/seed3 | incomplete | - | - |" in markdown
    assert "50.00 +- 0.00 (n=1)" in markdown and "seed1 |" not in markdown
    assert "Runs not in these tables" in capsys.readouterr().out
    (done / "metrics.json").unlink()  # no finished run at all: the error lists the unfinished ones too
    with pytest.raises(SystemExit, match="(?s)No runs with metrics.json.*seed1 \\| incomplete.*seed2 \\| failed"):
        report.main([str(tmp_path)])


# ---- partly clear before: now clear ------------------------------------------------------------------------------


def with_truncated_image(train_set, row: int) -> Dataset:
    images = []
    for i, example in enumerate(train_set):
        buffer = io.BytesIO()
        example["image"].save(buffer, format="PNG")
        data = buffer.getvalue()
        images.append({"bytes": data[: len(data) // 2] if i == row else data, "path": None})
    return Dataset.from_dict({"image": images, "label": train_set["label"]}, features=train_set.features)


def test_truncated_image_without_the_cache_names_its_row(tmp_path, tiny_clip_dir, train_set):
    broken = with_truncated_image(train_set, row=5)
    args = CMPConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                     disable_tqdm=True, max_steps=1, n_ctx=2, per_device_train_batch_size=len(train_set),
                     cache_image_features=False)  # fmt: skip
    trainer = CMPTrainer(tiny_clip_dir, args, train_dataset=broken)
    message = r"Cannot read the image in row 5 of column 'image' \(OSError: image file is truncated.*fix or drop"
    with pytest.raises(ValueError, match=message):
        trainer.train()
    with pytest.raises(ValueError, match=message):
        trainer.evaluate(broken)
    args.augment = True  # the augmented path decodes in a transform: named too
    with pytest.raises(ValueError, match=message):
        CMPTrainer(tiny_clip_dir, args, train_dataset=broken).train()
    trained = CMPTrainer(tiny_clip_dir, args, train_dataset=train_set)  # intact images train as before
    trained.train()
    assert trained.state.global_step == 1


@pytest.mark.parametrize(
    "case, path, error, message",
    [
        ("relative_path_missing", "./no/such/prompt", FileNotFoundError,
         "Prompt './no/such/prompt' not found: there is no such directory and it is not a valid Hub repo id"),
        ("hub_id_offline", "someone/no-such-prompt", ConnectionError,
         "no such local directory, and no network to fetch it from the Hub"),
        ("a_file", "file.txt", NotADirectoryError, "is a file, not a prompt directory"),
    ],
)  # fmt: skip
def test_prompt_that_cannot_be_found(case, path, error, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a prompt")
    with pytest.raises(error, match=message):
        PromptTunedCLIP.from_pretrained(path)
    with pytest.raises(error, match=message):
        CalibratedCLIP.from_pretrained(path)


def test_saving_over_a_directory_or_into_a_file_names_the_path(tmp_path, tiny_clip_dir):
    model = saved_prompt(tmp_path / "p", tiny_clip_dir)
    before = (tmp_path / "p" / "prompt_config.json").read_bytes()
    (tmp_path / "p" / "adapter_model.safetensors").unlink()
    (tmp_path / "p" / "adapter_model.safetensors").mkdir()
    with pytest.raises(OutputWriteError, match=r"Cannot write .*p/adapter_model.safetensors \(Is a directory\): a "
                       "directory has that name"):  # fmt: skip
        model.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "prompt_config.json").read_bytes() == before  # nothing was half-replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputWriteError, match=r"Cannot write .*file .*a file stands where a directory is needed"):
        model.save_pretrained(tmp_path / "file")


def test_output_dir_that_cannot_be_written_fails_before_training(tmp_path, tiny_clip_dir, train_set, monkeypatch):
    (tmp_path / "file").write_text("x")
    args = CMPConfig(output_dir=str(tmp_path / "file"), use_cpu=True, report_to="none", save_strategy="no",
                     disable_tqdm=True, max_steps=1, n_ctx=2,
                     image_feature_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(OutputWriteError, match=r"Cannot write .*file \(Not a directory\)"):
        CMPTrainer(tiny_clip_dir, args, train_dataset=train_set)  # before the image features are encoded
    assert not (tmp_path / "cache").exists()
    args.output_dir = str(tmp_path / "full")
    trainer = CMPTrainer(tiny_clip_dir, args, train_dataset=train_set)

    def disk_full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # what a full disk does to the probe write
    with pytest.raises(OutputWriteError, match=r"Cannot write .*full \(No space left on device\): the disk is full"):
        trainer.train()  # (the disk filled up after the trainer was made): before the first step
    assert trainer.state.global_step == 0
    assert not [name for name in os.listdir(tmp_path / "full") if name.startswith(".cmp_hf-staging")]


def test_cli_names_an_unknown_command_and_a_mistyped_option(capsys):
    with pytest.raises(SystemExit, match="cmp-hf: unknown command 'trian': use one of train, push."):
        cli.main(["trian"])
    with pytest.raises(ValueError, match=r"Unknown option --cmp_lamda \(did you mean --cmp_lambda"):
        parse_config_and_overrides(make_parser(), ["--output_dir", "x", "--cmp_lamda", "0.5"])
    assert capsys.readouterr().out == ""  # no page of usage first
    parse_config_and_overrides(make_parser(), ["--output_dir", "x", "--cmp_lambda", "0.5", "--seed=3"])


def test_kgcoop_as_a_learner_points_at_kgcoop_weight(tmp_path):
    with pytest.raises(
        ValueError, match="Unknown prompt learner 'kgcoop'.*keep prompt_learner coop.*set kgcoop_weight"
    ):
        CMPConfig(output_dir=str(tmp_path), prompt_learner="kgcoop")


def test_quickstart_run_again_replaces_its_output_and_says_so(tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(dev, "run", lambda *command: commands.append([str(c) for c in command]))
    monkeypatch.setattr(dev, "QUICKSTART_OUTPUT", tmp_path / "build" / "quickstart" / "prompt")
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    dev.quickstart([])
    assert commands[-1][-1] == "recipes/configs/quickstart.yaml" and capsys.readouterr().out == ""
    (tmp_path / "build" / "quickstart" / "prompt").mkdir(parents=True)
    (tmp_path / "build" / "quickstart" / "prompt" / "metrics.json").write_text("{}")
    dev.quickstart(["--seed", "2"])
    assert commands[-1][-5:] == ["recipes/configs/quickstart.yaml", "--overwrite_output_dir", "true", "--seed", "2"]
    assert "build/quickstart/prompt holds the last quickstart run: replacing it" in capsys.readouterr().out
    dev.quickstart(["--output_dir", "elsewhere"])  # another directory: nothing to replace
    assert commands[-1][-3:] == ["recipes/configs/quickstart.yaml", "--output_dir", "elsewhere"]

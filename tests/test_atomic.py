"""Nothing half-written, nothing NaN saved as if trained: atomic outputs and non-finite losses and weights."""

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import CLIPConfig

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.atomic import STAGING_PREFIX, save_safetensors, staged_directory, write_json, write_text
from cmp_hf.constants import CALIBRATION_NAME
from cmp_hf.data.collator import ImageFeatureCollator
from cmp_hf.eval_report import EvalReport


def leftovers(directory) -> list[str]:
    return [path for path, _, _ in os.walk(directory) if STAGING_PREFIX in path] + [
        name for _, _, files in os.walk(directory) for name in files if name.startswith(STAGING_PREFIX)
    ]


def test_a_failed_json_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"ece": 1.0})
    with pytest.raises(ValueError, match="Out of range float values"):
        write_json(path, {"ece": math.nan}, allow_nan=False)
    assert json.loads(path.read_text()) == {"ece": 1.0} and not leftovers(tmp_path)


def test_a_nan_eval_report_writes_no_metrics_file(tmp_path):
    logits, labels = np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 1])
    report = EvalReport.from_logits("val", logits, labels)
    report.metrics["nll"] = math.nan  # what a NaN prompt gave: json.dump used to stop mid-file (75 bytes)
    with pytest.raises(ValueError):
        report.save(tmp_path)
    assert not (tmp_path / "eval" / "val" / "metrics.json").exists() and not leftovers(tmp_path)


def test_a_staged_directory_changes_nothing_when_the_block_fails(tmp_path):
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(RuntimeError), staged_directory(tmp_path) as staging:
        (tmp_path / "sub").mkdir()
        Path(staging, "a.json").write_text("new")
        raise RuntimeError("failed half-way")
    assert (tmp_path / "a.json").read_text() == "old" and not leftovers(tmp_path)
    with staged_directory(tmp_path) as staging:
        os.makedirs(os.path.join(staging, "eval", "test"))
        Path(staging, "eval", "test", "m.json").write_text("1")
    assert (tmp_path / "eval" / "test" / "m.json").read_text() == "1" and not leftovers(tmp_path)


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    (tmp_path / "plain.txt").write_text("x")  # open() under this process's umask
    write_text(tmp_path / "atomic.txt", "x")
    write_json(tmp_path / "atomic.json", {"a": 1})
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == plain  # not mkstemp's owner-only 0600
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == plain


def test_temporary_files_stay_on_the_target_filesystem(tmp_path, monkeypatch):
    """An output dir on its own filesystem (NFS, cluster scratch): a rename from anywhere outside it fails with
    EXDEV, as the kernel's would, so every temporary file must be made inside the target's directory."""
    mount = tmp_path / "scratch"
    rename = os.replace

    def replace_within_mount(src, dst):
        if not all(Path(p).resolve().is_relative_to(mount.resolve()) for p in (src, dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", src)
        rename(src, dst)

    monkeypatch.setattr(os, "replace", replace_within_mount)
    target = mount / "run" / "eval"
    write_text(target / "a.txt", "x")
    write_json(target / "b.json", {"a": 1})
    save_safetensors({"w": torch.ones(2)}, target / "c.safetensors")
    with staged_directory(target / "prompt") as staging:
        Path(staging, "d.txt").write_text("y")
    assert (target / "a.txt").read_text() == "x" and json.loads((target / "b.json").read_text()) == {"a": 1}
    assert (target / "prompt" / "d.txt").read_text() == "y" and not leftovers(tmp_path)
    with pytest.raises(OSError, match="cross-device"):  # the simulated mount does refuse outside renames
        os.replace(tmp_path / "x", target / "x")


def make_config(tmp_path, **overrides) -> CMPConfig:
    options = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        n_ctx=4, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=3, learning_rate=0.05,
    )  # fmt: skip
    return CMPConfig(**{**options, **overrides})


def test_a_failed_prompt_save_keeps_the_previous_prompt(tmp_path, tiny_clip_dir, train_set, monkeypatch):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set)
    trainer.save_model()
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("adapter_model.safetensors", "prompt_config.json")}
    with torch.no_grad():  # a different prompt, whose save fails after peft wrote its adapter
        trainer.model.context.add_(1.0)
    monkeypatch.setattr(type(trainer.model.prompt_config), "save_pretrained", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.save_model()
    assert {name: (out / name).read_bytes() for name in before} == before and not leftovers(out)


@pytest.mark.parametrize("field", ["cmp_lambda", "mbls_weight", "focal_gamma", "kgcoop_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_weights_are_rejected(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"Loss weights must be finite numbers, got \{{'{field}': {value}\}}"):
        make_config(tmp_path, **{field: value})


def feature_set(tiny_clip_dir: str, bad_row: int | None) -> Dataset:
    dim = CLIPConfig.from_pretrained(tiny_clip_dir).projection_dim
    features = torch.nn.functional.normalize(torch.randn(8, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    if bad_row is not None:
        features[bad_row] = math.nan
    return Dataset.from_dict({"image_features": features.numpy(), "label": [0, 1, 2, 3] * 2})


def feature_trainer(tmp_path, tiny_clip_dir, class_names, train, **overrides) -> CMPTrainer:
    return CMPTrainer(
        model=tiny_clip_dir, args=make_config(tmp_path, **overrides), train_dataset=train, class_names=class_names,
        data_collator=ImageFeatureCollator("label"),
    )  # fmt: skip


def test_training_stops_at_the_first_non_finite_loss_naming_step_and_term(tmp_path, tiny_clip_dir, class_names):
    trainer = feature_trainer(tmp_path, tiny_clip_dir, class_names, feature_set(tiny_clip_dir, bad_row=5))
    start = trainer.model.context.detach().clone()
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert message.startswith("Non-finite training loss at step 1 (epoch 0.00): ce = nan;")
    assert "the batch's images hold NaN or infinite values (rows [" in message
    assert "check the dataset's image column" in message
    assert torch.equal(trainer.model.context.detach(), start)  # the NaN batch never reached the prompt
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # finite inputs, a step size that blows the prompt up: the loss of step 2 is the first non-finite one
    exploding = feature_trainer(
        tmp_path, tiny_clip_dir, class_names, feature_set(tiny_clip_dir, None), learning_rate=1e38
    )
    with pytest.raises(FloatingPointError, match=r"at step 2 .*the inputs are finite: lower learning_rate"):
        exploding.train()


def test_evaluating_non_finite_images_names_the_set_and_rows(tmp_path, tiny_clip_dir, class_names):
    trainer = feature_trainer(tmp_path, tiny_clip_dir, class_names, feature_set(tiny_clip_dir, None))
    with pytest.raises(ValueError, match=r"Eval set 'test' gives non-finite logits for 1 rows \(first: \[3\]\)"):
        trainer.evaluate({"test": feature_set(tiny_clip_dir, bad_row=3)})
    assert "test" not in trainer.eval_reports


def test_saving_an_uncalibrated_prompt_removes_a_stale_calibration(tmp_path, tiny_clip_dir, train_set):
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path), train_dataset=train_set)
    trainer.model.calibration.temperature = 1.5
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / CALIBRATION_NAME).read_text())["temperature"] == 1.5
    trainer.model.calibration.temperature = 1.0  # the same directory, now an uncalibrated prompt
    trainer.save_model()
    assert not (out / CALIBRATION_NAME).exists() and not leftovers(out)

"""A run's output directory: resuming a run where it stopped, refusing checkpoints that are not its own, and
never letting a second run overwrite a finished one or write beside a running one."""

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, quickstart_config
from safetensors.torch import load_file

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.constants import OUTPUT_DIR_LOCK_NAME
from cmp_hf.runs import (
    checkpoint_to_resume,
    finished_run_files,
    last_checkpoint,
    lock_output_dir,
    output_dir_of_run,
    unlock_output_dir,
)
from cmp_hf.scripts import train
from cmp_hf.scripts.config_file import parse_config_and_overrides

RESUMABLE = dict(shots=4, max_steps=240, save_strategy="steps", save_steps=20, per_device_train_batch_size=4)


def recipe(config: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "recipes/train.py"), str(config), *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-5000:]
    return stdout


@pytest.mark.slow
def test_recipe_resumes_a_killed_run_to_the_uninterrupted_prompt(tmp_path, testbed):
    config = quickstart_config(testbed, tmp_path, **RESUMABLE)
    finish(recipe(config, "--output_dir", str(tmp_path / "uninterrupted")))

    killed = tmp_path / "killed"
    process = recipe(config, "--output_dir", str(killed))
    while not (killed / "checkpoint-20" / "trainer_state.json").exists():  # written last into a checkpoint
        assert process.poll() is None, process.communicate()[1][-5000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()  # it died mid-training, after its first checkpoint
    stopped_at = int(Path(last_checkpoint(str(killed))).name.removeprefix("checkpoint-"))
    assert 20 <= stopped_at < 240

    stdout = finish(recipe(config, "--output_dir", str(killed), "--resume_from_checkpoint", "true"))
    assert f"Resuming from {killed / f'checkpoint-{stopped_at}'} (step {stopped_at}), not from step 0." in stdout
    expected = load_file(tmp_path / "uninterrupted" / "adapter_model.safetensors")
    resumed = load_file(killed / "adapter_model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), (name, (resumed[name] - tensor).abs().max())


def small_run(tmp_path, tiny_clip_dir, train_set, **overrides) -> CMPTrainer:
    options = dict(
        output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", disable_tqdm=True, max_steps=4,
        per_device_train_batch_size=4, n_ctx=4, save_strategy="steps", save_steps=2,
        image_feature_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return CMPTrainer(model=tiny_clip_dir, args=CMPConfig(**{**options, **overrides}), train_dataset=train_set)


def test_resume_errors_say_what_is_wrong_before_training(tmp_path, tiny_clip_dir, train_set):
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint: .*nowhere does not exist"):
        small_run(tmp_path, tiny_clip_dir, train_set, resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint is true but .* holds no complete"):
        small_run(tmp_path, tiny_clip_dir, train_set, resume_from_checkpoint="true")
    small_run(tmp_path, tiny_clip_dir, train_set).train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert checkpoint_to_resume(True, str(tmp_path / "run")) == str(checkpoint)
    # another seed, another loss weight, other classes: another run's checkpoint
    with pytest.raises(ValueError, match=r"belongs to another run \(seed: 42 there, 7 here\)"):
        small_run(tmp_path, tiny_clip_dir, train_set, seed=7, resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=r"belongs to another run \(cmp_lambda: 1.0 there, 0.5 here\)"):
        small_run(tmp_path, tiny_clip_dir, train_set, cmp_lambda=0.5, resume_from_checkpoint="true")
    with pytest.raises(ValueError, match=r"belongs to another run \(n_ctx: 4 there, 2 here\)"):
        small_run(tmp_path, tiny_clip_dir, train_set, n_ctx=2).train(resume_from_checkpoint=str(checkpoint))
    # a checkpoint cut off mid-save (no trainer state yet) is skipped by true and refused by path
    cut = tmp_path / "run" / "checkpoint-6"
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"")
    assert checkpoint_to_resume("true", str(tmp_path / "run")) == str(checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-6 is not a complete Trainer checkpoint"):
        checkpoint_to_resume(str(cut), str(tmp_path / "run"))
    assert checkpoint_to_resume("false", str(tmp_path / "run")) is None


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, tiny_clip_dir, train_set):
    small_run(tmp_path, tiny_clip_dir, train_set, save_strategy="no").save_model()  # a finished prompt in run/
    saved = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"run already holds a finished run \(adapter_model.safetensors, "):
        small_run(tmp_path, tiny_clip_dir, train_set, save_strategy="no", seed=3).train()
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == saved
    small_run(tmp_path, tiny_clip_dir, train_set, save_strategy="no", overwrite_output_dir=True).train()


def test_the_last_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (2, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")  # not "checkpoint-9" > "checkpoint-10"
    assert checkpoint_to_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-10")


def test_a_run_killed_after_saving_its_prompt_is_resumed_not_refused(tmp_path, tiny_clip_dir, train_set):
    """Killed during its final evaluation: the prompt is saved, metrics.json is not. The sweep resubmits it with
    resume_from_checkpoint: true, which must finish it rather than fail on every resubmission."""
    trainer = small_run(tmp_path, tiny_clip_dir, train_set)
    trainer.train()
    trainer.save_model()
    del trainer
    gc.collect()
    output_dir = str(tmp_path / "run")
    assert finished_run_files(output_dir) and last_checkpoint(output_dir) == str(tmp_path / "run" / "checkpoint-4")
    with output_dir_of_run(output_dir, overwrite=False, resuming=True, is_main_process=True):  # the recipe's check
        pass
    small_run(tmp_path, tiny_clip_dir, train_set, resume_from_checkpoint="true").train()  # the trainer's check
    with pytest.raises(FileExistsError, match="already holds a finished run"):  # not resuming: refused
        small_run(tmp_path, tiny_clip_dir, train_set).train()


def test_a_second_recipe_run_into_a_finished_output_dir_is_refused_before_loading(tmp_path, testbed):
    config = quickstart_config(testbed, tmp_path, shots=2, num_train_epochs=1, output_dir=str(tmp_path / "run"))
    train.main(*parse_config_and_overrides(train.make_parser(), [str(config)]))
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    argv = [str(config), "--seed", "9", "--dataset_name", str(tmp_path / "no-such-data")]  # would fail if loaded
    with pytest.raises(FileExistsError, match=r"holds a finished run \(metrics.json, .*overwrite_output_dir: true"):
        train.main(*parse_config_and_overrides(train.make_parser(), argv))
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics
    assert not (tmp_path / "run" / OUTPUT_DIR_LOCK_NAME).exists()  # the finished run gave its lock back


def test_a_run_in_progress_locks_its_output_dir_and_a_dead_ones_lock_is_taken_over(
    tmp_path, tiny_clip_dir, train_set, lock_holder
):
    output_dir = tmp_path / "run"
    other = lock_holder(output_dir)
    lock = output_dir / OUTPUT_DIR_LOCK_NAME
    with pytest.raises(RuntimeError, match=rf"run is in use by another run \(pid {other.pid} on .*{lock}\)"):
        small_run(tmp_path, tiny_clip_dir, train_set).train()
    other.send_signal(signal.SIGKILL)
    other.wait()
    assert f"pid {other.pid} " in lock.read_text()  # a killed run leaves its lock file behind ...
    trainer = small_run(tmp_path, tiny_clip_dir, train_set)
    trainer.train()  # ... which the next run takes over
    assert f"pid {os.getpid()} " in lock.read_text()
    lock_output_dir(str(output_dir))  # re-entrant within a process: the trainer's hold and this one
    unlock_output_dir(str(output_dir))
    assert lock.exists()
    del trainer
    gc.collect()  # the trainer's hold ends with it
    assert not lock.exists()

"""A run's output directory: resuming a run where it stopped, refusing checkpoints that are not its own, and
never letting a second run overwrite a finished one or write beside a running one."""

import gc
import json
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
from cmp_hf.atomic import STAGING_PREFIX
from cmp_hf.config import CMP_DEFAULTS
from cmp_hf.constants import METRICS_NAME, OUTPUT_DIR_LOCK_NAME, PROMPT_FILES, RUN_INFO_NAME, SWEEP_JOB_NAME
from cmp_hf.learners import LEARNERS
from cmp_hf.paper_tables import load_runs, unfinished_runs
from cmp_hf.run_record import RunRecord
from cmp_hf.runs import RunDir, last_checkpoint
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
    started = json.loads((killed / RUN_INFO_NAME).read_text())  # the recipe said it started, with no result yet
    assert started["temperature"] is None and not RunDir(killed).is_finished()
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
    assert RunDir(tmp_path / "run").resume_from(True) == str(checkpoint)
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
    assert RunDir(tmp_path / "run").resume_from("true") == str(checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-6 is not a complete Trainer checkpoint"):
        RunDir(tmp_path / "run").resume_from(str(cut))
    assert RunDir(tmp_path / "run").resume_from("false") is None


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
    assert RunDir(tmp_path).resume_from(True) == str(tmp_path / "checkpoint-10")


def test_a_run_killed_after_saving_its_prompt_is_resumed_not_refused(tmp_path, tiny_clip_dir, train_set):
    """Killed during its final evaluation: the prompt is saved, metrics.json is not. The sweep resubmits it with
    resume_from_checkpoint: true, which must finish it rather than fail on every resubmission."""
    trainer = small_run(tmp_path, tiny_clip_dir, train_set)
    trainer.train()
    trainer.save_model()
    del trainer
    gc.collect()
    output_dir = str(tmp_path / "run")
    assert RunDir(output_dir).is_finished() and last_checkpoint(output_dir) == str(tmp_path / "run" / "checkpoint-4")
    run_dir = RunDir(output_dir)
    run_dir.resume_from("true")
    with run_dir.claim(overwrite=False):  # the recipe's check
        pass
    small_run(tmp_path, tiny_clip_dir, train_set, resume_from_checkpoint="true").train()  # the trainer's check
    with pytest.raises(FileExistsError, match="already holds a finished run"):  # not resuming: refused
        small_run(tmp_path, tiny_clip_dir, train_set).train()


def test_a_second_recipe_run_into_a_finished_output_dir_is_refused_before_loading(tmp_path, testbed, monkeypatch):
    config = quickstart_config(testbed, tmp_path, shots=2, num_train_epochs=1, output_dir=str(tmp_path / "run"))
    locks = []
    lock = RunDir.lock
    monkeypatch.setattr(RunDir, "lock", lambda self: locks.append(self.path) or lock(self))
    train.main(*parse_config_and_overrides(train.make_parser(), [str(config)]))
    assert locks == [str(tmp_path / "run")]  # the recipe claims its directory once; the trainer does not again
    assert RunDir(tmp_path / "run").read_record().dataset == str(testbed / "data")
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
    del trainer
    gc.collect()  # the trainer's hold ends with it
    assert not lock.exists()


def test_a_later_run_in_this_process_takes_the_lock_over(tmp_path, tiny_clip_dir, train_set, lock_holder):
    """Not re-entrant (a run locks once), but a trainer left alive in a notebook does not block the next one."""
    first = small_run(tmp_path, tiny_clip_dir, train_set, save_strategy="no")
    first.train()
    later = RunDir(tmp_path / "run")
    later.lock()  # the first trainer's hold passes to this one
    del first
    gc.collect()
    lock = tmp_path / "run" / OUTPUT_DIR_LOCK_NAME
    assert later.locked and f"pid {os.getpid()} " in lock.read_text()  # the first's end left it alone
    with pytest.raises(RuntimeError, match="a run takes it once"):
        later.lock()
    later.release()
    assert not lock.exists()
    other = lock_holder(tmp_path / "run")  # another process's lock is never taken over
    with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {other.pid} "):
        RunDir(tmp_path / "run").lock()


def write_files(directory: Path, names) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("{}")


RECIPE_RUN = (*PROMPT_FILES, RUN_INFO_NAME)  # a recipe run that saved its prompt, then was killed while evaluating


@pytest.mark.parametrize(
    ("files", "finished"),
    [
        ((METRICS_NAME,), False),  # metrics only: no prompt
        ((RUN_INFO_NAME, METRICS_NAME), False),  # a recipe run's record without its prompt
        (PROMPT_FILES, True),  # a prompt saved with CMPTrainer alone: its last file
        (RECIPE_RUN, False),  # killed after saving its prompt, before metrics.json
        ((*PROMPT_FILES, SWEEP_JOB_NAME), False),  # a sweep job's run, killed the same way
        ((*RECIPE_RUN, f"{STAGING_PREFIX}{METRICS_NAME}.tmp"), False),  # killed while writing metrics.json
        ((*RECIPE_RUN, METRICS_NAME), True),  # everything, metrics.json last
        ((*RECIPE_RUN, SWEEP_JOB_NAME, METRICS_NAME), True),
    ],
)
def test_one_definition_of_a_finished_run(tmp_path, files, finished):
    """The recipe (refusal), the sweep (skip / status) and the report (its rows, its unfinished list) agree."""
    directory = tmp_path / "runs" / "run"
    write_files(directory, files)
    if RUN_INFO_NAME in files:
        (directory / RUN_INFO_NAME).write_text(json.dumps(RunRecord("dtd", "all_8shot").run_json()))
    run_dir = RunDir(directory)
    assert run_dir.is_finished() is finished
    assert (run_dir.state()[0] == "done") is finished  # recipes/sweep.py: skipped, and "done" in --status
    if finished:
        with pytest.raises(FileExistsError, match="already holds a finished run"):
            run_dir.acquire(overwrite=False)
    else:
        with run_dir.claim(overwrite=False):  # trained over without overwrite_output_dir
            assert (directory / OUTPUT_DIR_LOCK_NAME).exists()
    assert not (directory / OUTPUT_DIR_LOCK_NAME).exists()
    reported = [record.dataset for record in load_runs(tmp_path / "runs")]
    assert reported == (["dtd"] if finished and RUN_INFO_NAME in files else [])
    started = files != (METRICS_NAME,)  # a metrics.json alone is no sign of a run
    assert bool(unfinished_runs(tmp_path / "runs")) is (started and not finished)


def test_run_record_round_trip_and_old_run_json(tmp_path, testbed):
    record = RunRecord("dtd", "base_to_novel_16shot", shots=16, seed=2, cmp_form="ratio", coop_test={"dtd": True},
                       temperature=1.5, metrics={"test_base": {"accuracy_pct": 71.25, "ece_pct": 3.5}})  # fmt: skip
    run_dir = RunDir(tmp_path)
    run_dir.finish(record)
    assert run_dir.read_record() == record
    assert json.loads((tmp_path / METRICS_NAME).read_text()) == record.metrics
    # run.json's keys are the ones earlier versions wrote, in their order
    assert list(json.loads((tmp_path / RUN_INFO_NAME).read_text())) == [
        "dataset", "setting", "shots", "seed", "cmp_lambda", "cmp_form", "cmp_competitors", "kgcoop_weight",
        "prompt_learner", "fewshot_sampling", "data_root", "coop_test", "temperature", "dac_k", "preset",
        "shift_strength", "zero_shot_weight", "transfer_zero_shot_weight",
    ]  # fmt: skip
    # a run.json of another version: missing fields take CMPConfig's defaults, unknown keys are ignored
    (tmp_path / RUN_INFO_NAME).write_text(json.dumps({"dataset": "dtd", "setting": "all_8shot", "future_key": 1}))
    old = run_dir.read_record()
    assert (old.cmp_lambda, old.cmp_form, old.cmp_competitors) == tuple(CMP_DEFAULTS.values())
    assert old.prompt_learner == CMPConfig.prompt_learner and old.metrics == record.metrics
    (tmp_path / RUN_INFO_NAME).write_text(json.dumps({"setting": "all_8shot"}))
    with pytest.raises(ValueError, match=r"unreadable result file \(run.json lacks \['dataset'\]\): re-run it"):
        run_dir.read_record()
    # the recipe's own record: CMPConfig's fields taken from its config, what it ran on from the script
    config = CMPConfig(output_dir=str(tmp_path), seed=5, cmp_lambda=0.5, prompt_learner="maple")
    taken = RunRecord.from_config(config, dataset="dtd", setting="all_2shot")
    assert (taken.seed, taken.cmp_lambda, taken.prompt_learner, taken.setting) == (5, 0.5, "maple", "all_2shot")


def test_an_overwrite_removes_every_learners_own_weights_file(tmp_path):
    """The replaced run's learner weights go with its prompt, whichever registered learner wrote them (a stale one
    would sit beside the new prompt and be pushed with it); the user's own files stay."""
    weights = [learner.weights_name for learner in LEARNERS.values() if learner.weights_name]
    write_files(tmp_path, [*PROMPT_FILES, METRICS_NAME, *weights, "notes.txt"])
    RunDir(tmp_path).remove_replaced_run(overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]

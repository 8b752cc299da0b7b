"""recipes/sweep.py through real submitit: local executor jobs (subprocesses) on the tiny testbed, and the sbatch
array script submitit writes for Slurm (with stand-in sbatch/srun commands: no Slurm here)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import quickstart_config
from submitit.core.utils import DelayedSubmission

from cmp_hf.constants import METRICS_NAME, SWEEP_JOB_NAME
from cmp_hf.runs import RunDir, last_checkpoint
from cmp_hf.scripts import train
from cmp_hf.sweeps import GridSpec, TrainRun, plan, validate
from recipes import report, sweep

pytestmark = pytest.mark.slow
FAST = dict(num_train_epochs=1, shots=2, per_device_train_batch_size=8, logging_steps=1000)


def write_config(testbed: Path, directory: Path, **overrides) -> str:
    """The quickstart config on the tiny testbed, as ``<directory>/<directory name>.yaml`` (runs are named by it)."""
    path = quickstart_config(testbed, directory, **{**FAST, **overrides})
    return str(path.rename(directory / f"{directory.name}.yaml"))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_local_grid_runs_every_job_then_skips_them(tmp_path, testbed):
    config = write_config(testbed, tmp_path / "animals")
    runs = tmp_path / "runs"
    argv = [config, "--losses", "cmp", "--seeds", "1", "2", "--runs_dir", str(runs), "--array_parallelism", "2"]
    states = sweep.main(argv)
    assert [s.state for s in states] == ["done"] * 2
    run_dirs = [runs / f"few_shot/animals/coop/cmp/seed{seed}" for seed in (1, 2)]
    for run_dir in run_dirs:
        assert RunDir(run_dir).is_finished()
        job = json.loads((run_dir / "sweep_job.json").read_text())
        assert job["resumed_from"] is None and Path(job["log"]).is_file()  # each run was its own submitit job
        used = yaml.safe_load((run_dir / "sweep_config.yaml").read_text())
        assert used["seed"] == int(run_dir.name.removeprefix("seed")) and used["output_dir"] == str(run_dir)
    assert json.loads((run_dirs[0] / "run.json").read_text())["cmp_lambda"] == 1.0
    before = {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs}
    logs = set((runs / "submitit").glob("*_log.err"))

    assert [s.state for s in sweep.main(argv)] == ["done"] * 2  # nothing left: no job is submitted
    assert {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs} == before
    assert set((runs / "submitit").glob("*_log.err")) == logs

    # the few-shot table of recipes/report.py holds each cell's seeds, checked against the runs' own files
    markdown = report.main([str(runs), "--out", str(tmp_path / "report")])
    assert "## Few-shot (all_2shot)" in markdown and "| CoOp | CMP (log_ratio) |" in markdown and "(n=2)" in markdown
    with open(tmp_path / "report.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["layout"] == "few_shot" and r["dataset"] == str(testbed / "data")]
    for metric in ("accuracy_pct", "ece_pct", "ace_pct", "mce_pct"):
        values = [metrics(d)["test"][metric] for d in run_dirs]
        (row,) = [r for r in rows if r["method"] == "CMP (log_ratio)" and r["metric"] == metric]
        assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(row["std"]) == pytest.approx(np.std(values), abs=1e-9) and row["n"] == "2"


def wait_for(condition, timeout: float = 120.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out")


def test_killed_job_resumes_and_failed_job_is_reported(tmp_path, testbed):
    long = write_config(testbed, tmp_path / "long", num_train_epochs=60)  # 8 images, batch 8: one step per epoch
    broken = write_config(testbed, tmp_path / "broken", dataset_name=str(tmp_path / "no_such_dataset"))
    runs = tmp_path / "runs"
    argv = [long, broken, "--losses", "cmp", "--seeds", "1", "--runs_dir", str(runs), "--save_steps", "5"]
    argv += ["--array_parallelism", "2"]
    long_dir = runs / "few_shot/long/coop/cmp/seed1"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(states=sweep.main(argv)))
    thread.start()
    wait_for(lambda: last_checkpoint(long_dir))  # the long run has saved a checkpoint: kill its job like an OOM kill
    pid = json.loads((long_dir / "sweep_job.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    killed_at = last_checkpoint(long_dir)
    states = {s.run.name.split("/")[1]: s for s in result["states"]}
    assert {name: s.state for name, s in states.items()} == {"long": "incomplete", "broken": "failed"}
    assert not (long_dir / "metrics.json").exists() and killed_at is not None
    failure = states["broken"]
    assert str(tmp_path / "no_such_dataset") in failure.error and Path(failure.log).is_file()
    assert failure.error.splitlines()[0] in Path(failure.log).read_text()  # the job's log holds the traceback

    states = sweep.main(argv)  # re-submit: the killed run resumes from its checkpoint, the failed one fails again
    assert {s.run.name.split("/")[1]: s.state for s in states} == {"long": "done", "broken": "failed"}
    job = json.loads((long_dir / "sweep_job.json").read_text())
    assert job["resumed_from"] == killed_at
    state = json.loads((Path(last_checkpoint(long_dir)) / "trainer_state.json").read_text())
    killed_step = int(Path(killed_at).name.split("-")[1])
    assert state["global_step"] == 60 and killed_step < 60
    # the job's own output, not its record: it trained on from the checkpoint (a restart also reaches step 60)
    assert f"Resuming from {killed_at} (step {killed_step}), not from step 0." in Path(job["stdout"]).read_text()
    status = sweep.main([*argv, "--status"])  # the same table from the run directories alone, no jobs at hand
    assert [(s.state, s.error) for s in status] == [("done", None), ("failed", failure.error)]


def test_a_job_whose_run_is_still_running_leaves_it_alone(tmp_path, testbed, lock_holder):
    """Re-submitting while a job of the same run still runs: the new job neither trains nor rewrites its records."""
    spec = GridSpec(configs=[write_config(testbed, tmp_path)], learner_recipes={"coop": {}}, losses=["ce"],
                    settings=["few_shot"], seeds=[1], runs_dir=str(tmp_path / "runs"))  # fmt: skip
    (run,) = plan(spec)
    other = lock_holder(run.output_dir)
    result = TrainRun(run)()
    assert result["skipped"] and f"pid {other.pid}" in result["busy"]
    assert not (Path(run.output_dir) / SWEEP_JOB_NAME).exists()  # the running job's record is untouched


def test_a_half_finished_run_is_run_again_without_overwrite_and_locked_once(tmp_path, testbed, monkeypatch):
    """Killed while evaluating, after its prompt was saved and with no checkpoint to resume: the job runs it again
    (no --overwrite_output_dir: an unfinished run is not a finished one to protect), holding the lock once."""
    spec = GridSpec(configs=[write_config(testbed, tmp_path)], learner_recipes={"coop": {}}, losses=["ce"],
                    settings=["few_shot"], seeds=[1], runs_dir=str(tmp_path / "runs"))  # fmt: skip
    (run,) = plan(spec)
    output_dir = Path(run.output_dir)
    assert not TrainRun(run)()["skipped"]
    (output_dir / METRICS_NAME).unlink()  # the prompt and run.json are there: the run is unfinished
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    assert (output_dir / "adapter_model.safetensors").exists() and not RunDir(output_dir).is_finished()
    argvs, locks = [], []
    run_recipe, lock = train.run, RunDir.lock
    monkeypatch.setattr(train, "run", lambda argv, run_dir: argvs.append(argv) or run_recipe(argv, run_dir))
    monkeypatch.setattr(RunDir, "lock", lambda self: locks.append(self.path) or lock(self))
    result = TrainRun(run)()
    assert not result["skipped"] and result["resumed_from"] is None
    assert "--overwrite_output_dir" not in argvs[0] and "--resume_from_checkpoint" not in argvs[0]
    assert locks == [run.output_dir]  # the job's lock, handed to the recipe and its trainer
    assert RunDir(output_dir).is_finished() and not (output_dir / ".cmp_hf.lock").exists()
    assert TrainRun(run)()["skipped"]  # finished now: left alone


def test_plan_composes_learner_recipes_and_validates_before_submitting(tmp_path, testbed):
    config = write_config(testbed, tmp_path / "animals", shots=4)
    recipes = {
        name: yaml.safe_load((sweep.LEARNER_RECIPES_DIR / f"{name}.yaml").read_text())
        for name in sweep.LEARNER_RECIPES
    }
    spec = GridSpec(
        configs=[config], learner_recipes=recipes, losses=["ce", "cmp"], settings=["few_shot", "base_to_novel"],
        seeds=[1], runs_dir=str(tmp_path / "runs"), coop_epochs=True,
    )  # fmt: skip
    runs = {run.name: run.config for run in plan(spec)}
    assert len(runs) == 6 * 2 * 2
    maple = runs["few_shot/animals/maple/cmp/seed1"]
    assert (maple["learning_rate"], maple["n_ctx"], maple["per_device_train_batch_size"]) == (0.0035, 2, 4)
    assert maple["num_train_epochs"] == 5 and maple["ctx_init"] == "a photo of a"  # its own epochs, not CoOp's
    assert runs["few_shot/animals/coop/ce/seed1"]["num_train_epochs"] == 100  # CoOp's epochs for 4 shots
    assert runs["base_to_novel/animals/proda/ce/seed1"]["shots"] == 16
    proda = runs["base_to_novel/animals/proda/ce/seed1"]  # the released recipe, its own epochs
    assert proda["num_train_epochs"] == 100 and proda["proda_prompts_per_step"] == 4
    assert proda["proda_diversity_weight"] == 0.1
    assert runs["few_shot/animals/proda/ce/seed1"]["ctx_init"] is None
    assert runs["few_shot/animals/kgcoop/cmp/seed1"]["kgcoop_weight"] == 8.0
    assert runs["few_shot/animals/cocoop/cmp/seed1"]["cmp_lambda"] == 1.0
    promptsrc = runs["few_shot/animals/promptsrc/cmp/seed1"]  # its own epochs and options, under CMP
    assert promptsrc["num_train_epochs"] == 20 and promptsrc["learner_options"]["gpa_mean"] == 15.0
    validate(plan(spec), tmp_path / "scratch")  # every composed config parses as the train recipe parses it
    bad = GridSpec(
        **{**spec.__dict__, "learner_recipes": {"proda": recipes["proda"]}, "overrides": ["--focal_gamma", "2"]}
    )
    with pytest.raises(ValueError, match=r"Run few_shot/animals/proda/ce/seed1 has an invalid config .*Focal loss"):
        validate(plan(bad), tmp_path / "scratch")


def test_slurm_array_script(tmp_path, testbed, monkeypatch):
    """submitit's real Slurm path up to sbatch: the array script and one pickled job per run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "Submitted batch job 4242"'), ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = write_config(testbed, tmp_path / "animals")
    runs = tmp_path / "runs"
    argv = [config, "--losses", "ce", "cmp", "--seeds", "1", "2", "--runs_dir", str(runs), "--executor", "slurm"]
    argv += ["--slurm_partition", "gpu", "--gpus_per_job", "1", "--timeout_min", "90", "--array_parallelism", "2"]
    assert sweep.main([*argv, "--slurm_account", "proj", "--slurm_mem_gb", "32"]) == []
    script = (runs / "submitit" / "4242_submission.sh").read_text()
    flags = {line.split("=")[0]: line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert flags["#SBATCH --array"] == "0-3%2"  # 4 runs, 2 at a time
    assert flags["#SBATCH --partition"] == "gpu" and flags["#SBATCH --gpus-per-node"] == "1"
    assert (
        flags["#SBATCH --time"] == "90" and flags["#SBATCH --account"] == "proj" and flags["#SBATCH --mem"] == "32GB"
    )
    assert flags["#SBATCH --nodes"] == "1" and flags["#SBATCH --ntasks-per-node"] == "1"
    assert "srun" in script and "-m submitit.core._submit" in script
    jobs = [DelayedSubmission.load(runs / "submitit" / f"4242_{i}_submitted.pkl").function for i in range(4)]
    assert all(isinstance(job, TrainRun) and job.num_processes == 1 for job in jobs)
    assert sorted(job.run.name for job in jobs) == sorted(
        f"few_shot/animals/coop/{loss}/seed{seed}" for loss in ("ce", "cmp") for seed in (1, 2)
    )
    with pytest.raises(SystemExit):  # a passthrough that is not --slurm_<name> value is refused
        sweep.main([*argv, "--partition", "gpu"])


def test_slurm_without_slurm_says_what_to_do(tmp_path, testbed, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    config = write_config(testbed, tmp_path / "animals")
    with pytest.raises(RuntimeError, match="needs Slurm's sbatch and srun on PATH.*--executor local"):
        sweep.main([config, "--seeds", "1", "--runs_dir", str(tmp_path / "runs"), "--executor", "slurm"])

"""Grids of recipe runs on a machine or a Slurm cluster through submitit: one job per run, finished runs skipped,
killed runs resumed from their last checkpoint, failures reported with their log.

A run is one ``cmp_hf.scripts.train`` main (what ``accelerate launch recipes/train.py`` runs) on a config composed
from a dataset config, a learner recipe, a setting, a loss and a seed; the composed config is written into the run's
``output_dir`` as ``sweep_config.yaml``, so every run directory says exactly what ran. A run is finished as
:class:`~cmp_hf.runs.RunDir` says (its ``metrics.json``, written last and atomically by the recipe, and its saved
prompt are there); anything else is re-run, from the last complete ``checkpoint-*`` in its directory when there is
one. Each job writes ``sweep_job.json`` into the run directory when it starts (job id, log files, the checkpoint it
resumed from) and adds the error when it fails: that is what :func:`run_states` reads, so a status table needs no
scheduler and survives the jobs.
``recipes/sweep.py`` is the command line.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_json, write_text
from .config import CMP_DEFAULTS
from .constants import PRESETS, SWEEP_CONFIG_NAME, SWEEP_JOB_NAME
from .runs import RunDir, last_line, read_log
from .schedulers import COOP_EPOCHS_BY_SHOTS
from .scripts.config_file import read_config

try:
    import submitit
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "Sweeps submit their runs with submitit: install it with `pip install 'cmp_hf[cluster]'` (or `pip install "
        "submitit`)."
    ) from error

LOSSES: dict[str, dict[str, Any]] = {  # the loss dimension of the grid: CMPConfig fields
    "ce": {"cmp_lambda": 0.0},
    "cmp": dict(CMP_DEFAULTS),  # CMPConfig's defaults, written out so that a dataset config's own give way
    "cmp_ratio": {**CMP_DEFAULTS, "cmp_form": "ratio"},
    # the recommended recipe; its options written out too, so that a dataset config's own (cmp_lambda) give way
    "calibrated": {"preset": "calibrated", **PRESETS["calibrated"]},
}
SETTINGS: dict[str, dict[str, Any]] = {  # the paper's two protocols: few-shot on all classes, CoCoOp's base-to-novel
    "few_shot": {},
    "base_to_novel": {"base_to_novel": True, "shots": 16},
}
STATES = ("done", "failed", "incomplete", "missing")  # what run_states reports, in the table's order


@dataclass(frozen=True)
class PlannedRun:
    """One cell of the grid: where it writes, the composed config, and command-line overrides after it."""

    output_dir: str
    config: dict[str, Any]
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.config["_sweep_name"]


@dataclass(frozen=True)
class GridSpec:
    """What ``recipes/sweep.py`` takes: the dimensions of the grid and what every run shares."""

    configs: Sequence[str]  # dataset configs (recipes/configs/suite/<dataset>.yaml)
    # learner recipe name -> its options (recipes/configs/suite/learners/<name>.yaml): a prompt learner of the
    # registry (cmp_hf.learners.LEARNERS) with its released settings, or one with a loss term (kgcoop: CoOp + KgCoOp)
    learner_recipes: dict[str, dict[str, Any]]
    losses: Sequence[str]
    settings: Sequence[str]
    seeds: Sequence[int]
    runs_dir: str
    shots: int | None = None  # overrides the configs' shots (few-shot setting)
    coop_epochs: bool = False  # num_train_epochs from shots as CoOp, unless the learner recipe has its own
    save_steps: int = 100  # checkpoint interval: a killed run loses at most this many steps
    overrides: Sequence[str] = ()  # `--key value` for every run, after the composed config


def plan(spec: GridSpec) -> list[PlannedRun]:
    """Every run of the grid, ``<runs_dir>/<setting>/<config>/<learner>/<loss>/seed<k>``, its config composed as
    dataset config < setting < CoOp epochs for the shots < learner recipe < loss < seed and checkpointing."""
    stems = [Path(config).stem for config in spec.configs]
    if len(set(stems)) < len(stems):
        raise ValueError(
            f"Dataset configs share a file name ({sorted(stems)}): runs are named after it "
            "(<runs_dir>/<setting>/<config name>/...), so give each config its own name."
        )
    runs = []
    grid = itertools.product(spec.configs, spec.settings, spec.learner_recipes, spec.losses, spec.seeds)
    for config_path, setting, learner, loss, seed in grid:
        name = f"{setting}/{Path(config_path).stem}/{learner}/{loss}/seed{seed}"
        output_dir = os.path.join(spec.runs_dir, name)
        config = {**read_config(config_path), **SETTINGS[setting]}
        if spec.shots is not None and setting == "few_shot":
            config["shots"] = spec.shots
        if spec.coop_epochs and config.get("shots"):
            config["num_train_epochs"] = COOP_EPOCHS_BY_SHOTS[config["shots"]]
        config.update(spec.learner_recipes[learner])
        config.update(LOSSES[loss])
        config.update(seed=seed, output_dir=output_dir, save_strategy="steps", save_steps=spec.save_steps)
        config.update(save_total_limit=1, _sweep_name=name)
        runs.append(PlannedRun(output_dir, config, tuple(spec.overrides)))
    return runs


def train_argv(run: PlannedRun, config_path: str) -> list[str]:
    return [config_path, *run.overrides]


def validate(runs: Sequence[PlannedRun], scratch: str | os.PathLike) -> None:
    """Parse every distinct composed config as the train recipe will (unknown keys, bad values, learner and loss
    options that do not go together) before anything is submitted; ``use_cpu`` is set for the check only, so a login
    node without GPUs can check bf16 configs."""
    from .scripts.config_file import parse_config_and_overrides
    from .scripts.train import make_parser

    seen: set[str] = set()
    os.makedirs(scratch, exist_ok=True)
    for run in runs:
        config = {k: v for k, v in run.config.items() if k not in ("seed", "output_dir", "_sweep_name")}
        key = json.dumps([config, run.overrides], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        path = os.path.join(scratch, "check.yaml")
        write_text(path, yaml.safe_dump(_recipe_config(run.config)))
        try:
            parse_config_and_overrides(make_parser(), [*train_argv(run, path), "--use_cpu", "true"])
        except (ValueError, SystemExit) as error:
            raise ValueError(
                f"Run {run.name} has an invalid config ({error}). Fix the dataset config, the learner recipe or the "
                "--extra overrides it is composed from; nothing was submitted."
            ) from error


def _recipe_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_sweep")}


class TrainRun(submitit.helpers.Checkpointable):
    """The job of one run: skip it if finished, else write its config and run the train recipe's main, resuming
    from its last complete checkpoint. ``num_processes > 1`` launches the recipe with ``accelerate launch`` inside
    the job (one process per GPU). On a Slurm timeout or preemption submitit calls ``checkpoint`` (inherited: the same
    job again), and the requeued job resumes from the newest checkpoint."""

    def __init__(self, run: PlannedRun, num_processes: int = 1) -> None:
        self.run = run
        self.num_processes = num_processes

    def __call__(self) -> dict[str, Any]:
        """The job holds the run's lock while it writes its records and, in this process, while the recipe runs
        (handed the locked :class:`~cmp_hf.runs.RunDir`); a multi-process launch is the recipe's own process
        group, whose main process takes the lock when the job has given it back."""
        run_dir = RunDir(self.run.output_dir)
        try:  # a job of this run still running (a re-submission meanwhile): leave it and its records alone
            run_dir.lock()
        except RuntimeError as busy:
            return {"output_dir": run_dir.path, "skipped": True, "resumed_from": None, "busy": str(busy)}
        try:
            if run_dir.is_finished():
                return {"output_dir": run_dir.path, "skipped": True, "resumed_from": None}
            argv, record = self._start(run_dir)
            if self.num_processes == 1:
                from .scripts.train import run as train

                return self._train(record, lambda: train(argv, run_dir=run_dir))
        finally:
            run_dir.release()
        launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(self.num_processes)]
        return self._train(record, lambda: subprocess.run([*launch, "-m", "cmp_hf.scripts.train", *argv], check=True))

    def _start(self, run_dir: RunDir) -> tuple[list[str], dict[str, Any]]:
        """Write the composed config and the job's record; the recipe's arguments. Not finished, so whatever the
        directory holds is this run's own unfinished work: resume it from its last complete checkpoint, or start
        it again (the recipe trains over an unfinished run without being asked to overwrite it)."""
        output_dir = Path(run_dir.path)
        config_path = str(output_dir / SWEEP_CONFIG_NAME)
        write_text(config_path, yaml.safe_dump(_recipe_config(self.run.config), sort_keys=False))
        resume = run_dir.last_checkpoint()
        argv = train_argv(self.run, config_path) + (["--resume_from_checkpoint", resume] if resume else [])
        record = {"run": self.run.name, "pid": os.getpid(), "resumed_from": resume, "started": time.time()}
        if os.environ.get("SUBMITIT_EXECUTOR"):
            env = submitit.JobEnvironment()
            record.update(job_id=env.job_id, log=str(env.paths.stderr), stdout=str(env.paths.stdout))
        write_json(output_dir / SWEEP_JOB_NAME, record, indent=2)
        return argv, record

    def _train(self, record: dict[str, Any], train: Callable[[], Any]) -> dict[str, Any]:
        """Run the recipe; a failure is added to the job's record (with its log's last line) and raised."""
        try:
            train()
        except Exception as error:
            if isinstance(error, subprocess.CalledProcessError):  # the traceback went to the job's log
                message = last_line(read_log(record.get("log"))) or str(error)
            else:
                message = last_line("".join(traceback.format_exception_only(type(error), error)))
            write_json(Path(self.run.output_dir) / SWEEP_JOB_NAME, {**record, "error": message}, indent=2)
            raise
        return {"output_dir": self.run.output_dir, "skipped": False, "resumed_from": record["resumed_from"]}


@dataclass(frozen=True)
class RunState:
    run: PlannedRun
    state: str  # one of STATES
    log: str | None = None
    error: str | None = None


def run_states(runs: Sequence[PlannedRun]) -> list[RunState]:
    """done (finished), failed (its job raised: the error and the log), incomplete (started, not finished, no
    error: still running, or killed; the log's last line), missing (never started): ``RunDir.state``."""
    return [RunState(run, *RunDir(run.output_dir).state()) for run in runs]


def status_table(states: Sequence[RunState]) -> str:
    counts = {state: sum(s.state == state for s in states) for state in STATES}
    lines = [f"{len(states)} runs: " + ", ".join(f"{counts[state]} {state}" for state in STATES)]
    unfinished = [s for s in states if s.state != "done"]
    if unfinished:
        lines += ["", "| run | state | log | last error line |", "|---|---|---|---|"]
        lines += [f"| {s.run.name} | {s.state} | {s.log or '-'} | {s.error or '-'} |" for s in unfinished]
    return "\n".join(lines)


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str  # "local" or "slurm"
    folder: str  # submitit's folder: pickles, sbatch scripts, logs
    gpus_per_job: int = 0
    timeout_min: int = 24 * 60
    array_parallelism: int = 1
    slurm_partition: str | None = None
    slurm_parameters: dict[str, Any] | None = None  # any other slurm_<name> submitit parameter


def make_executor(spec: ExecutorSpec) -> submitit.Executor:
    """submitit's executor: ``local`` runs jobs as subprocesses of this machine, ``slurm`` writes an sbatch array
    (any ``slurm_<name>`` of submitit's AutoExecutor passes through)."""
    if spec.kind == "local":
        executor = submitit.LocalExecutor(folder=spec.folder)
        executor.update_parameters(timeout_min=spec.timeout_min, tasks_per_node=1)
        return executor
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise RuntimeError(
            "--executor slurm needs Slurm's sbatch and srun on PATH: run the sweep on the cluster's login node, or "
            "use --executor local on this machine."
        )
    executor = submitit.AutoExecutor(folder=spec.folder, cluster="slurm")
    executor.update_parameters(
        name="cmp_hf_sweep", timeout_min=spec.timeout_min, nodes=1, tasks_per_node=1, gpus_per_node=spec.gpus_per_job,
        slurm_partition=spec.slurm_partition, slurm_array_parallelism=spec.array_parallelism,
        **{f"slurm_{k}": v for k, v in (spec.slurm_parameters or {}).items()},
    )  # fmt: skip
    return executor


def submit(executor: submitit.Executor, spec: ExecutorSpec, jobs: Sequence[TrainRun]) -> list[submitit.Job]:
    """Slurm: one job array (``array_parallelism`` at once). Local: at most ``array_parallelism`` jobs at a time,
    each on its own ``gpus_per_job`` GPUs; returns when all have ended."""
    if spec.kind == "slurm":
        return executor.submit_array(list(jobs))
    submitted, running, pending = [], {}, list(jobs)  # running: slot -> job
    while pending or running:
        running = {slot: job for slot, job in running.items() if not job.done()}
        free = [slot for slot in range(spec.array_parallelism) if slot not in running]
        for slot in free[: len(pending)]:
            gpus = tuple(range(slot * spec.gpus_per_job, (slot + 1) * spec.gpus_per_job))
            executor.update_parameters(gpus_per_node=spec.gpus_per_job, visible_gpus=gpus)
            running[slot] = executor.submit(pending.pop(0))
            submitted.append(running[slot])
        time.sleep(0.5)
    return submitted

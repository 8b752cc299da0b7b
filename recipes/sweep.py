"""Run the paper's grid (dataset configs x learners x losses x seeds x settings) as submitit jobs, locally or on Slurm.

    python recipes/sweep.py recipes/configs/suite/*.yaml --learners coop cocoop kgcoop maple proda --losses ce cmp \
        --settings few_shot base_to_novel --seeds 1 2 3 --executor slurm --slurm_partition gpu --timeout_min 240
    python recipes/sweep.py recipes/configs/suite/*.yaml ... --status    # done / failed / incomplete / missing
    python recipes/sweep.py recipes/configs/suite/*.yaml ... --dry_run   # the grid and how much of it is done

One job per run, each the train recipe's main (``accelerate launch`` inside the job when ``--gpus_per_job`` > 1),
writing to ``<runs_dir>/<setting>/<config>/<learner>/<loss>/seed<k>``. Submitting again runs only what is not
finished, and a run that was killed resumes from its last checkpoint (every ``--save_steps`` steps). ``--executor
local`` (the default) runs the jobs on this machine, ``--array_parallelism`` at a time, and prints the status table
when they end; ``--executor slurm`` submits one job array and returns (``--wait`` to stay until it ends). Any other
``--slurm_<name> value`` is a submitit Slurm parameter (``--slurm_account``, ``--slurm_qos``, ``--slurm_mem_gb``...).
``recipes/report.py <runs_dir>`` turns the results into the paper's tables.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from cmp_hf.runs import RunDir
from cmp_hf.schedulers import COOP_EPOCHS_BY_SHOTS
from cmp_hf.scripts.config_file import read_config
from cmp_hf.sweeps import (
    LOSSES,
    SETTINGS,
    ExecutorSpec,
    GridSpec,
    RunState,
    TrainRun,
    make_executor,
    plan,
    run_states,
    status_table,
    submit,
    validate,
)

# The sweep's learner dimension: one recipe per learner, a registry prompt learner (cmp_hf.learners.LEARNERS) with its
# released settings, or one with a loss term (kgcoop: CoOp + KgCoOp's term)
LEARNER_RECIPES_DIR = Path(__file__).parent / "configs" / "suite" / "learners"
LEARNER_RECIPES = sorted(path.stem for path in LEARNER_RECIPES_DIR.glob("*.yaml"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="dataset configs (e.g. recipes/configs/suite/*.yaml)")
    parser.add_argument(
        "--learners", nargs="+", default=["coop"], choices=LEARNER_RECIPES, help=f"recipes in {LEARNER_RECIPES_DIR}"
    )
    parser.add_argument("--losses", nargs="+", default=["ce", "cmp"], choices=sorted(LOSSES))
    parser.add_argument("--settings", nargs="+", default=["few_shot"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=None, choices=sorted(COOP_EPOCHS_BY_SHOTS), help="few-shot only")
    parser.add_argument("--coop_epochs", action="store_true", help="epochs from shots as CoOp (unless the learner's)")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--save_steps", type=int, default=100, help="checkpoint interval (steps) to resume from")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--log_dir", default=None, help="submitit's folder (default <runs_dir>/submitit)")
    parser.add_argument("--gpus_per_job", type=int, default=0, help="0: CPU (or what the job's node gives); >1: DDP")
    parser.add_argument("--timeout_min", type=int, default=24 * 60, help="a job's wall-clock limit")
    parser.add_argument("--array_parallelism", type=int, default=1, help="jobs running at once")
    parser.add_argument("--slurm_partition", default=None)
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the array, then print the status")
    parser.add_argument(
        "--status", action="store_true", help="print done / failed / incomplete / missing; submit none"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the grid and what is done; submit nothing")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="`--key value` overrides for every run")
    args, unknown = parser.parse_known_args(argv)
    args.slurm_parameters = slurm_parameters(parser, unknown)
    missing = [config for config in args.configs if not os.path.isfile(config)]
    if missing:
        parser.error(f"config files not found: {missing}")
    if min(args.gpus_per_job, args.save_steps - 1, args.array_parallelism - 1, args.timeout_min - 1) < 0:
        parser.error("--save_steps, --array_parallelism and --timeout_min must be >= 1, --gpus_per_job >= 0.")
    return args


def slurm_parameters(parser: argparse.ArgumentParser, unknown: list[str]) -> dict:
    """``--slurm_<name> value`` pairs -> {name: value} (values read as YAML scalars: 8 is an int, true a bool)."""
    if len(unknown) % 2 or not all(key.startswith("--slurm_") for key in unknown[::2]):
        parser.error(f"unrecognized arguments: {unknown} (only --slurm_<name> value pairs pass through to submitit)")
    pairs = zip(unknown[::2], unknown[1::2], strict=True)
    return {key.removeprefix("--slurm_"): yaml.safe_load(value) for key, value in pairs}


def main(argv: list[str] | None = None) -> list[RunState]:
    args = parse_args(argv)
    recipes = {name: read_config(str(LEARNER_RECIPES_DIR / f"{name}.yaml")) for name in args.learners}
    grid = GridSpec(
        configs=args.configs, learner_recipes=recipes, losses=args.losses, settings=args.settings, seeds=args.seeds,
        runs_dir=args.runs_dir, shots=args.shots, coop_epochs=args.coop_epochs, save_steps=args.save_steps,
        overrides=args.extra,
    )  # fmt: skip
    runs = plan(grid)
    if args.status:
        states = run_states(runs)
        print(status_table(states))
        return states
    todo = [run for run in runs if not RunDir(run.output_dir).is_finished()]
    if args.dry_run:
        for run in runs:
            print(f"{'done' if run not in todo else 'todo'}  {run.name}")
        print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run")
        return run_states(runs)
    folder = args.log_dir or os.path.join(args.runs_dir, "submitit")
    validate(todo, scratch=folder)
    spec = ExecutorSpec(
        kind=args.executor, folder=folder, gpus_per_job=args.gpus_per_job, timeout_min=args.timeout_min,
        array_parallelism=args.array_parallelism, slurm_partition=args.slurm_partition,
        slurm_parameters=args.slurm_parameters,
    )  # fmt: skip
    jobs = [TrainRun(run, num_processes=max(1, args.gpus_per_job)) for run in todo]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done: submitting {len(jobs)} ({args.executor})")
    submitted = submit(make_executor(spec), spec, jobs) if jobs else []
    if args.executor == "slurm" and not args.wait:
        array = submitted[0].job_id.split("_")[0] if submitted else "-"
        print(f"Slurm array {array}; logs in {folder}. Later: the same command with --status.")
        return []
    for job in submitted:
        job.wait()
    states = run_states(runs)
    print(status_table(states))
    return states


if __name__ == "__main__":
    sys.exit(0 if all(state.state == "done" for state in main()) else 1)

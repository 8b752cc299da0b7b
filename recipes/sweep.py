"""Run a grid of training runs: configs x methods x seeds (x settings), skipping runs whose results exist.

    python recipes/sweep.py recipes/configs/suite/*.yaml --methods coop coop_cmp --seeds 1 2 3
    python recipes/sweep.py recipes/configs/suite/dtd.yaml --settings few_shot base_to_novel --launcher accelerate

Each run is ``recipes/train.py <config> <overrides>`` with ``output_dir = <runs_dir>/<setting>/<config name>/
<method>/seed<seed>``; a run whose ``metrics.json`` exists is skipped, so an interrupted sweep resumes.
``recipes/report.py <runs_dir>`` turns the results into tables.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

from cmp_hf.schedulers import COOP_EPOCHS_BY_SHOTS

METHODS: dict[str, list[str]] = {
    "coop": ["--cmp_lambda", "0"],
    "coop_cmp": ["--cmp_lambda", "1.0", "--cmp_form", "log_ratio"],
    "coop_cmp_ratio": ["--cmp_lambda", "1.0", "--cmp_form", "ratio"],
}
SETTINGS: dict[str, list[str]] = {"few_shot": [], "base_to_novel": ["--base_to_novel", "true", "--shots", "16"]}


def planned_runs(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    runs = []
    for config, setting, method, seed in itertools.product(args.configs, args.settings, args.methods, args.seeds):
        output_dir = Path(args.runs_dir) / setting / Path(config).stem / method / f"seed{seed}"
        overrides = [*SETTINGS[setting], *METHODS[method], "--seed", str(seed), "--output_dir", str(output_dir)]
        if args.shots is not None:
            overrides += ["--shots", str(args.shots)]
            if args.coop_epochs:
                overrides += ["--num_train_epochs", str(COOP_EPOCHS_BY_SHOTS[args.shots])]
        runs.append((output_dir, [config, *overrides, *args.extra]))
    return runs


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="recipe YAMLs (e.g. recipes/configs/suite/*.yaml)")
    parser.add_argument("--methods", nargs="+", default=["coop", "coop_cmp"], choices=sorted(METHODS))
    parser.add_argument("--settings", nargs="+", default=["few_shot"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=None, choices=sorted(COOP_EPOCHS_BY_SHOTS))
    parser.add_argument("--coop_epochs", action="store_true", help="set num_train_epochs from shots as CoOp")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more overrides for every run")
    args = parser.parse_args(argv)
    missing = [config for config in args.configs if not os.path.isfile(config)]
    if missing:
        parser.error(f"config files not found: {missing}")
    train = str(Path(__file__).with_name("train.py"))
    launcher = [sys.executable, train] if args.launcher == "python" else ["accelerate", "launch", train]
    done = []
    for output_dir, arguments in planned_runs(args):
        if (output_dir / "metrics.json").exists():
            print(f"skip {output_dir} (metrics.json exists)")
            continue
        print("run ", " ".join([*launcher[1:], *arguments]), flush=True)
        if not args.dry_run:
            subprocess.run([*launcher, *arguments], check=True)
            done.append(output_dir)
    return done


if __name__ == "__main__":
    main()

"""Aggregate a folder of runs (each with metrics.json and run.json) into paper-style tables.

    python recipes/report.py runs --out runs/report

For every setting and eval set, one Markdown table per metric (accuracy, ECE, ACE, MCE, in percent): a row per
method, a column per dataset plus the average over datasets, cells mean +- std over seeds (n seeds). Also a
long-format CSV of the same numbers.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from cmp_hf.tables import publish

METRICS = {"accuracy_pct": "Accuracy", "ece_pct": "ECE", "ace_pct": "ACE", "mce_pct": "MCE"}


def method_name(run: dict) -> str:
    if not run["cmp_lambda"]:
        return "CoOp"
    return f"CoOp + CMP ({run['cmp_form']}, {run['cmp_competitors']}, lambda {run['cmp_lambda']:g})"


def collect(runs_dir: Path) -> dict[tuple, list[float]]:
    """(setting, eval set, metric, method, dataset) -> values over seeds."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for metrics_path in sorted(runs_dir.rglob("metrics.json")):
        run_path = metrics_path.with_name("run.json")
        if not run_path.exists():
            continue
        run = json.loads(run_path.read_text())
        for eval_set, metrics in json.loads(metrics_path.read_text()).items():
            for metric in METRICS:
                if metric in metrics:
                    key = (run["setting"], eval_set, metric, method_name(run), run["dataset"])
                    values[key].append(metrics[metric])
    return values


def tables(values: dict[tuple, list[float]]) -> tuple[str, list[dict]]:
    markdown, rows = [], []
    groups = sorted({key[:3] for key in values})
    for setting, eval_set, metric in groups:
        cells = {key[3:]: v for key, v in values.items() if key[:3] == (setting, eval_set, metric)}
        methods = sorted({m for m, _ in cells})
        datasets = sorted({d for _, d in cells})
        markdown += [f"### {setting} / {eval_set} / {METRICS[metric]} (%)", ""]
        markdown += ["| method | " + " | ".join(datasets) + " | Average |", "|---" * (len(datasets) + 2) + "|"]
        for method in methods:
            line, means = [], []
            for dataset in datasets:
                seeds = cells.get((method, dataset))
                if not seeds:
                    line.append("-")
                    continue
                mean, std = float(np.mean(seeds)), float(np.std(seeds))
                means.append(mean)
                line.append(f"{mean:.2f} +- {std:.2f} (n={len(seeds)})")
                rows.append(dict(setting=setting, eval_set=eval_set, metric=metric, method=method, dataset=dataset,
                                 mean=mean, std=std, n_seeds=len(seeds)))  # fmt: skip
            average = f"{np.mean(means):.2f}" if len(means) == len(datasets) else "-"
            markdown.append(f"| {method} | " + " | ".join(line) + f" | {average} |")
        markdown.append("")
    return "\n".join(markdown), rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.csv")
    args = parser.parse_args(argv)
    values = collect(Path(args.runs_dir))
    if not values:
        raise SystemExit(f"No runs with metrics.json and run.json under {args.runs_dir}.")
    markdown, rows = tables(values)
    publish(markdown, rows, args.out)
    return markdown


if __name__ == "__main__":
    main()

"""Result tables as the benchmarks and ``recipes/report.py`` publish them: Markdown to read, CSV to reuse.

The paper's three layouts, from a folder of finished recipe runs (``cmp_hf.runs.RunDir``: each with its prompt,
``run.json`` and ``metrics.json``):

* few-shot: per metric, a row per (learner, method), a column per dataset plus the average over datasets, on the
  test set;
* base-to-novel: per dataset and for the average over datasets, base, novel and their harmonic mean for accuracy,
  ECE, ACE and MCE. As CoCoOp's tables: H is the harmonic mean of the seed-averaged base and novel numbers (not an
  average of per-seed H), and the average's H is that of the dataset-averaged base and novel numbers;
* domain generalisation: per metric, the source test set and each shifted set it was transferred to
  (ImageNet -> V2 / Sketch / A / R), plus the average over the shifted sets.

Cells are mean +- std over seeds (population std, as Dassl's result parser) with n, the number of seeds. An average
over datasets is shown only where every dataset has the cell.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import STAGING_PREFIX, write_text
from .config import CMP_DEFAULTS
from .constants import (
    FEWSHOT_SPLIT_NAME,
    METRICS_NAME,
    OUTPUT_DIR_LOCK_NAME,
    PROMPT_CONFIG_NAME,
    RUN_INFO_NAME,
    SWEEP_CONFIG_NAME,
    SWEEP_JOB_NAME,
)
from .data import DOMAIN_SHIFTS
from .eval_report import harmonic_mean
from .learners import LEARNERS
from .run_record import RunRecord
from .runs import RunDir

# Files a run leaves in its directory from its start on: where one lies without a finished result, a run is missing
STARTED_RUN_FILES = (
    RUN_INFO_NAME, SWEEP_JOB_NAME, SWEEP_CONFIG_NAME, FEWSHOT_SPLIT_NAME, PROMPT_CONFIG_NAME, OUTPUT_DIR_LOCK_NAME,
)  # fmt: skip

METRICS = {"accuracy_pct": "Accuracy", "ece_pct": "ECE", "ace_pct": "ACE", "mce_pct": "MCE"}  # all in percent


def publish(markdown: str, rows: list[dict], out: str | None) -> None:
    """Print the Markdown; with ``out``, also write ``<out>.md`` and the rows as ``<out>.csv`` (atomically)."""
    print(markdown)
    if out:
        write_text(f"{out}.md", markdown)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(f"{out}.csv", table.getvalue())


@dataclass(frozen=True)
class RunResult:
    """One finished run: its place in the tables and its metrics, {eval set: {metric: value}}."""

    setting: str  # run.json's: "all_8shot", "base_to_novel_16shot", ...
    dataset: str
    learner: str  # "CoOp", "KgCoOp", ...
    method: str  # "CE", "CMP (log_ratio)", "CMP (ratio, top1, lambda 1)"
    metrics: dict[str, dict[str, float]]
    not_coop_test: tuple[str, ...] = ()  # suite datasets whose test set was not CoOp's (run.json's coop_test)

    @property
    def layout(self) -> str:
        if any(shift in self.metrics for shift in DOMAIN_SHIFTS):
            return "domain_generalization"
        return "base_to_novel" if self.setting.startswith("base_to_novel") else "few_shot"


def learner_name(record: RunRecord) -> str:
    """The prompt learner's name (its ``title`` in the registry, ``cmp_hf.learners.LEARNERS``), with KgCoOp's loss
    term named where it is on: "KgCoOp" for CoOp with it (the sweep's ``kgcoop`` learner recipe), "<learner> +
    KgCoOp" for another learner."""
    learner = record.prompt_learner
    name = LEARNERS[learner].title if learner in LEARNERS else learner
    if record.kgcoop_weight:
        return "KgCoOp" if name == "CoOp" else f"{name} + KgCoOp"
    return name


def method_name(record: RunRecord) -> str:
    """CE, or CMP with its form always named (the paper's numbers most likely came from the released 'ratio'
    form, cmp_hf's default is 'log_ratio'), and its competitors and lambda where they are not CMPConfig's defaults;
    a named preset by its name."""
    if record.preset:
        return f"{record.preset} (preset)"
    if not record.cmp_lambda:
        return "CE"
    options = (record.cmp_competitors, float(record.cmp_lambda))
    if options == (CMP_DEFAULTS["cmp_competitors"], CMP_DEFAULTS["cmp_lambda"]):
        return f"CMP ({record.cmp_form})"
    return f"CMP ({record.cmp_form}, {options[0]}, lambda {options[1]:g})"


def load_runs(runs_dir: str | Path) -> list[RunResult]:
    """Every finished recipe run under ``runs_dir`` (checkpoints are not runs)."""
    results = []
    for directory in sorted({path.parent for path in Path(runs_dir).rglob(METRICS_NAME)}):
        run_dir = RunDir(directory)
        if any(part.startswith("checkpoint-") for part in directory.parts):
            continue
        if not (run_dir.is_finished() and run_dir.has_record()):  # a prompt saved by CMPTrainer alone: not a row
            continue
        record = run_dir.read_record()
        not_coop = tuple(sorted(key for key, coop in record.coop_test.items() if not coop))
        results.append(
            RunResult(record.setting, record.dataset, learner_name(record), method_name(record), record.metrics,
                      not_coop)
        )  # fmt: skip
    return results


def unfinished_runs(runs_dir: str | Path) -> list[tuple[str, str, str | None, str | None]]:
    """Run directories under ``runs_dir`` that were started but hold no finished run, as (directory, state, log,
    last error line): ``failed`` or ``incomplete`` as ``recipes/sweep.py --status`` says (from ``sweep_job.json``),
    ``incomplete`` for a run started outside a sweep. Their cells are missing from the tables, or have fewer
    seeds."""
    root = Path(runs_dir)
    started = {path.parent for name in STARTED_RUN_FILES for path in root.rglob(name)}
    started |= {path.parent for path in root.rglob("checkpoint-*") if path.is_dir()}
    found = []
    for directory in sorted(started):
        parts = directory.relative_to(root).parts
        run_dir = RunDir(directory)
        if any(part.startswith(("checkpoint-", STAGING_PREFIX)) for part in parts) or run_dir.is_finished():
            continue
        state, log, error = run_dir.state()
        found.append((directory.relative_to(root).as_posix(), "incomplete" if state == "missing" else state, log,
                      error))  # fmt: skip
    return found


def unfinished_note(unfinished: list[tuple[str, str, str | None, str | None]]) -> str:
    """A Markdown section naming the runs whose cells are missing from the tables, and why."""
    lines = [f"## Runs not in these tables: {len(unfinished)} not finished", "",
             "Their cells are missing (-) or averaged over fewer seeds (n).", "",
             "| run | state | log | last error line |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {state} | {log or '-'} | {error or '-'} |" for name, state, log, error in unfinished]
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} +- {np.std(values):.2f} (n={len(values)})"


def _row(layout: str, setting: str, dataset: str, learner: str, method: str, eval_set: str, metric: str,
         values: list[float] | None = None, mean: float | None = None, n: int | None = None) -> dict:  # fmt: skip
    """A CSV row: a seed cell (``values``) or a derived number (``mean``: an average over datasets, a harmonic
    mean), whose std is left empty."""
    if values is not None:
        mean, std, n = float(np.mean(values)), float(np.std(values)), len(values)
    else:
        std = ""
    return dict(layout=layout, setting=setting, dataset=dataset, learner=learner, method=method, eval_set=eval_set,
                metric=metric, mean=mean, std=std, n=n)  # fmt: skip


def _seeds(runs: list[RunResult]) -> dict[tuple, list[float]]:
    """(learner, method, dataset, eval set, metric) -> values over seeds."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        for eval_set, metrics in run.metrics.items():
            for metric in METRICS:
                if metric in metrics:
                    values[(run.learner, run.method, run.dataset, eval_set, metric)].append(metrics[metric])
    return values


def _methods(runs: list[RunResult]) -> list[tuple[str, str]]:
    return sorted({(run.learner, run.method) for run in runs}, key=lambda m: (m[0], m[1] != "CE", m[1]))


def few_shot_tables(setting: str, runs: list[RunResult]) -> tuple[list[str], list[dict]]:
    seeds, datasets = _seeds(runs), sorted({run.dataset for run in runs})
    lines = [f"## Few-shot ({setting}): test set, mean +- std over seeds", ""]
    rows = []
    for metric, shown in METRICS.items():
        lines += [f"### {shown} (%)", "", "| learner | method | " + " | ".join(datasets) + " | Average |"]
        lines.append("|---" * (len(datasets) + 3) + "|")
        for learner, method in _methods(runs):
            cells, means = [], []
            for dataset in datasets:
                values = seeds.get((learner, method, dataset, "test", metric))
                cells.append(_cell(values) if values else "-")
                if values:
                    means.append(float(np.mean(values)))
                    rows.append(_row("few_shot", setting, dataset, learner, method, "test", metric, values))
            average = "-"
            if len(means) == len(datasets):
                average = f"{np.mean(means):.2f}"
                rows.append(_row("few_shot", setting, "Average", learner, method, "test", metric,
                                 mean=float(np.mean(means)), n=len(means)))  # fmt: skip
            lines.append(f"| {learner} | {method} | " + " | ".join(cells) + f" | {average} |")
        lines.append("")
    return lines, rows


def base_to_novel_tables(setting: str, runs: list[RunResult]) -> tuple[list[str], list[dict]]:
    seeds, datasets = _seeds(runs), sorted({run.dataset for run in runs})
    header = " | ".join(f"{shown} {part}" for shown in METRICS.values() for part in ("base", "novel", "H"))
    lines = [f"## Base-to-novel ({setting}): test base / novel classes, mean +- std over seeds; H = harmonic mean", ""]
    rows, means = [], defaultdict(list)  # means: (learner, method, metric, part) -> per-dataset means
    for dataset in [*datasets, "Average"]:
        title = f"Average over {len(datasets)} datasets" if dataset == "Average" else dataset
        lines += [f"### {title}", "", f"| learner | method | {header} |", "|---" * (2 + 3 * len(METRICS)) + "|"]
        for learner, method in _methods(runs):
            cells = []
            for metric in METRICS:
                if dataset == "Average":
                    base, novel = (means[(learner, method, metric, part)] for part in ("base", "novel"))
                    complete = len(base) == len(novel) == len(datasets)
                    base, novel = (float(np.mean(v)) if complete else None for v in (base, novel))
                    for part, value in (("test_base", base), ("test_novel", novel)):
                        if value is not None:
                            rows.append(_row("base_to_novel", setting, dataset, learner, method, part, metric,
                                             mean=value, n=len(datasets)))  # fmt: skip
                    cells += [f"{v:.2f}" if v is not None else "-" for v in (base, novel)]
                else:
                    values = {part: seeds.get((learner, method, dataset, f"test_{part}", metric)) for part in
                              ("base", "novel")}  # fmt: skip
                    for part, found in values.items():
                        if found:
                            means[(learner, method, metric, part)].append(float(np.mean(found)))
                            rows.append(_row("base_to_novel", setting, dataset, learner, method, f"test_{part}",
                                             metric, found))  # fmt: skip
                    cells += [_cell(v) if v else "-" for v in values.values()]
                    base, novel = (float(np.mean(v)) if v else None for v in values.values())
                if base is None or novel is None:
                    cells.append("-")
                    continue
                hm = harmonic_mean(base, novel)
                cells.append(f"{hm:.2f}")
                rows.append(_row("base_to_novel", setting, dataset, learner, method, "hm", metric, mean=hm,
                                 n=len(datasets) if dataset == "Average" else None))  # fmt: skip
            lines.append(f"| {learner} | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines, rows


def domain_generalization_tables(setting: str, runs: list[RunResult]) -> tuple[list[str], list[dict]]:
    seeds = _seeds(runs)
    sources = sorted({run.dataset for run in runs})
    targets = [shift for shift in DOMAIN_SHIFTS if any(shift in run.metrics for run in runs)]
    lines = [f"## Domain generalisation ({setting}): trained on {', '.join(sources)}, mean +- std over seeds", ""]
    rows = []
    for metric, shown in METRICS.items():
        lines += [f"### {shown} (%)", "", "| learner | method | source | " + " | ".join(targets) + " | Average |"]
        lines.append("|---" * (len(targets) + 4) + "|")
        for source in sources:
            for learner, method in _methods([run for run in runs if run.dataset == source]):
                cells, means = [], []
                for eval_set in ["test", *targets]:
                    values = seeds.get((learner, method, source, eval_set, metric))
                    cells.append(_cell(values) if values else "-")
                    if values:
                        means += [float(np.mean(values))] if eval_set != "test" else []
                        rows.append(_row("domain_generalization", setting, source, learner, method, eval_set, metric,
                                         values))  # fmt: skip
                average = "-"
                if len(means) == len(targets):
                    average = f"{np.mean(means):.2f}"
                    rows.append(_row("domain_generalization", setting, source, learner, method, "Average", metric,
                                     mean=float(np.mean(means)), n=len(means)))  # fmt: skip
                lines.append(f"| {learner} | {method} | " + " | ".join(cells) + f" | {average} |")
        lines.append("")
    return lines, rows


LAYOUTS = {
    "few_shot": few_shot_tables,
    "base_to_novel": base_to_novel_tables,
    "domain_generalization": domain_generalization_tables,
}


def paper_tables(runs: list[RunResult]) -> tuple[str, list[dict]]:
    """The Markdown of every layout and setting the runs fill, and the long-format rows of the same numbers."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for run in runs:
        groups[(run.layout, run.setting)].append(run)
    lines, rows = [], []
    for layout in LAYOUTS:
        for (found, setting), members in sorted(groups.items()):
            if found == layout:
                more_lines, more_rows = LAYOUTS[layout](setting, members)
                lines += more_lines
                rows += _mark_coop_test(more_rows, {key for run in members for key in run.not_coop_test})
    not_coop = sorted({key for run in runs for key in run.not_coop_test})
    if not_coop:
        lines.append(
            f"Test sets that are not CoOp's (the Hub repo's own test split; numbers do not compare with CoOp-family "
            f"tables): {', '.join(not_coop)}. CoOp's data folder (`data_root`) gives CoOp's splits."
        )
    return "\n".join(lines), rows


def _mark_coop_test(rows: list[dict], not_coop: set[str]) -> list[dict]:
    """Each CSV row's ``coop_test``: False where its dataset or eval set, or for an average any set averaged, was
    not tested on CoOp's test set."""
    for row in rows:
        keys = not_coop if "Average" in (row["dataset"], row["eval_set"]) else {row["dataset"], row["eval_set"]}
        row["coop_test"] = not keys & not_coop
    return rows

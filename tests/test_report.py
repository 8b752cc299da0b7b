"""recipes/report.py: the paper's three table layouts from a grid of run directories, every number recomputed here
from the runs' own metrics.json files; and the push of the tables to a Hub dataset repo (loopback Hub)."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import hub_env, run
from hub_server import FakeHub

from cmp_hf.constants import PROMPT_FILES
from cmp_hf.data import DOMAIN_SHIFTS
from cmp_hf.learners import LEARNERS
from cmp_hf.paper_tables import learner_name
from cmp_hf.run_record import RunRecord
from cmp_hf.runs import RunDir
from cmp_hf.scripts.config_file import read_config
from cmp_hf.sweeps import LOSSES
from recipes import report
from recipes.sweep import LEARNER_RECIPES, LEARNER_RECIPES_DIR

METRICS = ("accuracy_pct", "ece_pct", "ace_pct", "mce_pct")
RECIPES = {name: read_config(str(LEARNER_RECIPES_DIR / f"{name}.yaml")) for name in LEARNER_RECIPES}
REPORTED = {"CoOp": "coop", "KgCoOp": "kgcoop", "MaPLe": "maple"}  # the report's learner name -> the sweep's recipe
CMP = "CMP (log_ratio)"  # the method column names the form
METHODS = {"CE": LOSSES["ce"], CMP: LOSSES["cmp"]}  # the report's method name -> the sweep's loss


def write_run(directory: Path, setting: str, dataset: str, learner: str, method: str, seed: int, eval_sets, rng):
    """A finished run as the train recipe leaves it (prompt, run.json, metrics.json), with random metrics; returns
    them."""
    directory.mkdir(parents=True)
    metrics = {name: {m: float(rng.uniform(0, 100)) for m in METRICS} | {"nll": 1.0} for name in eval_sets}
    options = {**RECIPES[REPORTED[learner]], **METHODS[method]}  # as the sweep composes a run's config
    run = RunRecord.from_json({**options, "dataset": dataset, "setting": setting, "seed": seed}, metrics)
    for name in PROMPT_FILES:
        (directory / name).write_text("{}")
    RunDir(directory).finish(run)
    return metrics


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """(layout, dataset, learner, method) -> [metrics of each seed], and the runs directory."""
    rng = np.random.default_rng(0)
    runs_dir = tmp_path_factory.mktemp("runs")
    found: dict[tuple, list[dict]] = {}
    layouts = {
        "few_shot": ("all_8shot", ["dtd", "eurosat"], ["val", "test"]),
        "base_to_novel": ("base_to_novel_16shot", ["dtd", "eurosat"], ["val", "test_base", "test_novel"]),
        "domain_generalization": ("all_16shot", ["imagenet"], ["val", "test", *DOMAIN_SHIFTS]),
    }
    for layout, (setting, datasets, eval_sets) in layouts.items():
        for dataset in datasets:
            for learner in REPORTED:
                for method in METHODS:
                    if (dataset, learner) == ("eurosat", "MaPLe"):
                        continue  # a missing cell: MaPLe has no few-shot or base-to-novel average
                    seeds = (1, 2) if learner == "KgCoOp" else (1, 2, 3)
                    found[(layout, dataset, learner, method)] = [
                        write_run(runs_dir / layout / dataset / learner / method / f"seed{seed}", setting, dataset,
                                  learner, method, seed, eval_sets, rng)
                        for seed in seeds
                    ]  # fmt: skip
    (runs_dir / "few_shot/dtd/CoOp/CE/seed1/checkpoint-5").mkdir()  # a checkpoint is not a run
    (runs_dir / "few_shot/dtd/CoOp/CE/seed1/checkpoint-5/metrics.json").write_text("{}")
    return found, runs_dir


def csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pick(rows: list[dict], **match) -> dict:
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


def hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b)


def test_three_layouts_match_the_runs_metrics(tmp_path, grid):
    found, runs_dir = grid
    markdown = report.main([str(runs_dir), "--out", str(tmp_path / "report")])
    rows = csv_rows(tmp_path / "report.csv")

    # few-shot: a cell per (learner, method, dataset) over its seeds; the average over datasets where all exist
    assert "## Few-shot (all_8shot)" in markdown and "imagenet" not in markdown.split("## Base-to-novel")[0]
    for (layout, dataset, learner, method), seeds in found.items():
        if layout != "few_shot":
            continue
        for metric in METRICS:
            values = [s["test"][metric] for s in seeds]
            row = pick(rows, layout=layout, dataset=dataset, learner=learner, method=method, metric=metric)
            assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-9)
            assert float(row["std"]) == pytest.approx(np.std(values), abs=1e-9) and int(row["n"]) == len(seeds)
    ece = {
        d: np.mean([s["test"]["ece_pct"] for s in found[("few_shot", d, "KgCoOp", CMP)]]) for d in ("dtd", "eurosat")
    }
    average = pick(rows, layout="few_shot", dataset="Average", learner="KgCoOp", method=CMP, metric="ece_pct")
    assert float(average["mean"]) == pytest.approx((ece["dtd"] + ece["eurosat"]) / 2, abs=1e-9)
    dtd = [s["test"]["ece_pct"] for s in found[("few_shot", "dtd", "KgCoOp", CMP)]]
    line = f"| KgCoOp | CMP (log_ratio) | {np.mean(dtd):.2f} +- {np.std(dtd):.2f} (n=2) | {ece['eurosat']:.2f} +- "
    assert line in markdown and f" | {np.mean(list(ece.values())):.2f} |\n" in markdown
    assert not [r for r in rows if r["layout"] == "few_shot" and r["learner"] == "MaPLe" and r["dataset"] == "Average"]

    # base-to-novel: H of the seed means per dataset; on average, H of the dataset-averaged base and novel
    for metric in METRICS:
        base_means, novel_means = [], []
        for dataset in ("dtd", "eurosat"):
            seeds = found[("base_to_novel", dataset, "CoOp", CMP)]
            base, novel = (np.mean([s[f"test_{part}"][metric] for s in seeds]) for part in ("base", "novel"))
            base_means.append(base)
            novel_means.append(novel)
            cell = pick(rows, layout="base_to_novel", dataset=dataset, learner="CoOp", method=CMP, metric=metric,
                        eval_set="hm")  # fmt: skip
            assert float(cell["mean"]) == pytest.approx(hm(base, novel), abs=1e-9)
        average = pick(rows, layout="base_to_novel", dataset="Average", learner="CoOp", method=CMP, metric=metric,
                       eval_set="hm")  # fmt: skip
        assert float(average["mean"]) == pytest.approx(hm(np.mean(base_means), np.mean(novel_means)), abs=1e-9)
    assert "### Average over 2 datasets" in markdown and "| Accuracy base | Accuracy novel | Accuracy H |" in markdown
    # MaPLe has dtd only: no average over the one dataset it has, in the CSV or the Markdown
    averaged = {
        (r["learner"], r["method"]) for r in rows if r["layout"] == "base_to_novel" and r["dataset"] == "Average"
    }
    assert averaged == {(learner, method) for learner in ("CoOp", "KgCoOp") for method in METHODS}
    average_table = markdown.split("### Average over 2 datasets")[1].split("##")[0]
    for method in METHODS:
        assert f"| MaPLe | {method} | " + " | ".join(["-"] * 3 * len(METRICS)) + " |" in average_table

    # ImageNet -> shifts: the source's test set, each shift, and the average over the shifts
    for metric in METRICS:
        seeds = found[("domain_generalization", "imagenet", "MaPLe", "CE")]
        shifts = [np.mean([s[shift][metric] for s in seeds]) for shift in DOMAIN_SHIFTS]
        for shift, expected in zip(DOMAIN_SHIFTS, shifts, strict=True):
            cell = pick(rows, layout="domain_generalization", learner="MaPLe", method="CE", metric=metric,
                        eval_set=shift)  # fmt: skip
            assert float(cell["mean"]) == pytest.approx(expected, abs=1e-9) and cell["n"] == "3"
        average = pick(rows, layout="domain_generalization", learner="MaPLe", method="CE", metric=metric,
                       eval_set="Average")  # fmt: skip
        assert float(average["mean"]) == pytest.approx(np.mean(shifts), abs=1e-9)
    assert "| learner | method | source | " + " | ".join(DOMAIN_SHIFTS) + " | Average |" in markdown


def test_rows_name_the_cmp_form_and_flag_test_sets_that_are_not_coops(tmp_path):
    rng = np.random.default_rng(1)
    for dataset, coop_test in (("dtd", False), ("eurosat", True)):
        for form in ("log_ratio", "ratio"):
            directory = tmp_path / "runs" / dataset / form
            write_run(directory, "all_8shot", dataset, "CoOp", CMP, 1, ["test"], rng)
            run_dir = RunDir(directory)
            run_dir.finish(replace(run_dir.read_record(), cmp_form=form, coop_test={dataset: coop_test}))
    markdown = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    assert "| CoOp | CMP (log_ratio) |" in markdown and "| CoOp | CMP (ratio) |" in markdown
    assert "Test sets that are not CoOp's" in markdown and "tables): dtd." in markdown
    flags = {(r["dataset"], r["method"]): r["coop_test"] for r in csv_rows(tmp_path / "report.csv")}
    assert flags[("dtd", "CMP (ratio)")] == flags[("Average", "CMP (ratio)")] == "False"  # the average holds dtd
    assert flags[("eurosat", "CMP (ratio)")] == "True"


def test_push_to_hub_uploads_the_tables_as_a_dataset(tmp_path, grid):
    _, runs_dir = grid
    out = tmp_path / "report"
    command = [
        sys.executable,
        "recipes/report.py",
        str(runs_dir),
        "--out",
        str(out),
        "--push_to_hub",
        "tester/results",
    ]
    with FakeHub() as hub:
        result = run(command, hub_env(tmp_path, hub.endpoint))
        assert result.returncode == 0, result.stderr[-3000:]
        assert not hub.unknown_routes, hub.unknown_routes
        repo = hub.repos["tester/results"]
    assert repo.repo_type == "dataset" and len(repo.commits) == 1
    assert repo.files["results.csv"] == (tmp_path / "report.csv").read_bytes()
    assert repo.files["tables.md"] == (tmp_path / "report.md").read_bytes()
    card = repo.files["README.md"].decode()
    assert "data_files: results.csv" in card and "### Average over 2 datasets" in card
    rows = list(csv.DictReader(io.StringIO(repo.files["results.csv"].decode())))
    assert {r["layout"] for r in rows} == {"few_shot", "base_to_novel", "domain_generalization"}

    with FakeHub() as hub:  # no token: the message says how to log in, and the local tables are kept
        result = run(command, hub_env(tmp_path, hub.endpoint, token=None))
    assert result.returncode != 0 and "hf auth login" in result.stderr and (tmp_path / "report.csv").exists()


def test_report_names_each_sweep_learner_recipe_as_its_registry_learner():
    """The sweep's learner recipes, the registry's prompt learners and the report's names agree: a recipe of a
    registry learner is named by its title, kgcoop (CoOp + KgCoOp's loss term) by the loss term."""
    names = {name: learner_name(RunRecord.from_json({**recipe, "dataset": "d", "setting": "s"}))
             for name, recipe in RECIPES.items()}  # fmt: skip
    assert len(set(names.values())) == len(names)
    for recipe, name in names.items():
        learner = RECIPES[recipe]["prompt_learner"]
        assert learner in LEARNERS, recipe
        assert name == (LEARNERS[learner].title if not RECIPES[recipe].get("kgcoop_weight") else "KgCoOp")
    assert {name: names[recipe] for name, recipe in REPORTED.items()} == {name: name for name in REPORTED}

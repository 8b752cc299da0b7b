"""Calibration benchmark on the micro-CLIP testbed, every prompt trained and evaluated by ``CMPTrainer``.

    python recipes/bench_calibration.py [--methods all] [--model model_cards/micro-clip] [--out runs/bench_calibration]

Tasks: animal silhouettes and MNIST digits, each under Gaussian noise at every ``--noise`` level. Each task's ten
classes are split into base and novel classes in three ways (``--partitions``: first half base, second half base,
even classes base). For every (task, noise, partition, shots, seed), one few-shot sample of the base classes
(``cmp_hf.data.few_shot_sets``) trains every method, each a ``CMPTrainer`` run with CoOp's init ("a photo of a"),
optimiser, schedule and epochs (``cmp_hf.schedulers.COOP_EPOCHS_BY_SHOTS``); CoCoOp, MaPLe and ProDA train with
their released recipes (``*_RECIPE`` below), ProDA with its bound and K = 4 prompts on CoOp's optimiser and batch
for 50 epochs (CPU time: K x C prompts per step; the suite runs K = 32 and CoOp's epochs). Evaluation is
``trainer.evaluate``: base = base-class test images, novel = novel-class test images under the novel names
(``class_names=``), shifted = base-class test images under heavier noise, inversion and blur (and scikit-learn's
digits for MNIST). Zero-shot is the untrained prompt, which is CLIP's "a photo of a {}.".

One CLIP is loaded and every trainer gets images: the trainer's own feature cache (one directory for the whole
benchmark) encodes each image once for the learners that can cache, and MaPLe, which prompts the image tower,
encodes them at every step. Prints mean +- std tables and each method's paired differences against its baseline
(same sample, same seed: CoOp-CE, or the same learner without CMP) for every partition and noise level, with their
average and range, and writes a CSV of every run.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np
from datasets import Dataset, concatenate_datasets
from transformers import CLIPModel, CLIPProcessor
from transformers.utils import logging as hf_logging

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.data import few_shot_sets, subset_classes
from cmp_hf.schedulers import COOP_EPOCHS_BY_SHOTS
from cmp_hf.tables import publish
from cmp_hf.testing.testbed import TASKS, testbed_task

# The released recipes (CoOp's optimiser, warm-up and cosine schedule otherwise).
COCOOP_RECIPE = {"prompt_learner": "cocoop", "per_device_train_batch_size": 1, "num_train_epochs": 10}
MAPLE_RECIPE = {"prompt_learner": "maple", "n_ctx": 2, "learning_rate": 0.0035, "per_device_train_batch_size": 4,
                "num_train_epochs": 5}  # fmt: skip
PRODA_RECIPE = {"prompt_learner": "proda", "proda_num_prompts": 4, "n_ctx": 16, "ctx_init": None,
                "num_train_epochs": 50}  # fmt: skip


class Method(NamedTuple):
    options: dict[str, Any]  # CMPConfig fields
    posthoc: str | None = None  # "ts" (temperature on the few-shot val set) or "dac" (on transfer to novel classes)
    baseline: str = "CoOp-CE"  # the method its paired differences are taken against


CE = {"cmp_lambda": 0.0}
METHODS: dict[str, Method] = {
    "CoOp-CE": Method(CE),
    "CMP log_ratio/all l=0.5": Method({"cmp_lambda": 0.5}),
    "CMP log_ratio/all l=1": Method({"cmp_lambda": 1.0}),
    "CMP log_ratio/all l=2": Method({"cmp_lambda": 2.0}),
    "CMP log_ratio/top1 l=1": Method({"cmp_competitors": "top1"}),
    "CMP ratio/all l=1": Method({"cmp_form": "ratio"}),
    "CMP ratio/top1 l=1": Method({"cmp_form": "ratio", "cmp_competitors": "top1"}),
    "CoOp + label smoothing 0.1": Method({**CE, "label_smoothing_factor": 0.1}),
    "CoOp + focal g=3": Method({**CE, "focal_gamma": 3.0}),
    "CoOp + MbLS a=0.1 m=10": Method({**CE, "mbls_weight": 0.1, "mbls_margin": 10.0}),
    # "w=8" is the paper's form, 8 |t - t_hand|^2 = 16 (1 - cos): kgcoop_weight 16 in the released form cmp_hf uses
    "KgCoOp w=8": Method({**CE, "kgcoop_weight": 16.0}),
    "KgCoOp w=8 + CMP l=1": Method({"kgcoop_weight": 16.0}, baseline="KgCoOp w=8"),
    "CoOp-CE + TS": Method(CE, "ts"),
    "CMP l=1 + TS": Method({}, "ts"),
    "CoOp-CE + DAC": Method(CE, "dac"),
    "CMP l=1 + DAC": Method({}, "dac"),
    "CoCoOp": Method({**CE, **COCOOP_RECIPE}),
    "CoCoOp + CMP l=1": Method(COCOOP_RECIPE, baseline="CoCoOp"),
    "MaPLe": Method({**CE, **MAPLE_RECIPE}),
    "MaPLe + CMP l=1": Method(MAPLE_RECIPE, baseline="MaPLe"),
    "ProDA": Method({**CE, **PRODA_RECIPE}),
    "ProDA + CMP l=1": Method(PRODA_RECIPE, baseline="ProDA"),
}
# The CMP grid (form x competitors x lambda) against CoOp-CE; --methods all runs every row above.
CMP_GRID = [name for name in METHODS if name == "CoOp-CE" or name.startswith("CMP ") and "+" not in name]
PARTITIONS = {  # base classes of a 10-class task; the other five are novel
    "first_half": [0, 1, 2, 3, 4],
    "second_half": [5, 6, 7, 8, 9],
    "interleaved": [0, 2, 4, 6, 8],
}
EVAL_SETS = ("base", "novel", "shifted")
METRICS = {"accuracy": "accuracy_pct", "ece": "ece_pct", "nll": "nll"}


class Setting(NamedTuple):
    """What one group of runs shares: the task's classes, the few-shot pool and the eval sets."""

    task: str
    noise: float
    partition: str
    base_names: list[str]
    novel_names: list[str]
    pool: Dataset
    evals: dict[str, Dataset]


def settings(args: argparse.Namespace) -> list[Setting]:
    """Every (task, noise, partition)."""
    found = []
    for task, noise in itertools.product(args.tasks, args.noise):
        data = testbed_task(task, noise_sigma=noise)
        shifted = concatenate_datasets([data[s] for s in data if s.startswith("test_")])
        names = TASKS[task][1]
        for partition in args.partitions:
            base = PARTITIONS[partition]
            novel = [c for c in range(len(names)) if c not in base]
            evals = {"base": (data["test"], base), "shifted": (shifted, base), "novel": (data["test"], novel)}
            evals = {name: subset_classes(*subset) for name, subset in evals.items()}
            found.append(Setting(task, noise, partition, [names[c] for c in base], [names[c] for c in novel],
                                 subset_classes(data["train"], base), evals))  # fmt: skip
    return found


def run(
    clip: CLIPModel, processor: CLIPProcessor, setting: Setting, train: Dataset | None, val: Dataset | None,
    method: Method, seed: int, epochs: int, output_dir: str, epoch_scale: float = 1.0,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """One CMPTrainer run (``train=None``: no training, the zero-shot prompt); returns {eval set: metrics}.
    ``epochs`` is CoOp's for the shot count, unless the method has its own recipe; ``epoch_scale`` shortens both."""
    options = {"num_train_epochs": epochs, "per_device_train_batch_size": 32, "ctx_init": "a photo of a",
               **method.options}  # fmt: skip
    options["num_train_epochs"] = max(1, round(options["num_train_epochs"] * epoch_scale))
    config = CMPConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_strategy="no", per_device_eval_batch_size=256, coop_schedule=True, seed=seed,
        image_feature_cache_dir=f"{output_dir}/features", image_feature_batch_size=256, **options,
    )  # fmt: skip
    trainer = CMPTrainer(
        model=clip, args=config, train_dataset=train, processing_class=processor, class_names=setting.base_names
    )
    if train is not None:
        trainer.train()
    if method.posthoc == "ts":
        trainer.fit_temperature(val)
    if method.posthoc == "dac":
        trainer.model.calibration.dac_k = 5
    flat = trainer.evaluate({name: setting.evals[name] for name in ("base", "shifted")})
    flat.update(trainer.evaluate({"novel": setting.evals["novel"]}, class_names=setting.novel_names))
    return {name: {m: flat[f"eval_{name}_{key}"] for m, key in METRICS.items()} for name in EVAL_SETS}


def main(args: argparse.Namespace) -> list[dict]:
    start = time.time()
    hf_logging.set_verbosity_error()
    clip = CLIPModel.from_pretrained(args.model).eval()
    processor = CLIPProcessor.from_pretrained(args.model)
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    output_dir = tempfile.mkdtemp(prefix="bench_calibration_")
    rows = []
    for setting in settings(args):
        cell = dict(task=setting.task, noise=setting.noise, partition=setting.partition)
        zero_shot = run(clip, processor, setting, None, None, Method({}), 0, 1, output_dir)
        for shots, seed in itertools.product(args.shots, args.seeds):
            rows += [dict(**cell, method="zero-shot", shots=shots, seed=seed, eval_set=name, **values)
                     for name, values in zero_shot.items()]  # fmt: skip
            train, val = few_shot_sets(setting.pool, shots, seed)
            for name in methods:
                results = run(clip, processor, setting, train, val, METHODS[name], seed, COOP_EPOCHS_BY_SHOTS[shots],
                              output_dir, args.epoch_scale)  # fmt: skip
                rows += [dict(**cell, method=name, shots=shots, seed=seed, eval_set=eval_set, **values)
                         for eval_set, values in results.items()]  # fmt: skip
            print(f"{setting.task} noise {setting.noise:g} {setting.partition} {shots}-shot seed {seed} done "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    report(rows, args.out)
    print(f"total {time.time() - start:.0f} s")
    return rows


def baseline(method: str) -> str:
    return METHODS[method].baseline


def _paired(rows: list[dict], method: str, key: tuple, metric: str) -> np.ndarray:
    """Per-seed differences method - its baseline within one (task, noise, partition, shots, eval set) cell."""

    def by_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in rows if r["method"] == name and _key(r) == key}

    ours, theirs = by_seed(method), by_seed(baseline(method))
    return np.array([ours[seed] - theirs[seed] for seed in ours if seed in theirs])


def _key(row: dict) -> tuple:
    return row["task"], row["noise"], row["partition"], row["shots"], row["eval_set"]


def _cell_means(rows: list[dict], method: str, task: str, shots: int, eval_set: str, metric: str) -> list[float]:
    """The mean paired difference against the method's baseline in each (noise, partition) cell of one task."""
    cells = dict.fromkeys((r["noise"], r["partition"]) for r in rows)
    found = (_paired(rows, method, (task, *cell, shots, eval_set), metric) for cell in cells)
    return [float(d.mean()) for d in found if len(d)]


SUMMARY = (("base", "accuracy"), ("base", "ece"), ("novel", "accuracy"), ("novel", "ece"), ("shifted", "ece"))


def summary(rows: list[dict]) -> list[str]:
    """Per task: each method's paired difference against its baseline averaged over the (noise, partition) cells,
    its [min, max] over cells, and in how many cells it is below zero (lower ECE where that is good)."""
    methods = _compared(rows)
    lines = []
    for task, shots in dict.fromkeys((r["task"], r["shots"]) for r in rows):
        lines += [f"### Summary, {task}, {shots} shots: difference against the baseline, mean over cells [min, max] "
                  "(cells with a decrease / cells)", ""]  # fmt: skip
        lines += ["| method | against | " + " | ".join(f"{s} {m}" for s, m in SUMMARY) + " |",
                  "|---" * (2 + len(SUMMARY)) + "|"]  # fmt: skip
        for method in methods:
            cells = []
            for eval_set, metric in SUMMARY:
                means = _cell_means(rows, method, task, shots, eval_set, metric)
                below = sum(m < 0 for m in means)
                cells.append(f"{np.mean(means):+.2f} [{min(means):+.2f}, {max(means):+.2f}] ({below}/{len(means)})")
            lines.append(f"| {method} | {baseline(method)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _compared(rows: list[dict]) -> list[str]:
    """The methods in ``rows`` that have their baseline's runs beside them."""
    present = set(r["method"] for r in rows)
    return [m for m in dict.fromkeys(r["method"] for r in rows) if m in METHODS and baseline(m) in present - {m}]


def report(rows: list[dict], out: str | None) -> str:
    """Markdown: the summary; then per task and shots, mean +- std over seeds for each (noise, partition) cell, and
    the paired differences against each method's baseline per cell with their average and [min, max] over cells."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = list(dict.fromkeys((r["noise"], r["partition"]) for r in rows))
    lines = summary(rows)
    for task, shots, eval_set in dict.fromkeys((r["task"], r["shots"], r["eval_set"]) for r in rows):
        for metric in METRICS:
            head = " | ".join(f"noise {n:g}, {p}" for n, p in cells)
            lines += [f"### {task}, {eval_set}, {shots} shots: {metric} (mean +- std over seeds)", ""]
            lines += [f"| method | {head} |", "|---" * (1 + len(cells)) + "|"]
            digits = 3 if metric == "nll" else 2
            for method in methods:
                values = [[r[metric] for r in rows if r["method"] == method and _key(r) == (task, *c, shots, eval_set)]
                          for c in cells]  # fmt: skip
                lines.append(
                    f"| {method} | "
                    + " | ".join(f"{np.mean(v):.{digits}f} +- {np.std(v):.{digits}f}" if v else "-" for v in values)
                    + " |"
                )
            lines += ["", "paired difference against the baseline (same sample and seed): mean per cell, then the "
                      "average over cells [min, max]", ""]  # fmt: skip
            lines += [f"| method | against | {head} | average [min, max] |", "|---" * (3 + len(cells)) + "|"]
            for method in _compared(rows):
                means = _cell_means(rows, method, task, shots, eval_set, metric)
                lines.append(f"| {method} | {baseline(method)} | " + " | ".join(f"{m:+.{digits}f}" for m in means)
                             + f" | {np.mean(means):+.{digits}f} [{min(means):+.{digits}f}, {max(means):+.{digits}f}]"
                             " |")  # fmt: skip
            lines.append("")
    markdown = "\n".join(lines)
    publish(markdown, rows, out)
    return markdown


def read_rows(path: str) -> list[dict]:
    """The runs of a CSV this script wrote, with their types back (to re-render the report without re-running)."""
    types = {"noise": float, "shots": int, "seed": int, **dict.fromkeys(METRICS, float)}
    with open(path, newline="", encoding="utf-8") as f:
        return [{key: types.get(key, str)(value) for key, value in row.items()} for row in csv.DictReader(f)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_cards/micro-clip")
    parser.add_argument("--tasks", nargs="+", default=["animals", "mnist"], choices=sorted(TASKS))
    parser.add_argument("--noise", nargs="+", type=float, default=[30.0, 45.0], help="Gaussian noise sigma levels")
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    parser.add_argument("--shots", nargs="+", type=int, default=[16], choices=sorted(COOP_EPOCHS_BY_SHOTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=CMP_GRID, choices=[*METHODS, "all"])
    parser.add_argument("--epoch_scale", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench_calibration")
    parser.add_argument("--from_csv", default=None, help="only re-render the report of a CSV this script wrote")
    args = parser.parse_args()
    report(read_rows(args.from_csv), args.out) if args.from_csv else main(args)

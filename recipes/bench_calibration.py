"""Calibration benchmark on the micro-CLIP testbed, every prompt trained and evaluated by ``CMPTrainer``.

    python recipes/bench_calibration.py [--methods all] [--model model_cards/micro-clip] [--out runs/bench_calibration]

Tasks: animal silhouettes and MNIST digits, each under Gaussian noise at every ``--noise`` level. Each task's ten
classes are split into base and novel classes in three ways (``--partitions``: first half base, second half base,
even classes base). For every (task, noise, partition, shots, seed), one few-shot sample of the base classes
(``cmp_hf.data.few_shot_sets``) trains every method, each a ``CMPTrainer`` run with CoOp's init ("a photo of a"),
optimiser, schedule and epochs (``cmp_hf.schedulers.COOP_EPOCHS_BY_SHOTS``); CoCoOp, MaPLe, ProDA and PromptSRC train
with their released recipes (``*_RECIPE`` below), ProDA with its bound and K = 4 prompts on CoOp's optimiser and batch
for 50 epochs (CPU time: K x C prompts per step; the suite runs K = 32 and CoOp's epochs). Evaluation is
``trainer.evaluate``: base = base-class test images, novel = novel-class test images under the novel names
(``class_names=``), shifted = base-class test images under heavier noise, inversion and blur (and scikit-learn's
digits for MNIST). Zero-shot is the untrained prompt, which is CLIP's "a photo of a {}.".

One CLIP is loaded and every trainer gets images: the trainer's own feature cache (one directory for the whole
benchmark) encodes each image once for the learners that can cache, and MaPLe and PromptSRC, which prompt the image
tower, encode them at every step. Prints mean +- std tables and each method's paired differences against its baseline
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
from datasets import Dataset, concatenate_datasets, disable_progress_bars
from transformers import CLIPModel, CLIPProcessor
from transformers.utils import logging as hf_logging

from cmp_hf import CMPConfig, CMPTrainer, PostHocCalibration, PromptTunedCLIP
from cmp_hf.atomic import write_text
from cmp_hf.constants import PRESETS, RUN_IDENTITY_FIELDS
from cmp_hf.data import few_shot_sets, subset_classes
from cmp_hf.paper_tables import publish
from cmp_hf.progress import bars_only
from cmp_hf.schedulers import COOP_EPOCHS_BY_SHOTS
from cmp_hf.testing.testbed import TASKS, testbed_task

# The released recipes (CoOp's optimiser, warm-up and cosine schedule otherwise).
COCOOP_RECIPE = {"prompt_learner": "cocoop", "per_device_train_batch_size": 1, "num_train_epochs": 10}
MAPLE_RECIPE = {"prompt_learner": "maple", "n_ctx": 2, "learning_rate": 0.0035, "per_device_train_batch_size": 4,
                "num_train_epochs": 5}  # fmt: skip
PRODA_RECIPE = {"prompt_learner": "proda", "proda_num_prompts": 4, "n_ctx": 16, "ctx_init": None,
                "num_train_epochs": 50}  # fmt: skip
# PromptSRC's depths, loss weights and GPA (mean 15, std 1) are its learner options' defaults, the released ones
PROMPTSRC_RECIPE = {"prompt_learner": "promptsrc", "n_ctx": 4, "learning_rate": 0.0025,
                    "per_device_train_batch_size": 4, "num_train_epochs": 20}  # fmt: skip


class Method(NamedTuple):
    options: dict[str, Any]  # CMPConfig fields
    posthoc: str | None = None  # "dac": distance-aware calibration of the transfer to novel classes
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
    "CoOp-CE + TS": Method({**CE, "temperature_scaling": True}),  # on the few-shot validation set
    "CoOp-CE + shift T": Method({**CE, "shift_strength": PRESETS["calibrated"]["shift_strength"]}),
    "CoOp-CE + anchor": Method({**CE, **{k: v for k, v in PRESETS["calibrated"].items() if "zero_shot" in k}}),
    "CoOp-CE + anchor, ungated": Method({**CE, "transfer_zero_shot_weight": 0.5}),
    "Calibrated (preset)": Method({"preset": "calibrated"}),
    # augmentation (random resized crop + flip): a fixed pool of cached views per image, or a fresh crop every step
    "CoOp-CE, 8 cached views": Method({**CE, "augment": True, "augmented_views": 8}),
    "CoOp-CE, 32 cached views": Method({**CE, "augment": True, "augmented_views": 32}),
    "CoOp-CE, fresh crops": Method({**CE, "augment": True, "cache_image_features": False}),
    "CMP l=1 + TS": Method({"temperature_scaling": True}),
    "CoOp-CE + DAC": Method(CE, "dac"),
    "CMP l=1 + DAC": Method({}, "dac"),
    "CoCoOp": Method({**CE, **COCOOP_RECIPE}),
    "CoCoOp + CMP l=1": Method(COCOOP_RECIPE, baseline="CoCoOp"),
    "MaPLe": Method({**CE, **MAPLE_RECIPE}),
    "MaPLe + CMP l=1": Method(MAPLE_RECIPE, baseline="MaPLe"),
    "ProDA": Method({**CE, **PRODA_RECIPE}),
    "ProDA + CMP l=1": Method(PRODA_RECIPE, baseline="ProDA"),
    "PromptSRC": Method({**CE, **PROMPTSRC_RECIPE}),
    "PromptSRC + CMP l=1": Method(PROMPTSRC_RECIPE, baseline="PromptSRC"),
}
# The CMP grid (form x competitors x lambda) against CoOp-CE; --methods all runs every row above.
CMP_GRID = [name for name in METHODS if name == "CoOp-CE" or name.startswith("CMP ") and "+" not in name]
PARTITIONS = {  # the base classes of a task with C classes; the others are novel
    "first_half": lambda c: list(range(c // 2)),
    "second_half": lambda c: list(range(c // 2, c)),
    "interleaved": lambda c: list(range(0, c, 2)),
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
            base = PARTITIONS[partition](len(names))
            novel = [c for c in range(len(names)) if c not in base]
            evals = {"base": (data["test"], base), "shifted": (shifted, base), "novel": (data["test"], novel)}
            evals = {name: subset_classes(*subset) for name, subset in evals.items()}
            found.append(Setting(task, noise, partition, [names[c] for c in base], [names[c] for c in novel],
                                 subset_classes(data["train"], base), evals))  # fmt: skip
    return found


def run(
    clip: CLIPModel, processor: CLIPProcessor, setting: Setting, train: Dataset | None, val: Dataset | None,
    method: Method, seed: int, epochs: int, output_dir: str, epoch_scale: float = 1.0,
    trained: dict[tuple, PromptTunedCLIP] | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """One CMPTrainer run (``train=None``: no training, the zero-shot prompt); returns {eval set: metrics}.
    ``epochs`` is CoOp's for the shot count, unless the method has its own recipe; ``epoch_scale`` shortens both.
    ``trained`` holds the prompts trained so far on this sample and seed, by :func:`training_key`: a method whose
    training is the same as an earlier one's (a post-hoc variant) starts from that prompt instead of training the
    same prompt again, and only fits its own post-hoc steps (as ``train()`` ends by doing)."""
    options = {"num_train_epochs": epochs, "per_device_train_batch_size": 32, "ctx_init": "a photo of a",
               **method.options}  # fmt: skip
    options["num_train_epochs"] = max(1, round(options["num_train_epochs"] * epoch_scale))
    config = CMPConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_strategy="no", per_device_eval_batch_size=256, coop_schedule=True, seed=seed,
        image_feature_cache_dir=f"{output_dir}/features", image_feature_batch_size=256, **options,
    )  # fmt: skip
    key = training_key(config)
    prompt = trained.get(key) if trained is not None and train is not None else None
    trainer = bars_only(CMPTrainer(  # no log dicts printed: the table at the end is the output
        model=clip if prompt is None else prompt, args=config, train_dataset=train, processing_class=processor,
        class_names=setting.base_names, calibration_dataset=val,
    ))  # fmt: skip
    if prompt is not None:
        prompt.calibration = PostHocCalibration()  # another method's post-hoc steps are not this one's
        if config.posthoc_requested:  # what train() ends with
            trainer.fit_posthoc_calibration()
    elif train is not None:
        trainer.train()
        if trained is not None:
            trained[key] = trainer.model
    if method.posthoc == "dac":
        trainer.model.calibration.dac_k = 5
    flat = trainer.evaluate({name: setting.evals[name] for name in ("base", "shifted")})
    flat.update(trainer.evaluate({"novel": setting.evals["novel"]}, class_names=setting.novel_names))
    return {name: {m: flat[f"eval_{name}_{key}"] for m, key in METRICS.items()} for name in EVAL_SETS}


# Besides RUN_IDENTITY_FIELDS, what else decides the trained prompt: the learner, its prompt and the length.
_PROMPT_FIELDS = ("num_train_epochs", "prompt_learner", "n_ctx", "ctx_init", "maple_prompt_depth", "proda_num_prompts",
                  "cache_image_features")  # fmt: skip


def training_key(config: CMPConfig) -> tuple:
    """Two methods whose configs agree here train the same prompt from the same sample and seed."""
    learner_options = tuple(sorted(config.prompt_config(["_"]).learner_options.items()))
    return (*(getattr(config, name) for name in (*RUN_IDENTITY_FIELDS, *_PROMPT_FIELDS)), learner_options)


def main(args: argparse.Namespace) -> list[dict]:
    start = time.time()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # model loading
    disable_progress_bars()  # dataset maps over a few hundred images
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
            trained = {}  # the prompts trained on this sample, shared by methods that differ only after training
            for name in methods:
                results = run(clip, processor, setting, train, val, METHODS[name], seed, COOP_EPOCHS_BY_SHOTS[shots],
                              output_dir, args.epoch_scale, trained)  # fmt: skip
                rows += [dict(**cell, method=name, shots=shots, seed=seed, eval_set=eval_set, **values)
                         for eval_set, values in results.items()]  # fmt: skip
            print(f"{setting.task} noise {setting.noise:g} {setting.partition} {shots}-shot seed {seed} done "
                  f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    report(rows, args.out)
    print(f"total {time.time() - start:.0f} s")
    return rows


def baseline(method: str) -> str:
    return METHODS[method].baseline


def _paired(rows: list[dict], method: str, key: tuple, metric: str, against: str | None = None) -> np.ndarray:
    """Per-seed differences method - ``against`` (default: its baseline) within one (task, noise, partition, shots,
    eval set) cell."""

    def by_seed(name: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in rows if r["method"] == name and _key(r) == key}

    ours, theirs = by_seed(method), by_seed(against or baseline(method))
    return np.array([ours[seed] - theirs[seed] for seed in ours if seed in theirs])


def _key(row: dict) -> tuple:
    return row["task"], row["noise"], row["partition"], row["shots"], row["eval_set"]


def _cell_means(rows: list[dict], method: str, task: str, shots: int, eval_set: str, metric: str) -> list[float]:
    """The mean paired difference against the method's baseline in each (noise, partition) cell of one task."""
    cells = dict.fromkeys((r["noise"], r["partition"]) for r in rows)
    found = (_paired(rows, method, (task, *cell, shots, eval_set), metric) for cell in cells)
    return [float(d.mean()) for d in found if len(d)]


REFERENCE = "CoOp-CE"  # what the criteria compare every method with
TARGET_REDUCTION, WORST_ECE_INCREASE, WORST_ACCURACY_DROP = 30.0, 0.5, 1.0  # the criteria, in % / points / points


def verdict(rows: list[dict], method: str, group: list[tuple]) -> str:
    """Criteria 1-3 for ``method`` against CoOp-CE over the (task, noise, partition, shots) cells in ``group``:
    1. base, novel and shifted ECE, averaged over the cells, each >= 30 % lower;
    2. in no cell and on no eval set a paired mean ECE more than 0.5 points above CoOp-CE's;
    3. base and novel accuracy in every cell no more than 1 point below CoOp-CE's (paired mean; above is fine)."""
    changes = {}
    worst_ece, worst_accuracy = (-np.inf, None), (np.inf, None)
    for eval_set in EVAL_SETS:
        ours, theirs = [], []
        for cell in group:
            key = (*cell, eval_set)
            ours.append(np.mean(_values(rows, method, key, "ece")))
            theirs.append(np.mean(_values(rows, REFERENCE, key, "ece")))
            difference = float(np.mean(_paired(rows, method, key, "ece", REFERENCE)))
            worst_ece = max(worst_ece, (difference, f"{eval_set} {_cell_name(cell)}"), key=lambda w: w[0])
            if eval_set != "shifted":
                drop = float(np.mean(_paired(rows, method, key, "accuracy", REFERENCE)))
                worst_accuracy = min(worst_accuracy, (drop, f"{eval_set} {_cell_name(cell)}"), key=lambda w: w[0])
        changes[eval_set] = 100 * (np.mean(ours) - np.mean(theirs)) / np.mean(theirs)
    one = all(change <= -TARGET_REDUCTION for change in changes.values())
    parts = [f"{eval_set} {change:+.1f} %" for eval_set, change in changes.items()]
    two, three = worst_ece[0] <= WORST_ECE_INCREASE, worst_accuracy[0] >= -WORST_ACCURACY_DROP
    return (f"1 {'pass' if one else 'FAIL'} (mean ECE {', '.join(parts)}); "
            f"2 {'pass' if two else 'FAIL'} (worst cell {worst_ece[0]:+.2f}, {worst_ece[1]}); "
            f"3 {'pass' if three else 'FAIL'} (worst cell {worst_accuracy[0]:+.2f}, {worst_accuracy[1]})"
            + ("; ALL PASS" if one and two and three else ""))  # fmt: skip


def card_summary(rows: list[dict], method: str = "Calibrated (preset)") -> str:
    """The preset's evidence for the model card of every prompt trained with it: its means beside CoOp-CE's over
    the cells of each shot count, and in how many cells its paired mean ECE is lower."""
    cells = list(dict.fromkeys((r["task"], r["noise"], r["partition"], r["shots"]) for r in rows))
    tasks = ", ".join(dict.fromkeys(c[0] for c in cells))
    counts = sorted({len(_values(rows, REFERENCE, (*c, "base"), "ece")) for c in cells})
    seeds = f"{counts[0]} seeds per cell" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds per cell"
    lines = [f"On cmp_hf's micro-CLIP benchmark (`recipes/bench_calibration.py`: {tasks}; {len(cells)} cells of "
             f"task x noise x base/novel partition; {seeds}), against plain CoOp (cross-entropy) "
             "with the same few-shot sample and seed (ECE and accuracy in %, mean over cells; cells with a lower "
             "paired ECE in brackets):", "",
             "| shots | method | base acc | base ECE | novel acc | novel ECE | shifted acc | shifted ECE |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for shots in sorted({c[3] for c in cells}):
        group = [c for c in cells if c[3] == shots]
        for name in (REFERENCE, method):
            values = []
            for eval_set, metric in itertools.product(EVAL_SETS, ("accuracy", "ece")):
                keys = [(*c, eval_set) for c in group]
                values.append(f"{np.mean([np.mean(_values(rows, name, key, metric)) for key in keys]):.2f}")
                if metric == "ece" and name != REFERENCE:
                    lower = sum(np.mean(_paired(rows, name, key, metric, REFERENCE)) < 0 for key in keys)
                    values[-1] += f" ({lower}/{len(group)})"
            lines.append(f"| {shots} | {name} | " + " | ".join(values) + " |")
    lines += ["", "A 0.77 M-parameter CLIP pretrained on small offline images, not ViT-B/16: the table above this one "
              "is this prompt's own evaluation."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _values(rows: list[dict], method: str, key: tuple, metric: str) -> list[float]:
    return [r[metric] for r in rows if r["method"] == method and _key(r) == key]


def _cell_name(cell: tuple) -> str:
    task, noise, partition, shots = cell
    return f"({task}, noise {noise:g}, {partition}, {shots} shots)"


def verdicts(rows: list[dict]) -> list[str]:
    """Criteria 1-3 for every method against CoOp-CE: per shot count over all cells, and per task."""
    if not any(r["method"] == REFERENCE for r in rows):
        return []
    cells = list(dict.fromkeys((r["task"], r["noise"], r["partition"], r["shots"]) for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != REFERENCE]
    lines = [f"### Verdicts against {REFERENCE}: 1 mean base / novel / shifted ECE each >= {TARGET_REDUCTION:g} % "
             f"lower; 2 no cell worse by > {WORST_ECE_INCREASE} ECE points; 3 base and novel accuracy no more than "
             f"{WORST_ACCURACY_DROP:g} point below in every cell", ""]  # fmt: skip
    groups = {f"{shots} shots, all tasks": [c for c in cells if c[3] == shots] for shots in {c[3] for c in cells}}
    for position, name in ((0, "task"), (1, "noise")):  # the groups a choice may have been made on, or not
        values = dict.fromkeys(c[position] for c in cells)
        if len(values) > 1:
            groups.update({f"{shots} shots, {name} {value:g}" if name == "noise" else f"{shots} shots, {value}":
                           [c for c in cells if c[position] == value and c[3] == shots]
                           for value in values for shots in {c[3] for c in cells}})  # fmt: skip
    for label, group in sorted(groups.items()):
        lines += [f"{label}:", ""]
        lines += [f"- {method}: {verdict(rows, method, group)}" for method in methods]
        lines.append("")
    return lines


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
    lines = verdicts(rows) + summary(rows)
    for task, shots, eval_set in dict.fromkeys((r["task"], r["shots"], r["eval_set"]) for r in rows):
        for metric in METRICS:
            head = " | ".join(f"noise {n:g}, {p}" for n, p in cells)
            lines += [f"### {task}, {eval_set}, {shots} shots: {metric} (mean +- std over seeds)", ""]
            lines += [f"| method | {head} |", "|---" * (1 + len(cells)) + "|"]
            digits = 3 if metric == "nll" else 2
            for method in methods:
                values = [_values(rows, method, (task, *c, shots, eval_set), metric) for c in cells]
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
    parser.add_argument("--from_csv", nargs="+", default=None,
                        help="only re-render the report of CSVs this script wrote (their rows together)")  # fmt: skip
    parser.add_argument("--card_summary", default=None,
                        help="also write the preset's summary for model cards here (cmp_hf/templates/"
                        "calibrated_benchmark.md)")  # fmt: skip
    args = parser.parse_args()
    if args.from_csv:
        rows = [row for path in args.from_csv for row in read_rows(path)]
        report(rows, args.out)
    else:
        rows = main(args)
    if args.card_summary:
        write_text(args.card_summary, card_summary(rows))

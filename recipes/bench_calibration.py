"""Calibration benchmark on the micro-CLIP testbed: zero-shot, CoOp-CE and CoOp + CMP (both forms, both competitor
sets, a lambda grid), over shots and seeds, on base / novel / shifted test sets.

    python recipes/bench_calibration.py [--model build/micro-clip] [--out runs/bench_calibration]

Per task (mnist, animals) the first five classes are base, the last five novel. For each shot count and seed the
same few-shot sample (cmp_hf.data.few_shot_split on the task's few-shot pool, base classes) trains every method;
prompts start from "a photo of a" (CoOp's ctx_init) and train with CoOp's optimiser and schedule for CoOp's number
of epochs (--epoch_scale shortens them). Novel classes are scored with the same context over the novel names;
shifted = base classes under noise, inversion and blur (and scikit-learn's digits for mnist). Image features are
computed once with the frozen image tower (exactly what the feature cache stores), then each run trains on them
with the library's PromptTunedCLIP, cmp_penalty and CoOp scheduler (the arithmetic CMPTrainer does, without its
per-run start-up cost). Prints Markdown tables of mean +- std over seeds and of paired differences against
CoOp-CE (same seed, same sample), and writes a CSV of every run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from report import publish  # recipes/report.py, beside this script
from transformers import CLIPModel, CLIPProcessor

from cmp_hf import CoOpPromptConfig, PromptTunedCLIP
from cmp_hf.data import to_rgb
from cmp_hf.data.fewshot import few_shot_split
from cmp_hf.data.testbed import TASKS, testbed_task
from cmp_hf.losses import LossOptions, training_objective
from cmp_hf.metrics import calibration_metrics
from cmp_hf.posthoc import fit_temperature
from cmp_hf.schedulers import coop_scheduler

EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp's
COCOOP_EPOCHS = 10  # CoCoOp's (with batch size 1)


class Method(NamedTuple):
    loss: LossOptions
    posthoc: str | None = None  # "ts" (temperature on the few-shot val set) or "dac" (on transfer to novel classes)
    learner: str = "coop"


CE = {"cmp_lambda": 0.0}
METHODS: dict[str, Method] = {
    "CoOp-CE": Method(LossOptions(**CE)),
    "CMP log_ratio/all l=0.5": Method(LossOptions(cmp_lambda=0.5)),
    "CMP log_ratio/all l=1": Method(LossOptions(cmp_lambda=1.0)),
    "CMP log_ratio/all l=2": Method(LossOptions(cmp_lambda=2.0)),
    "CMP log_ratio/top1 l=1": Method(LossOptions(cmp_competitors="top1")),
    "CMP ratio/all l=1": Method(LossOptions(cmp_form="ratio")),
    "CMP ratio/top1 l=1": Method(LossOptions(cmp_form="ratio", cmp_competitors="top1")),
    "CoOp + label smoothing 0.1": Method(LossOptions(**CE, label_smoothing_factor=0.1)),
    "CoOp + focal g=3": Method(LossOptions(**CE, focal_gamma=3.0)),
    "CoOp + MbLS a=0.1 m=10": Method(LossOptions(**CE, mbls_weight=0.1, mbls_margin=10.0)),
    "KgCoOp w=8": Method(LossOptions(**CE, kgcoop_weight=8.0)),
    "KgCoOp w=8 + CMP l=1": Method(LossOptions(kgcoop_weight=8.0)),
    "CoOp-CE + TS": Method(LossOptions(**CE), "ts"),
    "CMP l=1 + TS": Method(LossOptions(), "ts"),
    "CoOp-CE + DAC": Method(LossOptions(**CE), "dac"),
    "CMP l=1 + DAC": Method(LossOptions(), "dac"),
    "CoCoOp": Method(LossOptions(**CE), learner="cocoop"),
    "CoCoOp + CMP l=1": Method(LossOptions(), learner="cocoop"),
}
# The original grid (form x competitors x lambda); --methods all runs every row above.
CMP_GRID = [name for name in METHODS if name == "CoOp-CE" or name.startswith("CMP ") and "+" not in name]


def encode(model: PromptTunedCLIP, processor: CLIPProcessor, images: list) -> torch.Tensor:
    features = []
    for start in range(0, len(images), 256):
        batch = [to_rgb(im) for im in images[start : start + 256]]
        pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
        features.append(model.image_features(pixels))
    return torch.cat(features)


def evaluate(model: PromptTunedCLIP, features: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        logits = model(image_features=features).logits.double().numpy()
    m = calibration_metrics(labels, logits=logits)
    return {"accuracy": 100 * m["accuracy"], "ece": 100 * m["ece"], "nll": m["nll"]}


def zero_shot(clip: CLIPModel, processor: CLIPProcessor, names: list[str], features: torch.Tensor, labels) -> dict:
    with torch.no_grad():
        text = processor.tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
        t = F.normalize(clip.get_text_features(**text).pooler_output, dim=-1)
        logits = (clip.logit_scale.exp() * features @ t.t()).double().numpy()
    m = calibration_metrics(labels, logits=logits)
    return {"accuracy": 100 * m["accuracy"], "ece": 100 * m["ece"], "nll": m["nll"]}


def train_prompt(
    clip: CLIPModel, processor: CLIPProcessor, names: list[str], features: torch.Tensor, labels: torch.Tensor,
    options: LossOptions, epochs: int, seed: int, learner: str = "coop",
) -> PromptTunedCLIP:  # fmt: skip
    """CoOp on cached features: SGD(lr 2e-3, momentum 0.9, wd 5e-4), batch 32, CoOp's warm-up + cosine schedule,
    the library's training objective (the one CMPTrainer uses). CoCoOp uses its own recipe: batch 1, 10 epochs
    (each step encodes batch x classes prompts, so CoOp's batch of 32 would cost 32 times more text encoding)."""
    torch.manual_seed(seed)
    config = CoOpPromptConfig(class_names=names, ctx_init="a photo of a", learner=learner)
    model = PromptTunedCLIP.from_clip(clip, processor.tokenizer, config)
    hand_crafted = model.hand_crafted_text_features() if options.kgcoop_weight else None
    trainable = [p for p in model.parameters() if p.requires_grad]  # the context (+ CoCoOp's meta-net)
    optimizer = torch.optim.SGD(trainable, lr=2e-3, momentum=0.9, weight_decay=5e-4)
    batch_size, epochs = (1, COCOOP_EPOCHS) if learner == "cocoop" else (32, epochs)
    scheduler = coop_scheduler(optimizer, math.ceil(len(labels) / batch_size), epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            output = model(image_features=features[batch])
            loss, _ = training_objective(output.logits, labels[batch], options, output.text_features, hand_crafted)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def main(args: argparse.Namespace) -> list[dict]:
    start = time.time()
    clip = CLIPModel.from_pretrained(args.model).eval()
    processor = CLIPProcessor.from_pretrained(args.model)
    encoder = PromptTunedCLIP.from_clip(clip, processor.tokenizer, CoOpPromptConfig(class_names=["x"], n_ctx=1))
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    rows = []
    for task in args.tasks:
        names = TASKS[task][1]
        base, novel = list(range(5)), list(range(5, 10))
        data = testbed_task(task)
        feats = {split: encode(encoder, processor, data[split]["image"]) for split in data}
        labels = {split: np.asarray(data[split]["label"]) for split in data}
        shifted = [s for s in data if s.startswith("test_")]
        evals = {  # eval set -> (features, labels relabelled 0.., class names)
            "base": _subset(feats["test"], labels["test"], base),
            "novel": _subset(feats["test"], labels["test"], novel),
            "shifted": _subset(
                torch.cat([feats[s] for s in shifted]), np.concatenate([labels[s] for s in shifted]), base
            ),
        }
        set_names = {
            "base": [names[c] for c in base],
            "novel": [names[c] for c in novel],
            "shifted": [names[c] for c in base],
        }
        for eval_set, (f, y) in evals.items():
            for shots, seed in itertools.product(args.shots, args.seeds):
                rows.append(dict(task=task, method="zero-shot", shots=shots, seed=seed, eval_set=eval_set,
                                 **zero_shot(clip, processor, set_names[eval_set], f, y)))  # fmt: skip
        pool_f, pool_y = _subset(feats["train"], labels["train"], base)
        for shots, seed in itertools.product(args.shots, args.seeds):
            train_rows, val_rows = few_shot_split(pool_y, shots, seed)  # val: min(shots, 4) per class, as CoOp
            f_train, y_train = pool_f[train_rows], torch.as_tensor(pool_y[train_rows])
            epochs = max(1, round(EPOCHS[shots] * args.epoch_scale))
            for method_name in methods:
                options, posthoc, learner = METHODS[method_name]
                model = train_prompt(
                    clip, processor, set_names["base"], f_train, y_train, options, epochs, seed, learner
                )
                if posthoc == "dac":  # applied when the context is transferred to the novel classes
                    model.dac_k = 5
                if posthoc == "ts":
                    with torch.no_grad():
                        val_logits = model(image_features=pool_f[val_rows]).logits
                    model.temperature = fit_temperature(val_logits, torch.as_tensor(pool_y[val_rows]))
                for eval_set, (f, y) in evals.items():
                    scorer = model if eval_set != "novel" else model.for_classes(set_names["novel"])
                    rows.append(dict(task=task, method=method_name, shots=shots, seed=seed, eval_set=eval_set,
                                     **evaluate(scorer, f, y)))  # fmt: skip
                    if scorer is not model:
                        scorer.remove_hook()
                model.remove_hook()  # this run's prompt is done: detach its hook from the shared CLIP
            print(f"{task} {shots}-shot seed {seed} done ({time.time() - start:.0f} s)", flush=True)
    report(rows, args.out)
    print(f"total {time.time() - start:.0f} s")
    return rows


def _subset(features: torch.Tensor, labels: np.ndarray, classes: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    keep = np.isin(labels, classes)
    relabel = {c: i for i, c in enumerate(classes)}
    return features[torch.as_tensor(keep)], np.array([relabel[int(y)] for y in labels[keep]])


def _by_seed(rows: list[dict], task: str, method: str, eval_set: str, shots: int, metric: str) -> dict[int, float]:
    cell = (task, method, eval_set, shots)
    return {r["seed"]: r[metric] for r in rows if (r["task"], r["method"], r["eval_set"], r["shots"]) == cell}


def report(rows: list[dict], out: str | None) -> str:
    lines = []
    order = ["base", "novel", "shifted"]
    keys = sorted({(r["eval_set"], r["shots"]) for r in rows}, key=lambda k: (order.index(k[0]), k[1]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells_of = list(itertools.product(tasks, ("accuracy", "ece", "nll")))
    for eval_set, shots in keys:
        lines += [f"### {eval_set}, {shots} shots: mean +- std over seeds (accuracy %, ECE %, NLL)", ""]
        lines += ["| method | " + " | ".join(f"{t} acc | {t} ECE | {t} NLL" for t in tasks) + " |"]
        lines += ["|---" * (1 + 3 * len(tasks)) + "|"]
        for method in methods:
            cells = []
            for task, metric in cells_of:
                v = np.array(list(_by_seed(rows, task, method, eval_set, shots, metric).values()))
                digits = 3 if metric == "nll" else 2
                cells.append(f"{v.mean():.{digits}f} +- {v.std():.{digits}f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"paired difference against CoOp-CE (same seed and sample), {eval_set}, {shots} shots:", ""]
        lines += ["| method | " + " | ".join(f"{t} d acc | {t} d ECE | {t} d NLL" for t in tasks) + " |"]
        lines += ["|---" * (1 + 3 * len(tasks)) + "|"]
        for method in methods:
            if method == "CoOp-CE":
                continue
            cells = []
            for task, metric in cells_of:
                a = _by_seed(rows, task, method, eval_set, shots, metric)
                b = _by_seed(rows, task, "CoOp-CE", eval_set, shots, metric)
                d = np.array([a[seed] - b[seed] for seed in a if seed in b])
                cells.append(f"{d.mean():+.2f} +- {d.std():.2f}" if len(d) else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    markdown = "\n".join(lines)
    publish(markdown, rows, out)
    return markdown


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_cards/micro-clip")
    parser.add_argument("--tasks", nargs="+", default=["animals_noisy", "mnist_noisy"], choices=sorted(TASKS))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--methods", nargs="+", default=CMP_GRID, choices=[*METHODS, "all"])
    parser.add_argument("--epoch_scale", type=float, default=1.0)
    parser.add_argument("--out", default="runs/bench_calibration")
    main(parser.parse_args())

"""What evaluating an ImageNet-sized set costs: the calibration maths, CMPTrainer.evaluate, the evaluate module.

    OMP_NUM_THREADS=2 python recipes/bench_evaluation.py                            # 50,000 x 1,000 logits
    python recipes/bench_evaluation.py --samples 2000 --classes 50 --repeats 1      # a smoke run

(1) maths: ``calibration_metrics`` on logits in memory; (2) ``CMPTrainer.evaluate`` of a set of 50,000 cached image
features over 1,000 classes, the features as wide as ViT-B/16's (512; the towers are tiny, as the text tower runs
once per evaluation and the image tower not at all): dataloader, forward, loss terms and the eval report (its
metrics are the ones returned); of which (3) the metrics stage alone, ``EvalReport.from_logits``, and (4) the eval
loss terms of the same logits, batch by batch (cross-entropy, CMP, the misclassified fraction); (5) the
``calibration`` evaluate module on the same logits
(``evaluate.load(CALIBRATION_METRIC).compute``: the logits go through an Arrow table). The fastest of
``--repeats`` after a warm-up call, the paths taking turns.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import evaluate
import torch
from datasets import Dataset
from transformers import CLIPModel

from cmp_hf import CMPConfig, CMPTrainer, PromptTunedCLIP
from cmp_hf.eval_report import EvalReport
from cmp_hf.evaluation import CALIBRATION_METRIC
from cmp_hf.losses import training_objective
from cmp_hf.metrics import calibration_metrics
from cmp_hf.progress import bars_only
from cmp_hf.prompts import PromptConfig
from cmp_hf.testing.synthetic import random_features
from cmp_hf.testing.tiny import tiny_clip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python recipes/<script>.py`
from recipes.bench_speed import class_names, print_table  # noqa: E402


def seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each call over ``repeats`` after a warm-up one (as ``timeit``: the run least disturbed
    by other processes on a shared machine). The calls take turns at every repeat, so that a change in the
    machine's load falls on all of them alike."""
    times = {name: [] for name in calls}
    for repeat in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def trainer_for(args: argparse.Namespace) -> tuple[CMPTrainer, Dataset]:
    names = class_names(args.classes)
    clip, processor = tiny_clip(word for name in names for word in name.replace("_", " ").split())
    clip.config.projection_dim = args.feature_dim
    torch.manual_seed(args.seed)
    clip = CLIPModel(clip.config).eval()
    prompt = PromptConfig(class_names=names, n_ctx=4, allow_duplicate_names=True)
    model = PromptTunedCLIP.from_clip(clip, processor.tokenizer, prompt)
    dataset = random_features(args.samples, args.feature_dim, args.classes, args.seed)  # as the cache stores them
    config = CMPConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_eval_batch_size=args.eval_batch_size, allow_duplicate_class_names=True,
    )  # fmt: skip
    trainer = CMPTrainer(model, config, eval_dataset=dataset, processing_class=processor)  # the default input pipeline
    return bars_only(trainer), dataset


def main(args: argparse.Namespace) -> dict[str, float]:
    trainer, dataset = trainer_for(args)
    output = trainer.predict(dataset)  # the logits the evaluation computes metrics from
    logits, labels = output.predictions, output.label_ids

    def metrics_stage() -> None:  # what CMPTrainer runs on the gathered logits of one eval set: metrics + report
        EvalReport.from_logits("eval", logits, labels, args.n_bins)

    def loss_terms() -> None:  # what the evaluation's compute_loss adds per batch, on the same logits
        options = trainer.args.loss_options()
        for start in range(0, len(labels), args.eval_batch_size):
            stop = start + args.eval_batch_size
            training_objective(torch.from_numpy(logits[start:stop]), torch.from_numpy(labels[start:stop]), options)

    calls = {
        "maths": lambda: calibration_metrics(labels, logits=logits, n_bins=args.n_bins),
        "trainer.evaluate": trainer.evaluate,
        "metrics stage": metrics_stage,
        "loss terms": loss_terms,
    }
    results = seconds(calls, args.repeats)
    if not args.skip_module:
        module = evaluate.load(CALIBRATION_METRIC)
        compute = lambda: module.compute(predictions=logits, references=labels, n_bins=args.n_bins, from_logits=True)  # noqa: E731
        results.update(seconds({"evaluate module": compute}, args.repeats))
    threads = torch.get_num_threads()
    print(f"{args.samples:,} x {args.classes:,} logits, {threads} CPU threads, fastest of {args.repeats}")
    rows = [[name, f"{value:.2f}", f"{value / results['maths']:.2f}x"] for name, value in results.items()]
    print_table(["path", "seconds", "/ maths"], rows)
    return results


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--feature_dim", type=int, default=512, help="width of the cached image features")
    parser.add_argument("--n_bins", type=int, default=10)
    parser.add_argument("--eval_batch_size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_module", action="store_true", help="leave out the evaluate module (slow at scale)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())

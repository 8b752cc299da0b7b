"""Train a prompt on a frozen CLIP with CMP, evaluate its calibration, save the prompt and the metrics.

    cmp-hf train recipes/configs/quickstart.yaml [--seed 2 --output_dir ...]
    accelerate launch recipes/train.py recipes/configs/suite/oxford_pets.yaml --cmp_lambda 0 --base_to_novel true

(``recipes/train.py`` runs this module's :func:`main`; ``cmp-hf train`` is the same through the installed package.)

Data comes from ``benchmark`` (a suite dataset, ``cmp_hf.data.SUITE``, from the Hub, ``data_dir``, or CoOp's own
splits in CoOp's data folder ``data_root``) or from ``dataset_name`` (a Hub id, a local image folder or a
``save_to_disk`` DatasetDict). With ``shots``, k training and min(k, 4) validation examples per class are drawn with
the seed (``fewshot_sampling``: cmp_hf's draw, or CoOp's exactly) and saved as ``fewshot_split.json`` (reused on a
re-run). ``base_to_novel`` trains on the first half of the classes and evaluates on base and novel test classes;
``eval_benchmarks`` evaluates the same context on other suite datasets with their own classes (ImageNet -> shifts).

Writes to ``output_dir``: the prompt (peft adapter + prompt_config.json), ``eval/<set>/`` (metrics JSON +
reliability diagram), the model card, ``metrics.json`` (all eval sets) and ``run.json`` (what this run was). With
``push_to_hub: true`` the directory is pushed at the end; ``cmp-hf push`` pushes it again later.
``resume_from_checkpoint: true`` continues the run from the last complete ``checkpoint-*`` in ``output_dir`` (or
from the checkpoint path given), with its optimizer, schedule and data order: the prompt is the one an
uninterrupted run would have learned.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from datasets import Dataset
from transformers import HfArgumentParser

from ..base_model import check_clip_source
from ..config import CMPConfig
from ..data import (
    FEWSHOT_SAMPLINGS,
    SUITE,
    base_novel_classes,
    class_names_from_features,
    few_shot_sets,
    load_image_dataset,
    load_suite_dataset,
    subset_classes,
)
from ..data.checks import check_labels
from ..eval_report import base_novel_harmonic_mean
from ..hub import HubError, checkpoints_note
from ..progress import bars_only, quiet_console
from ..run_record import RunRecord
from ..runs import RunDir, checkpoint_step
from ..trainer import CMPTrainer
from .config_file import parse_config_and_overrides


@dataclass
class ScriptArguments:
    """What to train and evaluate on; the training itself is configured by CMPConfig."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP Hub id or local directory."})
    benchmark: str | None = field(default=None, metadata={"help": "Suite dataset key (cmp_hf.data.SUITE)."})
    data_dir: str | None = field(default=None, metadata={"help": "Local copy of the suite dataset."})
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "CoOp's data folder (DATASETS.md layout), or hub:<repo id> for a Hub repo holding it: CoOp's own "
            "train/val/test splits for benchmark and eval_benchmarks."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, image folder or save_to_disk dir."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    train_split: str = field(default="train", metadata={"help": "Split to train on (dataset_name)."})
    eval_splits: list[str] = field(default_factory=lambda: ["test"], metadata={"help": "Splits to evaluate."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Override the ClassLabel names."})
    shots: int | None = field(default=None, metadata={"help": "Train on this many examples per class (seeded)."})
    fewshot_sampling: str = field(
        default="numpy",
        metadata={
            "help": f"One of {FEWSHOT_SAMPLINGS}: cmp_hf's seeded draw, or CoOp's (Dassl's generate_fewshot_dataset: "
            "the same images as CoOp for the same seed, on CoOp's splits from data_root)."
        },
    )
    base_to_novel: bool = field(default=False, metadata={"help": "Train on base classes, test base and novel."})
    eval_benchmarks: list[str] | None = field(default=None, metadata={"help": "Suite datasets to transfer to."})
    eval_data_dirs: list[str] | None = field(default=None, metadata={"help": "Local copies of eval_benchmarks."})
    dac: bool = field(
        default=False, metadata={"help": "Distance-aware calibration (k=5) of the transfers to other classes."}
    )
    zero_shot_baseline: bool = field(
        default=False, metadata={"help": "Also evaluate the untrained ctx_init prompt: CLIP's hand-crafted zero-shot."}
    )

    def __post_init__(self) -> None:
        if self.fewshot_sampling not in FEWSHOT_SAMPLINGS:
            raise ValueError(f"fewshot_sampling is {self.fewshot_sampling!r}: use one of {FEWSHOT_SAMPLINGS}.")
        if self.shots is not None and self.shots < 1:
            raise ValueError(
                f"shots is {self.shots}: set it to the number of training examples per class (>= 1), or leave it "
                "unset to train on the whole training split."
            )


@dataclass
class RunData:
    train: Dataset
    class_names: list[str]  # what the prompts say, in label order
    evals: dict[str, Dataset]  # same classes as train
    transfers: dict[str, tuple[Dataset, list[str]]] = field(default_factory=dict)  # other classes, same context
    setting: str = "all"
    coop_test: dict[str, bool] = field(default_factory=dict)  # suite dataset -> is its test set CoOp's?


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, CMPConfig))


def load_run_data(script_args: ScriptArguments, config: CMPConfig) -> RunData:
    if bool(script_args.benchmark) == bool(script_args.dataset_name):
        raise ValueError(
            "Set exactly one of benchmark (a suite dataset) or dataset_name (in the YAML or as --option)."
        )
    val_pool, coop_test = None, {}
    if script_args.benchmark:
        suite = load_suite_dataset(script_args.benchmark, script_args.data_dir, coop_root=script_args.data_root)
        pool, test, names = suite.splits["train"], {"test": suite.splits["test"]}, suite.class_names
        val_pool, coop_test[script_args.benchmark] = suite.splits.get("val"), suite.coop_test
    else:
        dataset = load_image_dataset(script_args.dataset_name, script_args.dataset_config)
        missing = [s for s in [script_args.train_split, *script_args.eval_splits] if s not in dataset]
        if missing:
            raise ValueError(f"Splits {missing} are not in {script_args.dataset_name} (it has {list(dataset)}).")
        pool = dataset[script_args.train_split]
        test = {split: dataset[split] for split in script_args.eval_splits}
        names = script_args.class_names or class_names_from_features(pool, config.label_column)
        # the splits this function splits by class, checked before it does; the trainer checks what it gets whole
        split_here = {script_args.train_split: pool} if script_args.shots or script_args.base_to_novel else {}
        for split, dataset in {**split_here, **(test if script_args.base_to_novel else {})}.items():
            check_labels(dataset, f"split {split!r}", config.label_column, len(names))
    data = RunData(train=pool, class_names=list(names), evals=dict(test), coop_test=coop_test)
    val = None
    coop_draw = script_args.shots and script_args.fewshot_sampling == "coop"
    if coop_draw:  # CoOp draws from every class, then keeps the base ones (subsample_classes)
        data.train, val = few_shot_sets(pool, script_args.shots, config.seed, config.label_column, config.output_dir,
                                        sampling="coop", val_pool=val_pool)  # fmt: skip
    if script_args.base_to_novel:
        base, novel = base_novel_classes(len(names))
        data.train = subset_classes(data.train, base, config.label_column)
        val = None if val is None else subset_classes(val, base, config.label_column)
        data.class_names = [names[c] for c in base]
        data.evals = {f"{split}_base": subset_classes(ds, base, config.label_column) for split, ds in test.items()}
        novel_names = [names[c] for c in novel]
        data.transfers = {
            f"{split}_novel": (subset_classes(ds, novel, config.label_column), novel_names)
            for split, ds in test.items()
        }
        data.setting = "base_to_novel"
    if script_args.shots:
        if not coop_draw:
            data.train, val = few_shot_sets(
                data.train, script_args.shots, config.seed, config.label_column, config.output_dir
            )
        data.evals = {"val": val, **data.evals}
        data.setting = f"{data.setting}_{script_args.shots}shot"
    dirs = script_args.eval_data_dirs or [None] * len(script_args.eval_benchmarks or [])
    for key, data_dir in zip(script_args.eval_benchmarks or [], dirs, strict=True):
        shifted = load_suite_dataset(key, data_dir, coop_root=None if data_dir else script_args.data_root)
        data.transfers[key] = (shifted.splits["test"], shifted.class_names)
        data.coop_test[key] = shifted.coop_test
    return data


def card_dataset_name(script_args: ScriptArguments, data: RunData) -> str:
    """The dataset the model card names; a suite dataset says whether its test set is CoOp's."""
    if not script_args.benchmark:
        return script_args.dataset_name
    if not data.coop_test[script_args.benchmark]:
        return f"{script_args.benchmark} (the Hub repo's test split, not CoOp's)"
    return f"{script_args.benchmark} (CoOp's splits)" if script_args.data_root else script_args.benchmark


def evaluate_all(trainer: CMPTrainer, data: RunData, prefix: str) -> dict[str, float]:
    """Evaluate the eval sets, then the transfer sets with the same context over their own classes."""
    flat = trainer.evaluate(metric_key_prefix=prefix)
    for name, (dataset, names) in data.transfers.items():
        flat.update(trainer.evaluate({name: dataset}, metric_key_prefix=prefix, class_names=names))
    return flat


def nest(flat: dict[str, float], prefix: str, names: list[str]) -> dict[str, dict[str, float]]:
    """{"<prefix>_<set>_<metric>": v} -> {set: {metric: v}}."""
    return {
        name: {k.removeprefix(f"{prefix}_{name}_"): v for k, v in flat.items() if k.startswith(f"{prefix}_{name}_")}
        for name in names
    }


def summary(metrics: dict[str, dict[str, float]]) -> str:
    """A small table: accuracy, ECE and NLL per eval set, the zero-shot prompt beside the trained one."""
    lines = ["| eval set | prompt | accuracy % | ECE % | NLL |", "|---|---|---|---|---|"]
    for name, values in metrics.items():
        if name.startswith("zeroshot_"):
            continue
        for label, row in (("zero-shot", metrics.get(f"zeroshot_{name}")), ("trained", values)):
            if row:
                lines.append(
                    f"| {name} | {label} | {row['accuracy_pct']:.2f} | {row['ece_pct']:.2f} | {row['nll']:.3f} |"
                )
    for split, hm in base_novel_harmonic_mean(metrics).items():  # zero-shot sets are "zeroshot_<split>_base"
        prompt = "zero-shot" if split.startswith("zeroshot_") else "trained"
        lines.append(f"| {split.removeprefix('zeroshot_')} base/novel HM | {prompt} | {hm:.2f} | | |")
    return "\n".join(lines)


def main(
    script_args: ScriptArguments, config: CMPConfig, run_dir: RunDir | None = None
) -> dict[str, dict[str, float]]:
    """Train, evaluate and save into ``output_dir`` (refused when it holds a finished run, unless resuming it or
    overwriting it; locked meanwhile), then push when asked: a failed push leaves the finished directory.
    ``run_dir``: ``output_dir`` already locked by the caller (a sweep job), which keeps its lock."""
    if not script_args.model_name_or_path:
        raise ValueError("Set model_name_or_path (in the YAML or as --model_name_or_path).")
    check_clip_source(script_args.model_name_or_path)  # before any data is loaded
    quiet_console(config)
    run_dir = run_dir if run_dir is not None else RunDir(config.output_dir)
    # a missing checkpoint fails here, before any data is loaded; another run's, once the prompt is built
    run_dir.resume_from(config.resume_from_checkpoint)
    with run_dir.claim(config.overwrite_output_dir, is_main_process=config.process_index == 0):
        trainer, metrics = train_and_evaluate(script_args, config, run_dir)
    if config.push_to_hub:
        push(trainer, script_args.benchmark or script_args.dataset_name)
    trainer.end_training()  # a multi-process run destroys its process group instead of leaving it to exit
    return metrics


def train_and_evaluate(
    script_args: ScriptArguments, config: CMPConfig, run_dir: RunDir
) -> tuple[CMPTrainer, dict[str, dict[str, float]]]:
    """Everything local, in the claimed ``run_dir``: train, save the prompt, evaluate, save the reports, run.json
    and metrics.json."""
    data = load_run_data(script_args, config)
    if script_args.benchmark and config.kgcoop_template is None:  # KgCoOp's anchor is the dataset's CoOp template
        config.kgcoop_template = SUITE[script_args.benchmark].template
    trainer = CMPTrainer(
        model=script_args.model_name_or_path,
        args=config,
        train_dataset=data.train,
        eval_dataset=data.evals,
        class_names=data.class_names,
        calibration_dataset=data.evals.get("val"),  # the few-shot validation split (shots: k)
        run_dir=run_dir,
    )
    bars_only(trainer)
    trainer.create_model_card(dataset_name=card_dataset_name(script_args, data))
    flat = {}
    if script_args.zero_shot_baseline:  # before training the prompt *is* "<ctx_init> <class>."
        if not config.ctx_init:
            raise ValueError(
                "zero_shot_baseline needs ctx_init (e.g. 'a photo of a'): the untrained prompt is CLIP's."
            )
        flat.update(evaluate_all(trainer, data, prefix="zeroshot"))  # (its reports are replaced after training)
    record = RunRecord.from_config(
        config,
        dataset=script_args.benchmark or script_args.dataset_name,
        setting=data.setting,
        shots=script_args.shots,
        fewshot_sampling=script_args.fewshot_sampling if script_args.shots else None,
        data_root=script_args.data_root,
        coop_test=data.coop_test,  # per suite dataset: False = its test set is not CoOp's (Hub split)
    )
    if trainer.is_world_process_zero():
        run_dir.begin(record)  # a recipe run: unfinished until metrics.json is written
    checkpoint = run_dir.checkpoint
    if checkpoint is not None and trainer.is_world_process_zero():
        print(f"Resuming from {checkpoint} (step {checkpoint_step(checkpoint)}), not from step 0.", flush=True)
    trainer.train()
    trainer.save_locally(config.output_dir)  # the prompt is safe before evaluation starts
    if script_args.dac:
        trainer.model.calibration.dac_k = 5
    flat.update(evaluate_all(trainer, data, prefix="eval"))
    trainer.save_locally(config.output_dir)  # now with eval/<set>/ metrics, reliability diagrams and the card
    names = [*data.evals, *data.transfers]
    metrics = nest(flat, "eval", names)
    if script_args.zero_shot_baseline:
        metrics.update({f"zeroshot_{name}": values for name, values in nest(flat, "zeroshot", names).items()})
    if trainer.is_world_process_zero():
        calibration = trainer.model.calibration
        # metrics.json last: from then on the run is finished (RunDir), so a run killed before this point is re-run
        run_dir.finish(replace(record, temperature=calibration.temperature, dac_k=calibration.dac_k, metrics=metrics))
        print(summary(metrics))
        print(f"Prompt, model card, metrics.json and eval/<set>/ (metrics, figures) in {config.output_dir}")
    return trainer, metrics


def push(trainer: CMPTrainer, dataset_name: str | None) -> None:
    """The last step: upload the finished directory. On failure it stays complete, and the error says how to
    push it again."""
    output_dir = trainer.args.output_dir
    try:
        trainer.push_to_hub(dataset_name=dataset_name)
    except HubError as error:
        raise HubError(
            f"{error} The run itself finished: {output_dir} holds the prompt, metrics.json, eval/ and the card."
        ) from error
    note = checkpoints_note(output_dir)
    if note and trainer.is_world_process_zero():
        print(note)


def run(argv: Sequence[str], run_dir: RunDir | None = None) -> dict[str, dict[str, float]]:
    """``[config.yaml] [--option value ...]`` -> :func:`main` (what ``cmp-hf train`` and recipes/train.py run)."""
    return main(*parse_config_and_overrides(make_parser(), argv), run_dir=run_dir)


if __name__ == "__main__":  # accelerate launch -m cmp_hf.scripts.train <config.yaml>
    run(sys.argv[1:])

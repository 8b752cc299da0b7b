"""Train a CoOp prompt on a frozen CLIP with CMP, evaluate its calibration, save the prompt and the metrics.

    accelerate launch recipes/train.py recipes/configs/quickstart.yaml [--seed 2 --output_dir ...]

The model is a Hub id or a local CLIP directory; the dataset a Hub id, a local image folder or a ``save_to_disk``
directory of a DatasetDict. Writes to ``output_dir``: the prompt (peft adapter + prompt_config.json) and
``metrics.json`` (one entry per eval split, metrics as ``CalibrationMetrics`` names them).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.cli import parse_config_and_overrides
from cmp_hf.data import load_image_dataset, sample_few_shot


@dataclass
class ScriptArguments:
    """What to train on; the training itself is configured by CMPConfig."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP Hub id or local directory."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id, image folder or save_to_disk dir."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_splits: list[str] = field(default_factory=lambda: ["test"], metadata={"help": "Splits to evaluate."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Override the ClassLabel names."})
    shots: int | None = field(default=None, metadata={"help": "Train on this many examples per class (seeded)."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, CMPConfig))


def main(script_args: ScriptArguments, config: CMPConfig) -> dict[str, dict[str, float]]:
    if not script_args.model_name_or_path or not script_args.dataset_name:
        raise ValueError("Set model_name_or_path and dataset_name (in the YAML or as --options).")
    dataset = load_image_dataset(script_args.dataset_name, script_args.dataset_config)
    missing = [s for s in [script_args.train_split, *script_args.eval_splits] if s not in dataset]
    if missing:
        raise ValueError(f"Splits {missing} are not in {script_args.dataset_name} (it has {list(dataset)}).")
    train = dataset[script_args.train_split]
    if script_args.shots:
        train = sample_few_shot(train, script_args.shots, config.label_column, seed=config.seed)
    trainer = CMPTrainer(
        model=script_args.model_name_or_path,
        args=config,
        train_dataset=train,
        eval_dataset={split: dataset[split] for split in script_args.eval_splits},
        class_names=script_args.class_names,
    )
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    trainer.train()
    trainer.save_model(config.output_dir)  # the prompt is safe before evaluation starts
    flat = trainer.evaluate()
    trainer.save_model(config.output_dir)  # now with eval/<split>/ metrics, reliability diagrams and the card
    metrics = {
        split: {
            key.removeprefix(f"eval_{split}_"): value
            for key, value in flat.items()
            if key.startswith(f"eval_{split}_")
        }
        for split in script_args.eval_splits
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    if config.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return metrics


if __name__ == "__main__":
    main(*parse_config_and_overrides(make_parser(), sys.argv[1:]))

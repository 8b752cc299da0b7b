"""Console output for scripts: progress bars that follow ``disable_tqdm`` and no raw log dictionaries.

Trainer prints every log as a Python dict (through ``PrinterCallback`` when ``disable_tqdm`` is set, or written
above the bar by ``ProgressCallback``). A recipe saves every number to ``metrics.json`` and ends with a summary
table, so those dicts are noise. ``quiet_console(args)`` (before the trainer is built: it encodes images then)
makes the dataset and feature-cache bars follow ``disable_tqdm``; ``bars_only(trainer)`` swaps Trainer's console
callback for a bar that prints nothing else, or for nothing when ``disable_tqdm`` is set. Metrics still reach
``trainer.state.log_history`` and every ``report_to`` tracker.
"""

from __future__ import annotations

import datasets
import transformers
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback


class BarOnlyProgressCallback(ProgressCallback):
    """Trainer's training and evaluation bars, without the log dict written above them."""

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        return None


def quiet_console(args: TrainingArguments) -> None:
    """Turn the model-loading, dataset and feature-cache progress bars off when ``args.disable_tqdm`` is set."""
    if args.disable_tqdm:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    else:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()


def bars_only(trainer: Trainer) -> Trainer:
    """Make ``trainer`` print progress bars only (none with ``disable_tqdm``), never its log dicts; returns it."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(BarOnlyProgressCallback)
    return trainer

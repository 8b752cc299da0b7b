"""The model card of a trained prompt: what it says (:class:`CardInfo`) and its rendering with the eval reports.

As in trl, the card is a template (``templates/prompt_card.md``) plus a helper that fills it; the trainer only
says when to write it. :class:`CardInfo` has one typed field per variable of the template besides the reports,
so a variable that nothing sets is an error when the info is built, not a blank left in a published card.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from importlib import resources

from datasets import Dataset, IterableDataset
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import posthoc
from .config import CMPConfig
from .constants import PRESETS
from .data.fewshot import examples_per_class
from .eval_report import EvalReport
from .hub import repo_name
from .modeling import PromptTunedCLIP

CARD_TEMPLATE = "prompt_card.md"
CARD_TAGS = ["cmp_hf", "clip", "coop", "prompt-tuning", "calibration", "cmp"]
# model-index entries: metric type -> (key in the eval report's metrics, name shown on the Hub)
CARD_METRICS = {
    "accuracy": ("accuracy_pct", "Accuracy (%)"),
    "ece": ("ece_pct", "ECE (%)"),
    "ace": ("ace_pct", "ACE (%)"),
    "mce": ("mce_pct", "MCE (%)"),
    "classwise_ece": ("classwise_ece_pct", "Classwise ECE (%)"),
    "nll": ("nll", "NLL"),
    "brier": ("brier", "Brier"),
    "aurc": ("aurc", "AURC"),
}


@dataclass(frozen=True)
class CardInfo:
    """What the card says about a prompt besides its eval reports: the template's variables, as shown.

    :meth:`of_training` reads them off a trainer's model, arguments and training set.
    """

    model_name: str  # the card's title
    repo_id: str  # what loads the prompt: the Hub repo once pushed, else the absolute output directory
    base_model: str  # the CLIP's Hub id or directory ("" when unknown)
    learner: str  # the learner as its paper spells it
    learner_name: str  # its key in cmp_hf.learners.LEARNERS
    dataset_name: str
    num_classes: int
    class_list: str  # the first class names, and how many there are in all
    n_ctx: int
    num_vectors: int  # rows of the peft adapter's prompt embedding
    ctx_init: str  # how the context was initialised, in words
    class_token_position: str
    class_specific_context: bool
    template: str
    train_size: int | None  # None for a stream
    shots: str  # examples per class: "16", or "3-9" for an unbalanced set, "-" when unknown
    cmp_lambda: float
    cmp_form: str
    cmp_competitors: str
    optimizer: str
    learning_rate: float
    batch_size: int  # per optimizer step, over processes and accumulation
    schedule: str
    length: str
    seed: int
    n_bins: int
    posthoc: str  # the post-hoc calibration steps, in words
    preset: str | None
    preset_options: str  # the options the preset sets, as `key=value`s
    preset_evidence: str  # the benchmark summary shipped for the preset

    @classmethod
    def of_training(
        cls,
        model: PromptTunedCLIP,
        args: CMPConfig,
        train_dataset: Dataset | IterableDataset | None,
        *,
        model_name: str | None = None,
        dataset_name: str | None = None,
        repo_id: str | None = None,
    ) -> CardInfo:
        """The card of ``model`` trained with ``args`` on ``train_dataset`` (a stream's size and shots are shown as
        unknown); ``repo_id`` defaults to the output directory (absolute: the card's usage lines must work from
        anywhere)."""
        train = train_dataset if isinstance(train_dataset, Dataset) else None
        prompt = model.prompt_config
        optim = getattr(args.optim, "value", args.optim)  # TrainingArguments turns the name into an enum
        schedule = (
            f"CoOp schedule ({args.coop_warmup_epochs} warm-up epoch(s) at {args.coop_warmup_lr}, cosine per epoch)"
            if args.coop_schedule
            else f"{args.lr_scheduler_type} schedule"
        )
        return cls(
            model_name=model_name or repo_name(args.output_dir, args.hub_model_id).split("/")[-1],
            repo_id=repo_id or os.path.abspath(args.output_dir),
            base_model=prompt.base_model_name_or_path or "",
            learner=model.learner.title,
            learner_name=model.learner.name,
            dataset_name=dataset_name or "custom",
            num_classes=len(prompt.class_names),
            class_list=_short_list(prompt.class_names),
            n_ctx=prompt.n_ctx,
            num_vectors=prompt.num_context_vectors,
            ctx_init=f"the text `{prompt.ctx_init}`" if prompt.ctx_init else "N(0, 0.02)",
            class_token_position=prompt.class_token_position,
            class_specific_context=prompt.class_specific_context,
            template=prompt.template,
            train_size=len(train) if train is not None else None,
            shots=examples_per_class(train, args.label_column),
            cmp_lambda=args.cmp_lambda,
            cmp_form=args.cmp_form,
            cmp_competitors=args.cmp_competitors,
            optimizer=f"{optim} ({args.optim_args})" if args.optim_args else optim,
            learning_rate=args.learning_rate,
            batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            schedule=schedule,
            length=f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs",
            seed=args.seed,
            n_bins=args.calibration_bins,
            posthoc=posthoc.describe(model.calibration),
            preset=args.preset,
            preset_options=", ".join(f"`{k}={v}`" for k, v in PRESETS.get(args.preset, {}).items()),
            preset_evidence=preset_evidence(args.preset),
        )


def model_card(reports: list[EvalReport], info: CardInfo) -> ModelCard:
    """Render the card: ``info`` fills the template; each report adds a row, two figures and ``EvalResult``s
    (accuracy, ECE, ACE, MCE, classwise ECE in percent; NLL, Brier, AURC) to the ``model-index``."""
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=info.dataset_name,
            dataset_name=info.dataset_name,
            dataset_split=report.name,
            metric_type=metric,
            metric_name=shown,
            metric_value=round(report.metrics[key], 6),
            metric_args={"n_bins": report.n_bins},
        )
        for report in reports
        for metric, (key, shown) in CARD_METRICS.items()
    ]
    card_data = ModelCardData(
        model_name=info.model_name,
        base_model=info.base_model or None,
        library_name="peft",
        pipeline_tag="image-classification",
        tags=list(CARD_TAGS),
        eval_results=eval_results or None,
    )
    template = resources.files("cmp_hf").joinpath("templates", CARD_TEMPLATE).read_text(encoding="utf-8")
    base = info.base_model
    url = f"https://huggingface.co/{base}" if base and not os.path.isdir(base) else None  # no link to a local dir
    return ModelCard.from_template(
        card_data, template_str=template, reports=reports, base_model_url=url, **asdict(info)
    )


def preset_evidence(preset: str | None) -> str:
    """The benchmark summary shipped for a preset (``templates/<preset>_benchmark.md``, written by
    ``recipes/bench_calibration.py --card_summary``), shown on the card of every prompt trained with it."""
    if preset is None:
        return ""
    summary = resources.files("cmp_hf").joinpath("templates", f"{preset}_benchmark.md")
    return summary.read_text(encoding="utf-8").strip() if summary.is_file() else ""


def _short_list(names: list[str], shown: int = 20) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

"""``CMPConfig``: the ``TrainingArguments`` of CMPTrainer, with the penalty, prompt and data options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .constants import PRESETS
from .learners import LEARNERS, learner_class
from .losses import CMP_COMPETITORS, CMP_FORMS, LossOptions
from .posthoc import PostHocArguments
from .prompts.config import CLASS_TOKEN_POSITIONS, PromptConfig

_INTRO = """Configuration of [`CMPTrainer`]: every [`~transformers.TrainingArguments`] option plus the fields below.

Defaults that differ from `TrainingArguments` follow CoOp (SGD, lr 2e-3, momentum 0.9, weight decay 5e-4, no
gradient clipping) and what a CLIP classifier needs (`label_names=["labels"]`, `remove_unused_columns=False`). Each
field's `help` (shown by a recipe's `--help`) is the text below.
"""
# Docstring sections: heading -> the fields documented under it (each field's text is its `help`).
_SECTIONS = {
    "Parameters that control the penalty": ("cmp_lambda", "cmp_form", "cmp_competitors"),
    "Calibration baselines (combinable with CMP)": (
        "label_smoothing_factor", "focal_gamma", "mbls_weight", "mbls_margin", "kgcoop_weight", "kgcoop_template",
    ),
    "Parameters that control the prompt": (
        "prompt_learner", "n_ctx", "ctx_init", "class_token_position", "class_specific_context", "prompt_template",
        "allow_duplicate_class_names", "maple_prompt_depth", "proda_num_prompts", "proda_prompts_per_step",
        "proda_diversity_weight", "learner_options",
    ),
    "Parameters that control the data and the evaluation": ("image_column", "label_column", "calibration_bins"),
    "Image features and augmentation": (
        "cache_image_features", "image_feature_cache_dir", "image_feature_batch_size", "augment", "augmented_views",
    ),
    "Learning-rate schedule": ("coop_schedule", "coop_warmup_epochs", "coop_warmup_lr"),
    "Post-hoc calibration, fitted after training and saved with the prompt": (
        "temperature_scaling", "shift_strength", "shift_neighbours", "zero_shot_weight", "transfer_zero_shot_weight",
        "zero_shot_min_accuracy",
    ),
    "The recommended recipe": ("preset",),
    "Output directory": ("overwrite_output_dir",),
}  # fmt: skip


@dataclass
class CMPConfig(PostHocArguments, TrainingArguments):
    # TrainingArguments defaults changed to CoOp's recipe and to what a CLIP classifier needs.
    learning_rate: float = field(default=2e-3, metadata={"help": "Initial learning rate (CoOp: 0.002)."})
    optim: str = field(default="sgd", metadata={"help": "Optimizer (CoOp: SGD)."})
    optim_args: str | None = field(default="momentum=0.9", metadata={"help": "Optimizer arguments (CoOp: 0.9)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (CoOp: 5e-4)."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"], metadata={"help": "CLIP's forward takes no labels: name them here."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image and label columns the collator reads."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Gradient clipping norm; 0 = no clipping, as CoOp (Trainer's default clips at 1.0)."},
    )
    label_smoothing_factor: float = field(
        default=0.0,
        metadata={
            "help": "TrainingArguments' own field: cross-entropy against targets smoothed by this factor (a "
            "calibration baseline; not together with focal loss)."
        },
    )

    cmp_lambda: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the CMP term: loss = cross-entropy + cmp_lambda * CMP. 0 gives plain CoOp; 1.0 is the "
            "authors' ICML-25 code default."
        },
    )
    cmp_form: str = field(
        default="log_ratio",
        metadata={
            "help": f"One of {CMP_FORMS}. 'log_ratio': logsumexp of the wrong logits that beat the true one minus "
            "the true logit (the paper's appendix; its gradient raises the true logit). 'ratio': p_true / sum of "
            "those wrong p (main text and released code; its gradient lowers the true logit)."
        },
    )
    cmp_competitors: str = field(
        default="all",
        metadata={
            "help": f"One of {CMP_COMPETITORS}: every wrong class that beats the true one, or only the top one."
        },
    )

    focal_gamma: float = field(
        default=0.0, metadata={"help": "Focal loss instead of cross-entropy when > 0 (not with label smoothing)."}
    )
    mbls_weight: float = field(
        default=0.0,
        metadata={"help": "Margin-based label smoothing (MbLS, Liu et al. 2022): weight alpha (paper: 0.1)."},
    )
    mbls_margin: float = field(default=10.0, metadata={"help": "MbLS: margin of its logit-distance hinge."})
    kgcoop_weight: float = field(
        default=0.0,
        metadata={
            "help": "KgCoOp: weight of the distance between the learned and the hand-crafted class text features "
            "(0 = CoOp exactly)."
        },
    )
    kgcoop_template: str | None = field(
        default=None,
        metadata={
            "help": "KgCoOp: the hand-crafted prompt, {} standing for the class. None: the suite dataset's CoOp "
            "template (as the released KgCoOp, e.g. 'a photo of a {}, a type of pet.') in a benchmark run, "
            "otherwise 'a photo of a {}.'."
        },
    )

    prompt_learner: str = field(
        default="coop",
        metadata={
            "help": f"The prompt learner, one of {sorted(LEARNERS)}. 'coop': a learned context. 'cocoop': an "
            "image-conditional context (a meta-network on the image features adds a bias to it); it runs the text "
            "encoder on batch x classes prompts per step, so keep batches small on CPU. 'maple': MaPLe, the context "
            "plus deep prompts in the text layers and vision prompts coupled to them by linear maps; the image "
            "tower is prompted, so image features are not cached (its released recipe: n_ctx 2, ctx_init 'a photo "
            "of a', of which the first n_ctx tokens are learned and the rest stay as text; depth 9; SGD lr 0.0035, "
            "batch 4, 5 epochs). 'proda': ProDA, proda_num_prompts contexts (a quarter with the class name in "
            "front, a quarter in the middle, the rest at the end) whose class features give a Gaussian per class; "
            "it trains on an upper bound of the expected cross-entropy and predicts with the mean features."
        },
    )
    n_ctx: int = field(
        default=16,
        metadata={"help": "Number of learned context vectors M (the token count of ctx_init when that is set)."},
    )
    ctx_init: str | None = field(
        default=None,
        metadata={
            "help": "Initialise the context from this text, e.g. 'a photo of a'; None draws it from N(0, 0.02)."
        },
    )
    class_token_position: str = field(
        default="end",
        metadata={"help": f"Where the class name goes relative to the context: one of {CLASS_TOKEN_POSITIONS}."},
    )
    class_specific_context: bool = field(
        default=False, metadata={"help": "One context per class (CoOp's CSC); it cannot transfer to new classes."}
    )
    prompt_template: str = field(
        default="{}.",
        metadata={"help": "Text around the class name, {} standing for it (CoOp's prompt ends with '{}.')."},
    )
    allow_duplicate_class_names: bool = field(
        default=False,
        metadata={"help": "Accept repeated class names (CLIP's ImageNet list repeats two); otherwise an error."},
    )

    maple_prompt_depth: int = field(
        default=9,
        metadata={
            "help": "MaPLe: prompt depth J, the number of layers (from the first) whose text context and vision "
            "prompts are learned; capped by the towers' depth (ViT-B/16: 12). 1 = prompts at the input only."
        },
    )
    proda_num_prompts: int = field(
        default=32,
        metadata={
            "help": "ProDA: the number K of learned contexts (the paper: 32). Every step encodes K x classes prompts "
            "(or proda_prompts_per_step x classes); K = 1 is CoOp."
        },
    )
    proda_prompts_per_step: int | None = field(
        default=None,
        metadata={
            "help": "ProDA: train each step on this many of the K contexts, as released (4 of 32): the K in a random "
            "order, this many at a time, a new order once all were used; it must divide K. The mean and spread of "
            "a step are those of its contexts (spread / (this + 1)); evaluation uses all K. None: all K every step."
        },
    )
    proda_diversity_weight: float = field(
        default=0.0,
        metadata={
            "help": "ProDA: weight of the released diversity term, the mean |cosine| between the features of the K "
            "class-free prompts (each context followed by '.'), all K every step (released: 0.1). Needs K > 1."
        },
    )

    learner_options: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Options of the prompt learner's own, by name (a mapping in YAML, JSON on the command line, "
            "e.g. '{\"gpa_mean\": 15}', which replaces the YAML's mapping whole); each learner lists its options "
            "and defaults in its module (PromptLearner.options) and refuses others. None: the learner's defaults."
        },
    )

    image_column: str = field(default="image", metadata={"help": "Dataset column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the integer class labels."})
    calibration_bins: int = field(
        default=10, metadata={"help": "Number of bins of ECE / ACE / MCE (10 as in the paper's evaluator)."}
    )

    cache_image_features: bool = field(
        default=True,
        metadata={
            "help": "Encode every image once with the frozen image tower and train / evaluate on the stored features "
            "(exact: same logits, same prompt, far fewer image-encoder passes). Off, or with a learner that prompts "
            "the image tower: images are encoded at every step."
        },
    )
    image_feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the feature cache lives; None uses <HF datasets cache>/cmp_hf_image_features."},
    )
    image_feature_batch_size: int = field(default=64, metadata={"help": "Batch size of the one-off image encoding."})
    augment: bool = field(
        default=False,
        metadata={
            "help": "CoOp's random resized crop + flip on training images. With the cache: a pool of augmented_views "
            "precomputed views per image, one drawn per access; without it: a fresh crop at every access."
        },
    )
    augmented_views: int = field(default=8, metadata={"help": "Cached views per training image when augment is on."})

    coop_schedule: bool = field(
        default=False,
        metadata={
            "help": "Use CoOp's schedule instead of lr_scheduler_type: coop_warmup_epochs epochs at the constant "
            "coop_warmup_lr, then cosine decay from learning_rate over the remaining epochs, stepped once per epoch."
        },
    )
    coop_warmup_epochs: int = field(default=1, metadata={"help": "CoOp's warm-up: epochs at coop_warmup_lr."})
    coop_warmup_lr: float = field(default=1e-5, metadata={"help": "CoOp's warm-up: its constant learning rate."})

    preset: str | None = field(
        default=None,
        metadata={
            "help": f"A named recipe, one of {sorted(PRESETS)}: sets the options it lists (see README, 'Calibrated by "
            "default'); an option given with another value than the preset's is an error. 'calibrated': the recipe "
            "chosen on the micro-CLIP benchmark to lower base, novel and shifted ECE against CoOp."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that already holds a finished run (a saved prompt or a recipe's "
            "metrics.json), replacing it: its prompt, card, metrics, eval/<set>/ reports and checkpoints are removed "
            "before training (other files stay). Off: such a run is refused, so a second run cannot "
            "silently overwrite the first (transformers 5 removed TrainingArguments' own option). Resuming a run "
            "(resume_from_checkpoint) needs no overwrite."
        },
    )

    def __post_init__(self) -> None:
        _check_numbers_are_numbers(self)
        self._apply_preset()
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(
                f"num_train_epochs is {self.num_train_epochs:g} and max_steps is unset: training would take no step "
                "and the untrained prompt's numbers would be reported as the trained run's. Set num_train_epochs "
                "(or max_steps) > 0; to evaluate the untrained prompt, use zero_shot_baseline or trainer.evaluate() "
                "without train()."
            )
        self.loss_options()  # validates the loss fields now, before any model is loaded
        self.posthoc_calibration()  # and the post-hoc ones, which are only used after training
        if self.kgcoop_template is not None and self.kgcoop_template.count("{}") != 1:
            raise ValueError(f"kgcoop_template must contain '{{}}' once, got {self.kgcoop_template!r}.")
        if self.calibration_bins < 1:
            raise ValueError(f"calibration_bins must be >= 1, got {self.calibration_bins}.")
        if self.augmented_views < 1 or self.image_feature_batch_size < 1:
            raise ValueError("augmented_views and image_feature_batch_size must be >= 1.")
        if self.coop_warmup_epochs < 0 or self.coop_warmup_lr < 0:
            raise ValueError("coop_warmup_epochs and coop_warmup_lr must be >= 0.")
        self._check_proda_options()
        if isinstance(self.learner_options, str):
            self.learner_options = _json_mapping("learner_options", self.learner_options)
        # validates the prompt and learner options now, and the losses the learner can train with
        learner_class(self.prompt_config(class_names=["_"])).check_loss_options(self.loss_options())
        super().__post_init__()

    def _apply_preset(self) -> None:
        """Set the preset's options; one the caller set to another value than the preset's is an error (a field
        still at its default is taken to be unset)."""
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}: use one of {sorted(PRESETS)}, or none.")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PRESETS[self.preset].items():
            given = getattr(self, name)
            if given != defaults[name] and given != value:
                raise ValueError(
                    f"preset {self.preset!r} sets {name}={value!r}, but {name}={given!r} was given: drop one of "
                    "them (without the preset, every option is yours to set)."
                )
            setattr(self, name, value)

    def _check_proda_options(self) -> None:
        per_step, k = self.proda_prompts_per_step, self.proda_num_prompts
        if (per_step is not None or self.proda_diversity_weight) and self.prompt_learner != "proda":
            raise ValueError(
                "proda_prompts_per_step and proda_diversity_weight are ProDA's: set prompt_learner: proda or leave "
                "them unset."
            )
        if per_step is not None and not (1 <= per_step <= k and k % per_step == 0):
            raise ValueError(
                f"proda_prompts_per_step is {per_step}: it must divide proda_num_prompts ({k}), as in the released "
                "trainer (4 of 32), or be unset (all K every step)."
            )
        if self.proda_diversity_weight and k < 2:
            raise ValueError("proda_diversity_weight compares the K contexts with each other: it needs K >= 2.")

    def loss_options(self) -> LossOptions:
        """The training objective these arguments describe (``cmp_hf.losses.training_objective``)."""
        return LossOptions(**{name: getattr(self, name) for name in LossOptions.__dataclass_fields__})

    def prompt_config(self, class_names: list[str], base_model_name_or_path: str | None = None) -> PromptConfig:
        """The prompt these arguments describe, for ``class_names``."""
        return PromptConfig(
            class_names=class_names,
            n_ctx=self.n_ctx,
            ctx_init=self.ctx_init,
            class_token_position=self.class_token_position,
            class_specific_context=self.class_specific_context,
            template=self.prompt_template,
            base_model_name_or_path=base_model_name_or_path,
            allow_duplicate_names=self.allow_duplicate_class_names,
            learner=self.prompt_learner,
            maple_prompt_depth=self.maple_prompt_depth,
            proda_num_prompts=self.proda_num_prompts,
            learner_options=self.learner_options or {},
        )


def _check_numbers_are_numbers(config: CMPConfig) -> None:
    """Refuse a string where a number belongs (``CMPConfig(cmp_lambda="0.5")`` from Python; the command line
    converts its strings), which would otherwise fail as a ``TypeError`` deep inside the loss or the optimizer."""
    for f in fields(config):
        value = getattr(config, f.name, None)
        if isinstance(value, str) and f.type in _NUMBER_TYPES:
            raise TypeError(
                f"{f.name} must be a number, got the string {value!r}: pass {f.name}={value.strip()} without quotes "
                f"(or convert it with {'int' if f.type in (int, 'int') else 'float'}(...))."
            )


_NUMBER_TYPES = (float, int, "float", "int")


def _json_mapping(name: str, text: str) -> dict[str, Any]:
    """A mapping option given as text (the command line): JSON, e.g. ``'{"gpa_mean": 15}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{name} must be a JSON object such as '{{\"gpa_mean\": 15}}', got {text!r}: {error}."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a mapping of option names to values), got {text!r}.")
    return value


def _docstring() -> str:
    """The class docstring, from the fields' own help texts (one source for the docs and for ``--help``)."""
    found = {f.name: f for f in fields(CMPConfig)}
    lines = [_INTRO]
    for heading, names in _SECTIONS.items():
        lines.append(f"> {heading}\n")
        for name in names:
            f = found[name]
            lines.append(f"{name} (`{f.type}`, defaults to `{f.default!r}`):\n    {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


CMPConfig.__doc__ = _docstring()

# CMP's default settings, read from the fields above (the sweep's "cmp" loss, the report's method names, run.json's
# defaults): changing a default there changes them everywhere.
CMP_DEFAULTS: dict[str, object] = {
    f.name: f.default for f in fields(CMPConfig) if f.name in _SECTIONS["Parameters that control the penalty"]
}

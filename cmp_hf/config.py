"""``CMPConfig``: the ``TrainingArguments`` of CMPTrainer, with the penalty, prompt and data options."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import CMP_COMPETITORS, CMP_FORMS
from .prompts.coop import CLASS_TOKEN_POSITIONS, CoOpPromptConfig


@dataclass
class CMPConfig(TrainingArguments):
    r"""Configuration of [`CMPTrainer`]: every [`~transformers.TrainingArguments`] option plus the fields below.

    Defaults that differ from `TrainingArguments` follow CoOp (SGD, lr 2e-3, momentum 0.9, weight decay 5e-4) and
    what a CLIP classifier needs (`label_names=["labels"]`, `remove_unused_columns=False`).

    > Parameters that control the penalty

    cmp_lambda (`float`, defaults to `1.0`):
        Weight of the CMP term: loss = cross-entropy + cmp_lambda * CMP. `0` gives plain CoOp. 1.0 is the authors'
        ICML-25 code default.
    cmp_form (`str`, defaults to `"log_ratio"`):
        `"log_ratio"` (logsumexp of winning wrong logits minus the true logit; the paper's appendix) or `"ratio"`
        (p_true / sum of winning wrong p; the released code).
    cmp_competitors (`str`, defaults to `"all"`):
        `"all"` wrong classes that beat the true class, or only the `"top1"` wrong class.

    > Calibration baselines (combinable with CMP; see cmp_hf/losses/baselines.py)

    label_smoothing_factor (`float`, defaults to `0.0`):
        TrainingArguments' own field: cross-entropy against smoothed targets.
    focal_gamma (`float`, defaults to `0.0`):
        Focal loss instead of cross-entropy when > 0 (not together with label smoothing).
    mbls_weight (`float`, defaults to `0.0`), mbls_margin (`float`, defaults to `10.0`):
        Margin-based label smoothing (MbLS): weight alpha (paper: 0.1) and margin of its logit-distance hinge.
    kgcoop_weight (`float`, defaults to `0.0`), kgcoop_template (`str`, defaults to `"a photo of a {}."`):
        KgCoOp: weight of the distance between learned and hand-crafted class text features (0 = CoOp exactly).

    > Parameters that control the prompt (CoOp)

    n_ctx (`int`, defaults to `16`):
        Number of learned context vectors M (replaced by the token count of `ctx_init` when that is set).
    ctx_init (`str` or `None`, defaults to `None`):
        Initialise the context from this text, e.g. `"a photo of a"`; `None` draws it from N(0, 0.02).
    class_token_position (`str`, defaults to `"end"`):
        `"end"`, `"middle"` or `"front"`.
    class_specific_context (`bool`, defaults to `False`):
        One context per class (CoOp's CSC).
    prompt_learner (`str`, defaults to `"coop"`):
        `"coop"`, or `"cocoop"`: an image-conditional context (a meta-network on the image features adds a bias to
        the context). CoCoOp runs the text encoder on batch x classes prompts per step: keep batches small on CPU.
    prompt_template (`str`, defaults to `"{}."`):
        Text around the class name, `{}` standing for it.
    allow_duplicate_class_names (`bool`, defaults to `False`):
        Accept repeated class names (CLIP's ImageNet list repeats two); otherwise a repeat is an error.

    > Parameters that control the data and the evaluation

    image_column (`str`, defaults to `"image"`), label_column (`str`, defaults to `"label"`):
        Dataset columns holding the images and the integer class labels.
    calibration_bins (`int`, defaults to `10`):
        Number of bins of ECE / ACE / MCE (10 as in the paper's evaluator).

    > Image features and augmentation

    cache_image_features (`bool`, defaults to `True`):
        Encode every image once with the frozen image tower and train / evaluate on the stored features (exact:
        same logits, same prompt, far fewer image-encoder passes). Off: images are encoded at every step.
    image_feature_cache_dir (`str` or `None`, defaults to `None`):
        Where the cache lives; `None` uses `<HF datasets cache>/cmp_hf_image_features`.
    image_feature_batch_size (`int`, defaults to `64`):
        Batch size of the one-off encoding.
    augment (`bool`, defaults to `False`):
        CoOp's random resized crop + flip on training images. With the cache: a pool of `augmented_views`
        precomputed views per image, one drawn per access; without it: a fresh crop at every access.
    augmented_views (`int`, defaults to `8`):
        Views per training image in the cache when `augment` is on.

    > Learning-rate schedule

    coop_schedule (`bool`, defaults to `False`):
        Use CoOp's schedule instead of `lr_scheduler_type`: the first `coop_warmup_epochs` epochs at the constant
        `coop_warmup_lr`, then cosine decay from `learning_rate` over the remaining epochs, stepped once per epoch.
    coop_warmup_epochs (`int`, defaults to `1`), coop_warmup_lr (`float`, defaults to `1e-5`):
        CoOp's warm-up.
    """

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

    cmp_lambda: float = field(default=1.0, metadata={"help": "Weight of the CMP term (0 = plain CoOp)."})
    cmp_form: str = field(default="log_ratio", metadata={"help": f"CMP form: one of {CMP_FORMS}."})
    cmp_competitors: str = field(default="all", metadata={"help": f"CMP competitors: one of {CMP_COMPETITORS}."})

    focal_gamma: float = field(default=0.0, metadata={"help": "Focal loss gamma (0 = cross-entropy)."})
    mbls_weight: float = field(default=0.0, metadata={"help": "Weight of the MbLS margin penalty."})
    mbls_margin: float = field(default=10.0, metadata={"help": "Margin of MbLS."})
    kgcoop_weight: float = field(default=0.0, metadata={"help": "Weight of KgCoOp's text-feature distance."})
    kgcoop_template: str = field(default="a photo of a {}.", metadata={"help": "KgCoOp's hand-crafted prompt."})

    n_ctx: int = field(default=16, metadata={"help": "Number of learned context vectors M."})
    ctx_init: str | None = field(default=None, metadata={"help": "Text that initialises the context."})
    class_token_position: str = field(default="end", metadata={"help": f"One of {CLASS_TOKEN_POSITIONS}."})
    class_specific_context: bool = field(default=False, metadata={"help": "One context per class (CSC)."})
    prompt_learner: str = field(default="coop", metadata={"help": "coop or cocoop (image-conditional context)."})
    prompt_template: str = field(default="{}.", metadata={"help": "Text around the class name ({})."})
    allow_duplicate_class_names: bool = field(default=False, metadata={"help": "Accept repeated class names."})

    image_column: str = field(default="image", metadata={"help": "Dataset column with the images."})
    label_column: str = field(default="label", metadata={"help": "Dataset column with the class labels."})
    calibration_bins: int = field(default=10, metadata={"help": "Bins of ECE / ACE / MCE."})

    cache_image_features: bool = field(default=True, metadata={"help": "Encode each image once (exact)."})
    image_feature_cache_dir: str | None = field(default=None, metadata={"help": "Directory of the feature cache."})
    image_feature_batch_size: int = field(default=64, metadata={"help": "Batch size of the one-off encoding."})
    augment: bool = field(default=False, metadata={"help": "Random resized crop + flip on training images."})
    augmented_views: int = field(default=8, metadata={"help": "Cached views per training image with augment."})

    coop_schedule: bool = field(default=False, metadata={"help": "Use CoOp's warm-up + per-epoch cosine schedule."})
    coop_warmup_epochs: int = field(default=1, metadata={"help": "Epochs at coop_warmup_lr."})
    coop_warmup_lr: float = field(default=1e-5, metadata={"help": "Constant learning rate of the warm-up."})

    def __post_init__(self) -> None:
        if self.cmp_lambda < 0:
            raise ValueError(f"cmp_lambda must be >= 0 (0 disables CMP), got {self.cmp_lambda}.")
        if self.cmp_form not in CMP_FORMS:
            raise ValueError(f"Unknown cmp_form {self.cmp_form!r}: use one of {CMP_FORMS}.")
        if self.cmp_competitors not in CMP_COMPETITORS:
            raise ValueError(f"Unknown cmp_competitors {self.cmp_competitors!r}: use one of {CMP_COMPETITORS}.")
        if min(self.focal_gamma, self.mbls_weight, self.mbls_margin, self.kgcoop_weight) < 0:
            raise ValueError("focal_gamma, mbls_weight, mbls_margin and kgcoop_weight must be >= 0.")
        if self.focal_gamma and self.label_smoothing_factor:
            raise ValueError("Choose focal loss (focal_gamma) or label smoothing (label_smoothing_factor), not both.")
        if self.kgcoop_template.count("{}") != 1:
            raise ValueError(f"kgcoop_template must contain '{{}}' once, got {self.kgcoop_template!r}.")
        if self.calibration_bins < 1:
            raise ValueError(f"calibration_bins must be >= 1, got {self.calibration_bins}.")
        if self.augmented_views < 1 or self.image_feature_batch_size < 1:
            raise ValueError("augmented_views and image_feature_batch_size must be >= 1.")
        if self.coop_warmup_epochs < 0 or self.coop_warmup_lr < 0:
            raise ValueError("coop_warmup_epochs and coop_warmup_lr must be >= 0.")
        # Validates n_ctx, position and template now, before any model is loaded.
        self.prompt_config(class_names=["_"])
        super().__post_init__()

    def prompt_config(self, class_names: list[str], base_model_name_or_path: str | None = None) -> CoOpPromptConfig:
        """The CoOp prompt these arguments describe, for ``class_names``."""
        return CoOpPromptConfig(
            class_names=class_names,
            n_ctx=self.n_ctx,
            ctx_init=self.ctx_init,
            class_token_position=self.class_token_position,
            class_specific_context=self.class_specific_context,
            template=self.prompt_template,
            base_model_name_or_path=base_model_name_or_path,
            allow_duplicate_names=self.allow_duplicate_class_names,
            learner=self.prompt_learner,
        )

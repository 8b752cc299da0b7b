"""What every prompt learner provides, so that ``PromptTunedCLIP`` and ``CMPTrainer`` never ask which one they have.

A learner turns the learned context (the peft prompt embedding, owned by ``PromptTunedCLIP``) and, where it needs
them, image features into class text features. Parameters that peft has no slot for (CoCoOp's meta-network) are the
learner's own ``nn.Module`` parameters: they train with the context and are saved as safetensors beside the peft
adapter under :attr:`PromptLearner.weights_name`. A learner is built for one list of class names; a transfer to
other classes builds the same learner for those names and hands over its own weights (:meth:`for_classes`).

To add a learner: subclass this (usually through ``CoOpLearner``) in a module of its own and add it to
``cmp_hf.learners.LEARNERS``. Everything else a learner needs goes through this class, so that neither the trainer
nor the configs ask which learner they have: its own options (:attr:`PromptLearner.options`, carried by
``PromptConfig.learner_options``), loss terms of its own (:meth:`PromptLearner.regularization`) and what it does
between steps or epochs (:meth:`PromptLearner.training_callbacks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase, TrainerCallback

from ..losses import LossOptions, WeightedTerm
from ..prompts.config import PromptConfig, resolve_n_ctx

if TYPE_CHECKING:  # both import the learners
    from ..config import CMPConfig
    from ..modeling import PromptTunedCLIPOutput


class PromptLearner(nn.Module):
    """Base class of prompt learners; subclasses set the class attributes and implement :meth:`text_features`.

    A subclass is built as ``Learner(clip, tokenizer, config, pad_prompts_to=None)`` (``clip`` is not kept as a
    submodule: ``PromptTunedCLIP`` owns it and passes it to every call) and creates its own parameters in
    :meth:`build_weights`.

    Class attributes:
        name: the key of the learner in ``cmp_hf.learners.LEARNERS`` and in ``prompt_config.json``.
        title: how the model card names the learner (its paper's spelling).
        caches_image_features: whether image features are those of the frozen image tower, so that the trainer may
            encode each image once and train on stored features. A learner that prompts the image tower too says
            ``False``, and the trainer then encodes images at every step.
        conditional: whether class text features depend on the image (then ``text_features`` returns one set per
            image, (B, C, D), and evaluation cannot compute them once for all images).
        weights_name: file, beside the peft adapter, holding :meth:`extra_state_dict` (``None``: nothing to save).
        shares_prefix: whether the learner's text encoding admits the exact shared-prefix path
            (``cmp_hf.prompts.shared_prefix``) where its prompts share a prefix. A learner that alters the text
            encoder's hidden states inside the layers (MaPLe's deep prompts) or encodes its prompts itself (ProDA)
            says ``False`` and keeps Hugging Face's full forward.
        options: the learner's own options and their defaults (``PromptConfig.learner_options`` sets them by
            name; :meth:`option` reads them); checked by name and type before any model is built.
        test_options: ``PromptConfig`` (and ``CMPConfig``) keywords for a small prompt that uses every kind of
            weight this learner has and that it accepts (ProDA: K = 4 contexts, one per class-name layout at least,
            and no ``ctx_init``); the test suite builds each registered learner with them, so that a new learner is
            tested without editing the tests.

    Instance attributes (set by ``PromptTunedCLIP.activation_checkpointing_enable``, carried by
    :meth:`for_classes`):
        checkpoint_text: recompute the class prompts' activations in the backward instead of keeping them.
        text_chunk_classes: with ``checkpoint_text``, at most this many classes per recomputed group (``None``:
            one group per length bucket); smaller groups lower the peak memory of the backward.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    caches_image_features: ClassVar[bool] = True
    conditional: ClassVar[bool] = False
    weights_name: ClassVar[str | None] = None
    shares_prefix: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}
    test_options: ClassVar[dict[str, Any]] = {}
    checkpoint_text: bool = False
    text_chunk_classes: int | None = None

    @classmethod
    def check_config(cls, config: PromptConfig) -> None:
        """Raise ``ValueError`` for prompt options this learner cannot take (called before any model is built)."""

    @classmethod
    def check_options(cls, config: PromptConfig) -> None:
        """Refuse ``learner_options`` this learner does not declare, or of another type than their default's."""
        unknown = sorted(set(config.learner_options) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise ValueError(f"learner_options {unknown} are not options of {cls.title} (its options: {known}).")
        for name, value in config.learner_options.items():
            default = cls.options[name]
            numeric = isinstance(default, float) and isinstance(value, int)  # 15 for 15.0
            same_type = isinstance(value, type(default)) or numeric
            if not same_type or isinstance(value, bool) != isinstance(default, bool):
                raise ValueError(
                    f"learner_options {name} of {cls.title} must be a {type(default).__name__} (default {default!r}), "
                    f"got {value!r}."
                )

    @classmethod
    def option(cls, config: PromptConfig, name: str) -> Any:
        """The value of the learner's option ``name``: as set in ``config.learner_options``, else its default."""
        return config.learner_options.get(name, cls.options[name])

    @classmethod
    def check_loss_options(cls, options: LossOptions) -> None:
        """Raise ``ValueError`` for training losses that make no sense with this learner (called by ``CMPConfig``)."""

    @classmethod
    def resolve_config(cls, config: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> PromptConfig:
        """The prompt config a new prompt is built from: with ``ctx_init``, M is its token count (CoOp's rule)."""
        return resolve_n_ctx(config, tokenizer)

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        """Create the learner's own parameters (CoCoOp's meta-network, ...), once its prompts are tokenized; a
        learner whose only weights are the peft context has none."""

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised class text features (ProDA: the mean of its K unit features, which is not renormalised),
        differentiable w.r.t. ``context`` and the learner's parameters:
        (C, D), or (B, C, D) for a conditional learner given ``image_features`` (without them, its (C, D) features
        of the context alone, which image-independent uses such as DAC's distances take)."""
        raise NotImplementedError

    def text_distribution(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class text features and, for a learner that learns a distribution of them (ProDA), their spread:
        (C, K, D) with ``Cov(t_i[d], t_j[d]) = sum_k spread[i, k, d] * spread[j, k, d]`` (independent dimensions
        d). ``None``: one feature per class, nothing random, which is every learner but ProDA."""
        return self.text_features(clip, context, image_features), None

    @torch.no_grad()
    def image_features(
        self, clip: CLIPModel, pixel_values: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised features of the frozen image tower (no graph is kept: nothing there trains). ``context``
        is for a learner that prompts the image tower from the text context (MaPLe); this one ignores it."""
        pooled = clip.vision_model(pixel_values=pixel_values.to(clip.dtype)).pooler_output
        return F.normalize(clip.visual_projection(pooled), dim=-1)

    def regularization(
        self,
        clip: CLIPModel,
        context: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        outputs: PromptTunedCLIPOutput,
        args: CMPConfig,
    ) -> dict[str, WeightedTerm]:
        """Loss terms of the learner's own for the batch ``inputs`` (without labels) whose forward gave ``outputs``,
        by the name they are logged under: the trainer adds ``weight * value`` to the loss and logs each value.
        Called in training and in evaluation (``self.training`` tells which). None by default."""
        return {}

    def training_callbacks(self, args: CMPConfig) -> list[TrainerCallback]:
        """Callbacks the trainer adds for this learner (its per-step sampling, its per-epoch averaging, ...); the
        model reaches them as the ``model`` keyword of every event. None by default."""
        return []

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """The learner's own weights (saved under :attr:`weights_name`); empty for a learner with none."""
        return {}

    def load_extra_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state_dict` returned; ``ValueError`` naming the shapes where they are not this
        learner's (weights saved for another prompt configuration or base model)."""

    def for_classes(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> PromptLearner:
        """The same learner for ``config``'s classes, carrying this one's weights (a transfer to new classes)."""
        other = type(self)(clip, tokenizer, config)
        other.load_extra_state_dict(self.extra_state_dict())
        other.checkpoint_text, other.text_chunk_classes = self.checkpoint_text, self.text_chunk_classes
        return other.to(clip.device)

"""A frozen CLIPModel plus a peft-owned prompt and its learner: images (or cached features) in, class logits out.

peft has no CoOp method, but ``PromptTuningConfig`` on a ``PeftModel`` gives exactly what CoOp learns: an
``nn.Embedding`` of M prompt vectors, saved as a standard adapter (``adapter_model.safetensors`` with
``prompt_embeddings``, ``adapter_config.json``) that plain ``PeftModel.from_pretrained`` restores. peft's own
prompt-tuning forward (virtual tokens prepended through ``inputs_embeds``) does not apply to CLIP, so this module
never calls it: the prompt learner (``cmp_hf.learners``) reads the vectors and writes them into the text encoder.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from peft import PeftModel, PromptTuningConfig
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .atomic import save_safetensors, staged_directory
from .base_model import check_clip_source, portable_name
from .constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PROMPT_CONFIG_NAME, PROMPT_FILES
from .hub import fetch_prompt
from .integrity import load_weights_file, verify_digests, write_digests
from .learners import PromptLearner, learner_class
from .posthoc import PostHocCalibration, distance_aware_scales
from .prompts.config import FORMAT_VERSION, PromptConfig, initial_context

logger = logging.getLogger(__name__)

ZERO_SHOT_TEMPLATE = "a photo of a {}."  # CLIP's generic prompt: KgCoOp's anchor where no dataset template is known


@dataclass
class PromptTunedCLIPOutput(ModelOutput):
    """``logits``: (B, C) = logit_scale * cos(image, class text), post-hoc calibrated; features are L2-normalised
    (text features are (C, D), or (B, C, D) for a learner whose prompts depend on the image). ``text_spread``: for a
    learner with Gaussian class features (ProDA), their spread (C, K, D) in logit units (times ``logit_scale``), from
    which the trainer computes ProDA's loss; ``None`` otherwise and whenever the text features were fixed."""

    logits: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    text_spread: torch.Tensor | None = None

    def first_rows(self, rows: int) -> PromptTunedCLIPOutput:
        """These outputs for the batch's first ``rows`` images; the class-wise tensors as they are."""
        image, text = self.image_features, self.text_features
        return PromptTunedCLIPOutput(
            logits=self.logits[:rows],
            image_features=None if image is None else image[:rows],
            text_features=text[:rows] if text is not None and text.dim() == 3 else text,
            text_spread=self.text_spread,
        )


class PromptTunedCLIP(nn.Module):
    """CLIP classifier over a fixed list of classes whose text prompts carry a learned context.

    Trainable: the prompt vectors (``peft_model.prompt_encoder``) and the learner's own parameters (CoCoOp's
    meta-network, MaPLe's deep prompts and coupling maps, ProDA's other contexts); everything in CLIP,
    ``logit_scale`` included, is frozen. ``forward`` takes ``pixel_values`` or precomputed, L2-normalised
    ``image_features`` and applies the post-hoc ``calibration`` to the logits.

    Build one with :meth:`from_clip` (fresh prompt) or :meth:`from_pretrained` (a saved prompt);
    :meth:`save_pretrained` writes the peft adapter, ``prompt_config.json``, the learner's weights and the
    calibration.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        prompt_config: PromptConfig,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to: int | None = None,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.prompt_config = prompt_config
        self.tokenizer = tokenizer
        clip = self.clip
        self.learner: PromptLearner = learner_class(prompt_config)(clip, tokenizer, prompt_config, pad_prompts_to)
        expected = (prompt_config.num_context_vectors, clip.config.text_config.hidden_size)
        if tuple(self.context.shape) != expected:
            raise ValueError(
                f"The adapter holds prompt vectors of shape {tuple(self.context.shape)} but {PROMPT_CONFIG_NAME} and "
                f"the base model need {expected} ({prompt_config.n_ctx} context vectors"
                f"{' per class' if prompt_config.class_specific_context else ''}, text width {expected[1]})."
            )
        for name, param in peft_model.named_parameters():
            param.requires_grad_(name.startswith("prompt_encoder."))
        self.calibration = PostHocCalibration()
        self._fixed_text_features: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_clip(
        cls,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_config: PromptConfig,
        pad_prompts_to: int | None = None,
    ) -> PromptTunedCLIP:
        """Attach a new prompt to ``clip`` (initialised from ``ctx_init`` or N(0, 0.02)).

        Prompts are padded to the longest one; ``pad_prompts_to=77`` reproduces CoOp's fixed length (same features,
        more compute), which the speed benchmark uses as its reference.
        """
        prompt_config = learner_class(prompt_config).resolve_config(prompt_config, tokenizer)
        base = prompt_config.base_model_name_or_path or clip.name_or_path or None
        if base is not None:  # a relative directory would only resolve from where this run started
            prompt_config = replace(prompt_config, base_model_name_or_path=portable_name(base))
        text_config = clip.config.text_config
        peft_config = PromptTuningConfig(
            task_type=None,
            num_virtual_tokens=prompt_config.num_context_vectors,
            token_dim=text_config.hidden_size,
            num_transformer_submodules=1,
            num_layers=text_config.num_hidden_layers,
            num_attention_heads=text_config.num_attention_heads,
        )
        peft_model = _quietly(lambda: PeftModel(clip, peft_config))
        context = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        with torch.no_grad():
            context.copy_(initial_context(prompt_config, tokenizer, clip.text_model.embeddings.token_embedding))
        return cls(peft_model, prompt_config, tokenizer, pad_prompts_to)

    @classmethod
    def from_pretrained(
        cls,
        prompt_path: str | os.PathLike,
        clip: CLIPModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        base_model: str | None = None,
        verify_digest: bool = True,
    ) -> PromptTunedCLIP:
        """Load a prompt saved by :meth:`save_pretrained` (a directory or a Hub repo id) onto ``clip`` (default: the
        base model it names, or ``base_model`` when given: a Hub id or directory of the same CLIP elsewhere). Only
        JSON and safetensors files are read, and the learned tensors and the settings that change the logits are
        checked against their saved digests (``verify_digest=False`` skips that, to rescue a prompt whose digest was
        lost: save it again to record a new one)."""
        prompt_path = fetch_prompt(prompt_path)
        prompt_config, calibration = read_prompt_files(prompt_path, verify_digest)
        if base_model is not None:
            prompt_config = replace(prompt_config, base_model_name_or_path=portable_name(base_model))
        base = prompt_config.base_model_name_or_path
        if clip is None or tokenizer is None:
            _check_base_model(base, overridden=base_model is not None)
        clip = clip if clip is not None else CLIPModel.from_pretrained(base)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
        _check_adapter_shape(prompt_path, prompt_config, clip)
        model = cls(_quietly(lambda: PeftModel.from_pretrained(clip, prompt_path)), prompt_config, tokenizer)
        model.load_learner_weights(prompt_path)
        model.calibration = calibration
        return model

    def load_learner_weights(self, prompt_path: str | os.PathLike) -> None:
        """The learner's own weights (CoCoOp's meta-network) from the safetensors file beside the adapter."""
        name = self.learner.weights_name
        if name is None:
            return
        path = os.path.join(prompt_path, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{prompt_path} holds a {self.learner.name} prompt but has no {name}.")
        self.learner.load_extra_state_dict(load_weights_file(path))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the peft adapter (safetensors), ``prompt_config.json``, the learner's weights and the post-hoc
        calibration; :meth:`from_pretrained` reads them all. Each file replaces the old one whole (staged, then
        renamed), so a failed save leaves the previous prompt readable."""
        with staged_directory(save_directory) as staging:
            self.peft_model.save_pretrained(staging, safe_serialization=True, **kwargs)
            self.prompt_config.save_pretrained(staging)
            if self.learner.weights_name is not None:
                save_safetensors(self.learner.extra_state_dict(), os.path.join(staging, self.learner.weights_name))
            weights = [ADAPTER_WEIGHTS_NAME, *filter(None, [self.learner.weights_name])]
            write_digests(staging, weights, _logit_settings(self.prompt_config, self.calibration))
        self.calibration.save_pretrained(save_directory)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
        text_chunk_classes: int | None = None,
    ) -> None:
        """What ``Trainer`` calls for ``gradient_checkpointing=True`` / ``activation_checkpointing=True``: the
        class prompts' text encoding (the activations that grow with the number of classes; the image tower is
        frozen and keeps none) is recomputed in the backward, ``text_chunk_classes`` classes at a time at most
        (``None``: one length bucket at a time). Applies to the shared-prefix path; prompts that take Hugging
        Face's full forward keep their activations. Trainer's other options have nothing to act on here."""
        self.learner.checkpoint_text, self.learner.text_chunk_classes = True, text_chunk_classes

    def activation_checkpointing_disable(self) -> None:
        self.learner.checkpoint_text = False

    # ---- other classes ------------------------------------------------------------------------------------------

    def for_classes(self, class_names: list[str]) -> PromptTunedCLIP:
        """The same learned context (and learner weights, and calibration) over other classes: CoOp's transfer to
        novel classes or shifted datasets. A new prompt on the same frozen CLIP; needs a shared context."""
        learner, config, calibration = self._transfer(class_names)
        peft_config = self.peft_model.peft_config[self.peft_model.active_adapter]
        peft_model = _quietly(lambda: PeftModel(self.clip, peft_config))
        other = PromptTunedCLIP(peft_model, config, self.tokenizer).to(self.context.device)
        other.learner, other.calibration = learner, calibration
        with torch.no_grad():
            other.context.copy_(self.context)
        return other

    @contextmanager
    def over_classes(self, class_names: list[str]) -> Iterator[None]:
        """Classify over ``class_names`` inside the block, with this very context (no copy): what the trainer's
        transfer evaluation uses, so a model the trainer has prepared stays the model it evaluates."""
        saved = self.learner, self.prompt_config, self.calibration
        self.learner, self.prompt_config, self.calibration = self._transfer(class_names)
        try:
            yield
        finally:
            self.learner, self.prompt_config, self.calibration = saved

    def _transfer(self, class_names: list[str]) -> tuple[PromptLearner, PromptConfig, PostHocCalibration]:
        if self.prompt_config.class_specific_context:
            raise ValueError("A class-specific context (CSC) has no vectors for new classes: it cannot transfer.")
        config = replace(self.prompt_config, class_names=list(class_names), ctx_init=None)
        learner = self.learner.for_classes(self.clip, self.tokenizer, config)
        scales = None
        if self.calibration.dac_k is not None:  # DAC compares the classes' text features with the base classes'
            with torch.no_grad():
                scales = distance_aware_scales(
                    self.hand_crafted_text_features(),
                    hand_crafted_text_features(self.clip, self.tokenizer, config.class_names),
                    self.text_features(),
                    learner.text_features(self.clip, self.context),
                    k=self.calibration.dac_k,
                )
        calibration = self.calibration.to_new_classes(scales)
        return learner, config, calibration

    # ---- forward ------------------------------------------------------------------------------------------------

    @property
    def clip(self) -> CLIPModel:
        return self.peft_model.get_base_model()

    @property
    def config(self):
        """The CLIP's config: Trainer reads ``model.config`` (e.g. when ``label_smoothing_factor`` is set)."""
        return self.clip.config

    @property
    def context(self) -> nn.Parameter:
        """The learned context vectors, (M, d) or (C * M, d) with class-specific context."""
        return self.peft_model.prompt_encoder[self.peft_model.active_adapter].embedding.weight

    @property
    def class_names(self) -> list[str]:
        return self.prompt_config.class_names

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features, differentiable w.r.t. the context and the learner's weights: (C, D),
        or (B, C, D) for a learner whose prompts depend on the image (which then needs ``image_features``)."""
        return self.learner.text_features(self.clip, self.context, image_features)

    @torch.no_grad()
    def hand_crafted_text_features(self, template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
        """L2-normalised features of the plain text prompts ``template.format(class name)`` (CLIP's zero-shot
        classifier; KgCoOp's anchor; DAC's reference). No learned context is involved."""
        return hand_crafted_text_features(self.clip, self.tokenizer, self.class_names, template)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features, as the learner computes them (the frozen image tower for CoOp; prompted
        from the context for MaPLe)."""
        return self.learner.image_features(self.clip, pixel_values, self.context)

    @contextmanager
    def fixed_text_features(self, features: torch.Tensor | None = None) -> Iterator[None]:
        """Compute the class text features once and reuse them for every forward inside the block (evaluation);
        ``features``: those of these very weights, computed earlier (``CalibratedCLIP`` keeps them across calls).
        A learner whose features depend on the image has nothing fixed."""
        if self.learner.conditional:
            yield
            return
        if features is None:
            with torch.no_grad():
                features = self.text_features()
        self._fixed_text_features = features
        try:
            yield
        finally:
            self._fixed_text_features = None

    def forward(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> PromptTunedCLIPOutput:
        if (pixel_values is None) == (image_features is None):
            raise ValueError("Pass exactly one of pixel_values or image_features (L2-normalised, precomputed).")
        if image_features is None:
            image_features = self.image_features(pixel_values)
        text, spread = self._fixed_text_features, None
        if text is None:
            text, spread = self.learner.text_distribution(self.clip, self.context, image_features)
        scale = self.clip.logit_scale.exp()
        if text.dim() == 3:  # one set of class prompts per image
            logits = scale * torch.einsum("bd,bcd->bc", image_features.to(text.dtype), text)
        else:
            logits = scale * image_features.to(text.dtype) @ text.t()
        return PromptTunedCLIPOutput(
            logits=self.calibration.apply(logits, image_features, self._zero_shot_logits(image_features, scale)),
            image_features=image_features,
            text_features=text,
            text_spread=None if spread is None else scale * spread,
        )

    def _zero_shot_logits(self, image_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Zero-shot CLIP's logits over the current classes when the calibration anchors to them (its class
        features are computed once per set of classes and kept with the calibration)."""
        calibration = self.calibration
        if calibration.anchor_weight == 0:
            return None
        if calibration.zero_shot_text_features is None:
            calibration.zero_shot_text_features = self.hand_crafted_text_features()
        zero_shot = calibration.zero_shot_text_features.to(image_features.device)
        return scale * image_features.to(zero_shot.dtype) @ zero_shot.t()


def hand_crafted_text_features(
    clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, class_names: list[str], template: str = ZERO_SHOT_TEMPLATE
) -> torch.Tensor:
    """L2-normalised CLIP text features of ``template.format(name)`` for each class (underscores read as spaces)."""
    texts = [template.format(name.replace("_", " ")) for name in class_names]
    tokens = tokenizer(texts, padding=True, return_tensors="pt").to(clip.device)
    pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(clip.text_projection(pooled), dim=-1)


def _quietly(build: Callable[[], PeftModel]) -> PeftModel:
    """``build()`` without the FutureWarning peft 0.21 raises by reading the CLIP's ``is_gradient_checkpointing``
    (deprecated in transformers 5.24) each time it wraps a model: nothing a user of cmp_hf can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
        return build()


def _check_adapter_shape(prompt_path: str, prompt_config: PromptConfig, clip: CLIPModel) -> None:
    """Name the mismatching file before peft fails deep inside ``load_state_dict``."""
    with open(os.path.join(prompt_path, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        adapter = json.load(f)
    expected = {
        "num_virtual_tokens": prompt_config.num_context_vectors,
        "token_dim": clip.config.text_config.hidden_size,
    }
    found = {key: adapter.get(key) for key in expected}
    if found != expected:
        raise ValueError(
            f"{os.path.join(prompt_path, ADAPTER_CONFIG_NAME)} describes prompt vectors {found}, but "
            f"{PROMPT_CONFIG_NAME} and the base CLIP need {expected}: the adapter was saved for another prompt "
            "configuration or another base model."
        )


def read_prompt_files(prompt_path: str, verify_digest: bool = True) -> tuple[PromptConfig, PostHocCalibration]:
    """The prompt's config and calibration, after checking that every file of the prompt is there and that its
    tensors and settings match their digests; each error names the file (a missing, corrupt or altered one)."""
    missing = [name for name in PROMPT_FILES if not os.path.isfile(os.path.join(prompt_path, name))]
    if missing:
        raise FileNotFoundError(
            f"{prompt_path} {', '.join(f'has no {name}' for name in missing)}: it is not a complete prompt saved by "
            f"cmp_hf (save_pretrained writes {', '.join(PROMPT_FILES)}); save or download it again."
        )
    path = os.path.join(prompt_path, PROMPT_CONFIG_NAME)
    try:
        prompt_config, version = PromptConfig.from_saved(path)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is corrupt ({error}): save or download the prompt again.") from error
    calibration = PostHocCalibration.from_pretrained(prompt_path)
    if verify_digest:
        weights = [ADAPTER_WEIGHTS_NAME, *filter(None, [learner_class(prompt_config).weights_name])]
        settings = _logit_settings(prompt_config, calibration)
        verify_digests(prompt_path, weights, settings, saved_with_digest=version >= FORMAT_VERSION)
    else:
        logger.warning("Loading %s without checking its digests (verify_digest=False).", prompt_path)
    return prompt_config, calibration


def _logit_settings(prompt_config: PromptConfig, calibration: PostHocCalibration) -> dict:
    """What the settings digest covers: the prompt options that change the logits, and the saved calibration."""
    return {"prompt": prompt_config.logit_settings(), "calibration": calibration.saved_values()}


def _check_base_model(base: str | None, overridden: bool) -> None:
    """Name the base CLIP that cannot be loaded, and how to point at another copy of it."""
    if not base:
        raise ValueError(
            f"{PROMPT_CONFIG_NAME} names no base model: pass base_model= (or clip= and tokenizer=) for the CLIP it "
            "was trained on."
        )
    source = "base_model" if overridden else f"the base model recorded in {PROMPT_CONFIG_NAME}"
    try:
        check_clip_source(base, option=source)
    except (ValueError, OSError) as error:
        raise type(error)(
            f"{error} To load the prompt onto a copy of its CLIP elsewhere, pass base_model= (a Hub id or directory)."
        ) from error

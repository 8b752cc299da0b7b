"""A frozen CLIPModel plus a peft-owned CoOp prompt: images (or their cached features) in, class logits out.

peft has no CoOp method, but ``PromptTuningConfig`` on a ``PeftModel`` gives exactly what CoOp learns: an
``nn.Embedding`` of M prompt vectors, saved as a standard adapter (``adapter_model.safetensors`` with
``prompt_embeddings``, ``adapter_config.json``) that plain ``PeftModel.from_pretrained`` restores. peft's own
prompt-tuning forward (virtual tokens prepended through ``inputs_embeds``) does not apply to CLIP, so this module
never calls it: it reads the vectors and writes them into the text encoder with :class:`EmbeddingOverride`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from peft import PeftModel, PromptTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .hub import fetch_prompt
from .posthoc import apply_class_scales, distance_aware_scales
from .prompts.coop import PROMPT_CONFIG_NAME, CoOpPromptConfig, initial_context, resolve_n_ctx, tokenize_prompts
from .prompts.hook import EmbeddingOverride

ADAPTER_CONFIG_NAME = "adapter_config.json"
CALIBRATION_NAME = "calibration.json"  # post-hoc calibration fitted after training (temperature)
META_NET_NAME = "meta_net.safetensors"  # CoCoOp's meta-network: peft has no slot for it, so it sits beside the adapter


@dataclass
class PromptTunedCLIPOutput(ModelOutput):
    """``logits``: (B, C) = logit_scale * cos(image, class text); features are L2-normalised."""

    logits: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None


class PromptTunedCLIP(nn.Module):
    """CLIP classifier over a fixed list of classes whose text prompts carry learned CoOp context.

    Only the prompt vectors (``peft_model.prompt_encoder``) are trainable; everything in CLIP, ``logit_scale``
    included, is frozen. ``forward`` takes ``pixel_values`` or precomputed, L2-normalised ``image_features``.

    Build one with :meth:`from_clip` (fresh prompt) or :meth:`from_pretrained` (a saved prompt);
    :meth:`save_pretrained` writes the peft adapter plus ``prompt_config.json``.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        prompt_config: CoOpPromptConfig,
        tokenizer: PreTrainedTokenizerBase,
        pad_prompts_to: int | None = None,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.prompt_config = prompt_config
        self.tokenizer = tokenizer
        clip = self.clip
        max_positions = clip.config.text_config.max_position_embeddings
        tokens = tokenize_prompts(prompt_config, tokenizer, max_positions, pad_to=pad_prompts_to)
        self.register_buffer("prompt_input_ids", tokens.input_ids, persistent=False)
        self.register_buffer("prompt_attention_mask", tokens.attention_mask, persistent=False)
        self.register_buffer("prompt_context_index", tokens.context_index, persistent=False)
        expected = (prompt_config.num_context_vectors, clip.config.text_config.hidden_size)
        if tuple(self.context.shape) != expected:
            raise ValueError(
                f"The adapter holds prompt vectors of shape {tuple(self.context.shape)} but {PROMPT_CONFIG_NAME} and "
                f"the base model need {expected} ({prompt_config.n_ctx} context vectors"
                f"{' per class' if prompt_config.class_specific_context else ''}, text width {expected[1]})."
            )
        for name, param in peft_model.named_parameters():
            param.requires_grad_(name.startswith("prompt_encoder."))
        self.meta_net: nn.Module | None = None
        if prompt_config.learner == "cocoop":  # CoCoOp: image feature -> D/16 -> ReLU -> context-sized bias
            width = clip.config.projection_dim
            self.meta_net = nn.Sequential(
                nn.Linear(width, max(width // 16, 1)), nn.ReLU(), nn.Linear(max(width // 16, 1), expected[1])
            )
        self._context_writer = EmbeddingOverride(clip.text_model.embeddings.token_embedding)
        self._fixed_text_features: torch.Tensor | None = None
        self.temperature = 1.0  # post-hoc temperature scaling divides the logits (cmp_hf.posthoc)
        self.dac_k: int | None = None  # when set, for_classes applies distance-aware calibration (DAC)
        self.class_scales: torch.Tensor | None = None  # DAC's per-class logit scales, set by for_classes

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_clip(
        cls,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_config: CoOpPromptConfig,
        pad_prompts_to: int | None = None,
    ) -> PromptTunedCLIP:
        """Attach a new CoOp prompt to ``clip`` (initialised from ``ctx_init`` or N(0, 0.02)).

        Prompts are padded to the longest one; ``pad_prompts_to=77`` reproduces CoOp's fixed length (same features,
        more compute), which the speed benchmark uses as its reference.
        """
        prompt_config = resolve_n_ctx(prompt_config, tokenizer)
        if prompt_config.base_model_name_or_path is None and clip.name_or_path:
            prompt_config = replace(prompt_config, base_model_name_or_path=clip.name_or_path)
        text_config = clip.config.text_config
        peft_config = PromptTuningConfig(
            task_type=None,
            num_virtual_tokens=prompt_config.num_context_vectors,
            token_dim=text_config.hidden_size,
            num_transformer_submodules=1,
            num_layers=text_config.num_hidden_layers,
            num_attention_heads=text_config.num_attention_heads,
        )
        peft_model = PeftModel(clip, peft_config)
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
    ) -> PromptTunedCLIP:
        """Load a prompt saved by :meth:`save_pretrained` (a directory or a Hub repo id) onto ``clip`` (default: the
        base model it names). Only JSON and safetensors files are read."""
        prompt_path = fetch_prompt(prompt_path)
        for name in (PROMPT_CONFIG_NAME, ADAPTER_CONFIG_NAME):
            if not os.path.isfile(os.path.join(prompt_path, name)):
                raise FileNotFoundError(
                    f"{prompt_path} has no {name}: it is not a prompt saved by cmp_hf (save_pretrained writes "
                    f"{PROMPT_CONFIG_NAME} next to the peft adapter)."
                )
        prompt_config = CoOpPromptConfig.from_json_file(os.path.join(prompt_path, PROMPT_CONFIG_NAME))
        base = prompt_config.base_model_name_or_path
        if (clip is None or tokenizer is None) and not base:
            raise ValueError(
                f"{PROMPT_CONFIG_NAME} names no base model: pass clip= and tokenizer= for the CLIP it was trained on."
            )
        clip = clip if clip is not None else CLIPModel.from_pretrained(base)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
        _check_adapter_shape(prompt_path, prompt_config, clip)
        peft_model = PeftModel.from_pretrained(clip, prompt_path)
        model = cls(peft_model, prompt_config, tokenizer)
        if model.meta_net is not None:
            model.load_meta_net(prompt_path)
        calibration = os.path.join(prompt_path, CALIBRATION_NAME)
        if os.path.isfile(calibration):
            with open(calibration, encoding="utf-8") as f:
                saved = json.load(f)
            model.temperature = float(saved.get("temperature", 1.0))
            model.dac_k = saved.get("dac_k")
        return model

    def for_classes(self, class_names: list[str]) -> PromptTunedCLIP:
        """The same learned context over other classes (CoOp's transfer to novel classes or shifted datasets):
        a new prompt on the same frozen CLIP whose context is a copy of this one. Needs a shared context."""
        if self.prompt_config.class_specific_context:
            raise ValueError("A class-specific context (CSC) has no vectors for new classes: it cannot transfer.")
        config = replace(self.prompt_config, class_names=list(class_names), ctx_init=None)
        other = PromptTunedCLIP.from_clip(self.clip, self.tokenizer, config)
        with torch.no_grad():
            other.context.copy_(self.context)
        if self.meta_net is not None:
            other.meta_net.load_state_dict(self.meta_net.state_dict())
        other.temperature = self.temperature
        if self.dac_k is not None:
            with torch.no_grad():
                other.class_scales = distance_aware_scales(
                    self.hand_crafted_text_features(), other.hand_crafted_text_features(),
                    self.text_features(), other.text_features(), k=self.dac_k,
                )  # fmt: skip
        return other

    def load_meta_net(self, prompt_path: str | os.PathLike) -> None:
        """CoCoOp's meta-network weights from ``meta_net.safetensors`` (no pickle)."""
        path = os.path.join(prompt_path, META_NET_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{prompt_path} is a CoCoOp prompt but has no {META_NET_NAME}.")
        self.meta_net.load_state_dict(load_file(path))

    def remove_hook(self) -> None:
        """Detach this prompt's embedding hook from the CLIP, for a prompt discarded while its CLIP lives on."""
        self._context_writer.remove()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the peft adapter (safetensors) and ``prompt_config.json``; :meth:`from_pretrained` reads both."""
        self.peft_model.save_pretrained(save_directory, safe_serialization=True, **kwargs)
        self.prompt_config.save_pretrained(save_directory)
        if self.meta_net is not None:
            save_file({k: v.contiguous() for k, v in self.meta_net.state_dict().items()},
                      os.path.join(save_directory, META_NET_NAME))  # fmt: skip
        calibration = os.path.join(save_directory, CALIBRATION_NAME)
        if self.temperature != 1.0 or self.dac_k is not None:
            with open(calibration, "w", encoding="utf-8") as f:
                json.dump({"temperature": self.temperature, "dac_k": self.dac_k}, f, indent=2)
        elif os.path.isfile(calibration):  # a directory reused for an uncalibrated prompt
            os.remove(calibration)

    # ---- forward ------------------------------------------------------------------------------------------------

    @property
    def clip(self) -> CLIPModel:
        return self.peft_model.get_base_model()

    @property
    def context(self) -> nn.Parameter:
        """The learned context vectors, (M, d) or (C * M, d) with class-specific context."""
        return self.peft_model.prompt_encoder[self.peft_model.active_adapter].embedding.weight

    @property
    def class_names(self) -> list[str]:
        return self.prompt_config.class_names

    def text_features(self) -> torch.Tensor:
        """L2-normalised text features of the C class prompts, differentiable w.r.t. the context."""
        return self._encode_prompts(self.context, self.prompt_input_ids, self.prompt_context_index)

    def conditional_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """CoCoOp: (B, C, D) text features, the context of image b shifted by ``meta_net(image_features[b])``."""
        batch, n_ctx = len(image_features), self.context.shape[0]
        vectors = self.context[None] + self.meta_net(image_features.to(self.context.dtype))[:, None, :]
        index = (
            self.prompt_context_index[None] + torch.arange(batch, device=image_features.device)[:, None, None] * n_ctx
        )
        index = torch.where(self.prompt_context_index[None] >= 0, index, -1)
        ids = self.prompt_input_ids.repeat(batch, 1)
        features = self._encode_prompts(vectors.reshape(-1, vectors.shape[-1]), ids, index.reshape(len(ids), -1))
        return features.reshape(batch, len(self.class_names), -1)

    def _encode_prompts(self, vectors: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        clip = self.clip
        mask = self.prompt_attention_mask.repeat(len(input_ids) // len(self.prompt_attention_mask), 1)
        with self._context_writer.replacing(vectors, index):
            pooled = clip.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
        return F.normalize(clip.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def hand_crafted_text_features(self, template: str = "a photo of a {}.") -> torch.Tensor:
        """L2-normalised features of the plain text prompts ``template.format(class name)`` (CLIP's zero-shot
        classifier; KgCoOp's anchor). No learned context is involved."""
        clip = self.clip
        texts = [template.format(name.replace("_", " ")) for name in self.class_names]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.prompt_input_ids.device)
        pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return F.normalize(clip.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of the frozen image encoder (no graph is kept: nothing there trains)."""
        clip = self.clip
        pooled = clip.vision_model(pixel_values=pixel_values.to(clip.dtype)).pooler_output
        return F.normalize(clip.visual_projection(pooled), dim=-1)

    @contextmanager
    def fixed_text_features(self) -> Iterator[None]:
        """Compute the class text features once and reuse them for every forward inside the block (evaluation).
        CoCoOp's features depend on the image: nothing is fixed for it."""
        if self.meta_net is not None:
            yield
            return
        with torch.no_grad():
            self._fixed_text_features = self.text_features()
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
        scale = self.clip.logit_scale.exp() / self.temperature
        if self.meta_net is not None:  # CoCoOp: every image has its own class prompts
            text = self.conditional_text_features(image_features)
            logits = scale * torch.einsum("bd,bcd->bc", image_features.to(text.dtype), text)
        else:
            text = self._fixed_text_features if self._fixed_text_features is not None else self.text_features()
            logits = scale * image_features.to(text.dtype) @ text.t()
        if self.class_scales is not None:
            logits = apply_class_scales(logits, self.class_scales)
        return PromptTunedCLIPOutput(logits=logits, image_features=image_features, text_features=text)


def _check_adapter_shape(prompt_path: str, prompt_config: CoOpPromptConfig, clip: CLIPModel) -> None:
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

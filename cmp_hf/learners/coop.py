"""CoOp (Zhou et al., IJCV 2022): one learned context, shared by all classes or one per class (CSC).

The class prompts ``[SOS] ctx_1 .. ctx_M [class tokens] "." [EOS]`` are tokenized once (``cmp_hf.prompts``). With
a shared context and the class name at the end, the ``1 + M`` prefix is the same for every class: it runs through
the text encoder once and each class's suffix attends to its keys/values (``cmp_hf.prompts.shared_prefix``, exact).
Otherwise (class-specific contexts, name in the middle or front, a text tower that path does not recognise) the
context vectors are written over their placeholder positions and the C prompts go through CLIP's own text encoder,
padded to the longest one, not to 77 tokens: the encoder is causal and pools at EOS, so padding after EOS cannot
change a feature.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..prompts.config import PromptConfig, PromptTokens, tokenize_prompts
from ..prompts.hook import replaced_embeddings
from ..prompts.shared_prefix import (
    SharedPrefixPlan,
    encode_with_shared_prefix,
    plan_shared_prefix,
    shared_prefix_unsupported,
)
from .base import PromptLearner

logger = logging.getLogger(__name__)


class CoOpLearner(PromptLearner):
    """Class text features from the learned context alone: (C, D), the same for every image."""

    name = "coop"
    title = "CoOp"
    shares_prefix = True

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PromptConfig,
        pad_prompts_to: int | None = None,
    ) -> None:
        super().__init__()
        max_positions = clip.config.text_config.max_position_embeddings
        tokens = tokenize_prompts(config, tokenizer, max_positions, pad_to=pad_prompts_to)
        device = clip.device
        self.register_buffer("prompt_input_ids", tokens.input_ids.to(device), persistent=False)
        self.register_buffer("prompt_attention_mask", tokens.attention_mask.to(device), persistent=False)
        self.register_buffer("prompt_context_index", tokens.context_index.to(device), persistent=False)
        self._plans: dict[tuple, SharedPrefixPlan | None] = {}
        self._fallback_logged = False
        self.build_weights(clip, tokenizer, config)

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.class_features(clip, context[None])[0]

    def class_features(self, clip: CLIPModel, contexts: torch.Tensor) -> torch.Tensor:
        """L2-normalised features (B, C, D) of the C class prompts with each of the contexts (B, M', width) (M'
        vectors: M, or C * M with class-specific context): through the shared prefix where that is exact,
        otherwise B x C full prompts."""
        plan = self.shared_prefix_plan(clip)
        if plan is not None:
            pooled = encode_with_shared_prefix(clip.text_model, plan, contexts, self.checkpoint_text)
            return F.normalize(clip.text_projection(pooled), dim=-1)
        batch, n_vectors = contexts.shape[:2]
        offsets = torch.arange(batch, device=contexts.device)[:, None, None] * n_vectors
        index = torch.where(self.prompt_context_index[None] >= 0, self.prompt_context_index[None] + offsets, -1)
        ids = self.prompt_input_ids.repeat(batch, 1)
        features = self.encode_prompts(clip, contexts.flatten(0, 1), ids, index.flatten(0, 1))
        return features.unflatten(0, (batch, -1))

    def shared_prefix_plan(self, clip: CLIPModel) -> SharedPrefixPlan | None:
        """The shared-prefix split of this learner's prompts for ``clip``'s text tower, or ``None`` for the full
        forward (the learner opts out, the prompts share no prefix, or the tower is not recognised: said once)."""
        if not self.shares_prefix:
            return None
        reason = shared_prefix_unsupported(clip.text_model)
        if reason is not None:
            if not self._fallback_logged:
                logger.warning("Class prompts take Hugging Face's full text forward: %s.", reason)
                self._fallback_logged = True
            return None
        ids = self.prompt_input_ids
        chunk = self.text_chunk_classes if self.checkpoint_text else None
        key = (clip.text_model.eos_token_id, ids.device, self.checkpoint_text, chunk)
        if key not in self._plans:
            tokens = PromptTokens(ids, self.prompt_attention_mask, self.prompt_context_index)
            self._plans[key] = plan_shared_prefix(tokens, key[0], self.checkpoint_text, chunk)
        return self._plans[key]

    def encode_prompts(
        self, clip: CLIPModel, vectors: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised features of prompts ``input_ids`` (a whole number of copies of the C class prompts) whose
        positions ``index >= 0`` hold ``vectors[index]``."""
        mask = self.prompt_attention_mask.repeat(len(input_ids) // len(self.prompt_attention_mask), 1)
        with replaced_embeddings(clip.text_model.embeddings.token_embedding, vectors, index):
            pooled = clip.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
        return F.normalize(clip.text_projection(pooled), dim=-1)

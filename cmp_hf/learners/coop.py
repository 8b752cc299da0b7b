"""CoOp (Zhou et al., IJCV 2022): one learned context, shared by all classes or one per class (CSC).

The class prompts ``[SOS] ctx_1 .. ctx_M [class tokens] "." [EOS]`` are tokenized once (``cmp_hf.prompts``); at
every forward the context vectors are written over their placeholder positions and the C prompts go through
CLIP's own text encoder. Prompts are padded to the longest one, not to 77 tokens: the encoder is causal and pools
at EOS, so padding after EOS cannot change a feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..prompts.config import CoOpPromptConfig, tokenize_prompts
from ..prompts.hook import replaced_embeddings
from .base import PromptLearner


class CoOpLearner(PromptLearner):
    """Class text features from the learned context alone: (C, D), the same for every image."""

    name = "coop"
    title = "CoOp"

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        config: CoOpPromptConfig,
        pad_prompts_to: int | None = None,
    ) -> None:
        super().__init__()
        max_positions = clip.config.text_config.max_position_embeddings
        tokens = tokenize_prompts(config, tokenizer, max_positions, pad_to=pad_prompts_to)
        device = clip.device
        self.register_buffer("prompt_input_ids", tokens.input_ids.to(device), persistent=False)
        self.register_buffer("prompt_attention_mask", tokens.attention_mask.to(device), persistent=False)
        self.register_buffer("prompt_context_index", tokens.context_index.to(device), persistent=False)
        self.build_weights(clip, tokenizer, config)

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.encode_prompts(clip, context, self.prompt_input_ids, self.prompt_context_index)

    def encode_prompts(
        self, clip: CLIPModel, vectors: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised features of prompts ``input_ids`` (a whole number of copies of the C class prompts) whose
        positions ``index >= 0`` hold ``vectors[index]``."""
        mask = self.prompt_attention_mask.repeat(len(input_ids) // len(self.prompt_attention_mask), 1)
        with replaced_embeddings(clip.text_model.embeddings.token_embedding, vectors, index):
            pooled = clip.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
        return F.normalize(clip.text_projection(pooled), dim=-1)

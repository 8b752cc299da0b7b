"""CoCoOp (Zhou et al., CVPR 2022): the shared context plus an image-conditional bias from a small meta-network.

Meta-network: image feature -> D/16 -> ReLU -> text width, the bias added to every context vector of that image's
prompts. Every image thus has its own C class prompts, so a step runs the text encoder on batch x classes prompts
(keep batches small on CPU; CoCoOp's own recipe uses batch 1). The meta-network is saved as ``meta_net.safetensors``
beside the adapter; peft has no slot for it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..constants import META_NET_NAME
from ..prompts.config import PromptConfig
from .coop import CoOpLearner


class CoCoOpLearner(CoOpLearner):
    """(B, C, D) class text features: image b's prompts carry ``context + meta_net(image_features[b])``; without
    image features, the (C, D) features of the shared context alone."""

    name = "cocoop"
    title = "CoCoOp"
    conditional = True
    weights_name = META_NET_NAME

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        width, hidden = clip.config.projection_dim, max(clip.config.projection_dim // 16, 1)
        self.meta_net = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, clip.config.text_config.hidden_size)
        ).to(clip.device)

    @classmethod
    def check_config(cls, config: PromptConfig) -> None:
        if config.class_specific_context:
            raise ValueError("CoCoOp conditions one shared context on the image: class_specific_context must be off.")

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        if image_features is None:  # image-independent uses (DAC's distances): the shared context alone
            return super().text_features(clip, context)
        vectors = context[None] + self.meta_net(image_features.to(context.dtype))[:, None, :]
        return self.class_features(clip, vectors)

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().contiguous() for key, value in self.meta_net.state_dict().items()}

    def load_extra_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = {key: tuple(value.shape) for key, value in self.meta_net.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in state_dict.items()}
        if found != expected:
            raise ValueError(
                f"The saved CoCoOp meta-network has tensors {sorted(found.items())} but this prompt needs "
                f"{sorted(expected.items())}: they come from another base model."
            )
        self.meta_net.load_state_dict(state_dict)

"""PromptSRC (Khattak et al., ICCV 2023): independent deep prompts in both towers, regularised towards frozen CLIP.

Prompts (the released IVLP design):

* text: the learned context enters at the input, as CoOp's; in text layers 1..J_t-1 a deep prompt of the same M
  vectors replaces the hidden states at the context positions (MaPLe's text prompting, reused);
* vision: M_v prompt tokens are appended after the position embeddings and replace the previous layer's outputs
  at those positions in vision layers 1..J_v-1 (MaPLe's vision prompting, reused), but they are parameters of
  their own (N(0, 0.02)), not maps of the text prompts.

Self-regularisation (training only, each term logged): with the frozen CLIP's image features ``f`` and class text
features ``g`` (the mean over CLIP's 80 ImageNet templates of the unnormalised text features, then normalised, as
released for every dataset), and the prompted ones ``f~``, ``g~``:

* ``scl_text``: mean |g~ - g| (weight ``text_loss_weight``, released 25);
* ``scl_image``: mean |f~ - f| (weight ``image_loss_weight``, released 10);
* ``scl_logits``: KL(softmax(s f g^T) || softmax(s f~ g~^T)) summed over the batch and divided by its B x C
  entries (weight 1, as released).

Gaussian prompt aggregation (GPA): at the end of epoch e of N the trainable weights are added with weight
N(e; gpa_mean, gpa_std^2) (normalised over e = 1..N); after the last epoch the model takes their weighted sum
(:class:`GaussianPromptAggregation`, before that epoch's evaluation and checkpoint). A run resumed from a
checkpoint averages the epochs it trained (the sum is not in the checkpoint) and says so.

Saved beside the adapter as ``promptsrc_prompts.safetensors``: the deep text prompts and the vision prompts. The
released base-to-novel recipe: n_ctx 4 (text and vision) from "a photo of a", depth 9 in both towers, SGD lr
0.0025, batch 4, 20 epochs, GPA mean 15, std 1 (``recipes/configs/suite/learners/promptsrc.yaml``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase, TrainerCallback

from ..constants import PROMPTSRC_PROMPTS_NAME
from ..losses import WeightedTerm
from ..prompts.config import PromptConfig
from .base import PromptLearner
from .maple import MaPLeLearner, prompt_depth

if TYPE_CHECKING:
    from ..config import CMPConfig
    from ..modeling import PromptTunedCLIPOutput

logger = logging.getLogger(__name__)

# CLIP's 80 ImageNet prompt templates (CLIP's prompt-engineering notebook), PromptSRC's frozen text ensemble.
IMAGENET_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip


class PromptSRCLearner(MaPLeLearner):
    """(C, D) class text features from deeply prompted text; image features from the independently prompted
    vision tower; frozen CLIP's features and logits as regularisation targets in training."""

    name = "promptsrc"
    title = "PromptSRC"
    weights_name = PROMPTSRC_PROMPTS_NAME
    options = {
        "prompt_depth_text": 9,
        "prompt_depth_vision": 9,
        "n_ctx_vision": 4,
        "text_loss_weight": 25.0,
        "image_loss_weight": 10.0,
        "gpa_mean": 15.0,
        "gpa_std": 1.0,
    }

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        text_depth = prompt_depth(clip, self.option(config, "prompt_depth_text"))
        vision_depth = prompt_depth(clip, self.option(config, "prompt_depth_vision"))
        text_width, vision_width = clip.config.text_config.hidden_size, clip.config.vision_config.hidden_size
        n_vision = self.option(config, "n_ctx_vision")

        def normal(rows: int, width: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(rows, width, device=clip.device) * 0.02)

        self.deep_prompts = nn.ParameterList([normal(config.n_ctx, text_width) for _ in range(text_depth - 1)])
        self.visual_prompts = nn.ParameterList([normal(n_vision, vision_width) for _ in range(vision_depth)])
        self.settings = {
            name: float(self.option(config, name)) for name in self.options if "weight" in name or "gpa" in name
        }
        self.class_names, self.tokenizer = list(config.class_names), tokenizer
        self._frozen_text: torch.Tensor | None = None

    @classmethod
    def check_config(cls, config: PromptConfig) -> None:
        if config.class_specific_context:
            raise ValueError("PromptSRC deep-prompts one shared text context: class_specific_context must be off.")
        depths = [cls.option(config, name) for name in ("prompt_depth_text", "prompt_depth_vision", "n_ctx_vision")]
        if min(depths) < 1:
            raise ValueError(
                f"PromptSRC's prompt_depth_text, prompt_depth_vision and n_ctx_vision must be >= 1, got {depths}."
            )
        weights = [cls.option(config, name) for name in ("text_loss_weight", "image_loss_weight")]
        if min(weights) < 0 or not all(map(math.isfinite, weights)) or cls.option(config, "gpa_std") <= 0:
            raise ValueError(
                f"PromptSRC's text_loss_weight and image_loss_weight must be finite and >= 0 (got {weights}) and "
                f"gpa_std > 0 (got {cls.option(config, 'gpa_std')})."
            )

    def vision_prompts(self, context: torch.Tensor | None) -> list[torch.Tensor]:
        """The vision prompt tokens of layers 0..J_v-1: parameters of their own (independent of the context)."""
        return list(self.visual_prompts)

    @torch.no_grad()
    def frozen_text_features(self, clip: CLIPModel) -> torch.Tensor:
        """Frozen CLIP's class text features: the mean of the unnormalised features over the 80 templates, then
        L2-normalised (computed once per learner, that is once per list of classes)."""
        if self._frozen_text is None:
            names = [name.replace("_", " ") for name in self.class_names]
            total = 0.0
            for template in IMAGENET_TEMPLATES:
                tokens = self.tokenizer([template.format(name) for name in names], padding=True, return_tensors="pt")
                tokens = tokens.to(clip.device)
                pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
                total = total + clip.text_projection(pooled.pooler_output).float()
            self._frozen_text = F.normalize(total / len(IMAGENET_TEMPLATES), dim=-1)
        return self._frozen_text

    def regularization(
        self,
        clip: CLIPModel,
        context: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        outputs: PromptTunedCLIPOutput,
        args: CMPConfig,
    ) -> dict[str, WeightedTerm]:
        if not self.training:
            return {}
        if "pixel_values" not in inputs:
            raise ValueError("PromptSRC regularises the prompted image features: train it on images (pixel_values).")
        frozen_image = PromptLearner.image_features(self, clip, inputs["pixel_values"]).float()
        frozen_text = self.frozen_text_features(clip)
        scale = clip.logit_scale.exp().float()
        frozen_logits = scale * frozen_image @ frozen_text.t()
        logits = outputs.logits.float()
        divergence = F.kl_div(
            F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1), reduction="sum", log_target=True
        )
        return {
            "scl_text": WeightedTerm(
                self.settings["text_loss_weight"], F.l1_loss(outputs.text_features.float(), frozen_text)
            ),
            "scl_image": WeightedTerm(
                self.settings["image_loss_weight"], F.l1_loss(outputs.image_features.float(), frozen_image)
            ),
            "scl_logits": WeightedTerm(1.0, divergence / logits.numel()),
        }

    def training_callbacks(self, args: CMPConfig) -> list[TrainerCallback]:
        return [GaussianPromptAggregation(self.settings["gpa_mean"], self.settings["gpa_std"])]


def gpa_weights(mean: float, std: float, epochs: int) -> list[float]:
    """The released GPA weights of epochs 1..N: the Gaussian density N(e; mean, std^2), normalised to sum 1."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(density)
    return [value / total for value in density]


class GaussianPromptAggregation(TrainerCallback):
    """GPA: the Gaussian-weighted average over epochs of the model's trainable weights, installed after the last
    epoch (before its evaluation and checkpoint); divided by the weights' sum, 1 unless a resumed run missed epochs."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean, self.std = mean, std
        self.total: list[torch.Tensor] | None = None
        self.epochs: list[int] = []
        self.weight = 0.0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.total, self.epochs, self.weight = None, [], 0.0

    def on_epoch_end(self, args, state, control, model=None, **kwargs) -> None:
        epoch, epochs = math.ceil(state.epoch - 1e-6), state.num_train_epochs
        weight = gpa_weights(self.mean, self.std, epochs)[epoch - 1]
        params = [p for p in model.parameters() if p.requires_grad]
        weighted = [weight * p.detach().float() for p in params]
        self.total = weighted if self.total is None else [t + w for t, w in zip(self.total, weighted, strict=True)]
        self.epochs.append(epoch)
        self.weight += weight
        if epoch < epochs:
            return
        if len(self.epochs) < epochs:
            logger.warning(
                "PromptSRC's prompt aggregation covers epochs %d-%d of %d (a resumed run): the earlier epochs' "
                "weights were not in the checkpoint.", self.epochs[0], epoch, epochs,
            )  # fmt: skip
        with torch.no_grad():
            for param, value in zip(params, self.total, strict=True):
                param.copy_((value / self.weight).to(param.dtype))

"""ProDA (Lu et al., CVPR 2022): K learned contexts whose class text features form a Gaussian per class.

Each of the K contexts builds the C class prompts; their K x C text features give each class a mean and, with the
other classes, a covariance. The released implementation (kept by the CLIP_Calibration code the CMP paper used)
places the class name in front in the first K // 4 prompts, in the middle in the next K // 4 and at the end in the
remaining half (K = 1: at the end); this module keeps those proportions, with the end prompts first so that the
peft context, prompt 0, is an end prompt. The covariance is ProDA's: diagonal over feature dimensions, full over
classes, the centred features' outer products summed over the K prompts and divided by K + 1 (as released).

Training minimises ProDA's upper bound of the expected cross-entropy under that Gaussian
(``cmp_hf.losses.gaussian``); inference uses the mean features, the mean of the K unit features, not renormalised
(the Gaussian's mean is the mean logit). CMP acts on the logits of the mean features, the ones the model predicts
with (``cmp_hf.losses.objective`` says why not the bound's surrogate logits); focal loss and label smoothing, which
have no such bound, are refused. K = 1 has zero covariance and is CoOp exactly.

Prompt 0's context is the peft prompt embedding; the other K - 1 are this module's parameter ``contexts``, saved
as ``proda_contexts.safetensors`` beside the adapter. Every step encodes K x C prompts (the released recipe trains
on 4 random prompts of the 32 per step to save memory; here all K take part, so the bound is the same each step).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..constants import PRODA_CONTEXTS_NAME
from ..losses import GAUSSIAN_FEATURES_REFUSE, LossOptions
from ..prompts.config import CoOpPromptConfig, tokenize_prompts
from .coop import CoOpLearner


def class_token_positions(num_prompts: int) -> list[str]:
    """Where each of the K prompts puts the class name: the released split (front K // 4, middle K // 4, end the
    rest), end prompts first."""
    quarter = num_prompts // 4
    return ["end"] * (num_prompts - 2 * quarter) + ["middle"] * quarter + ["front"] * quarter


class ProDALearner(CoOpLearner):
    """Mean class text features (C, D) of K contexts; in training, also their spread (C, K, D)."""

    name = "proda"
    title = "ProDA"
    weights_name = PRODA_CONTEXTS_NAME
    shares_prefix = False

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: CoOpPromptConfig) -> None:
        num_prompts, max_positions = config.proda_num_prompts, clip.config.text_config.max_position_embeddings
        # one tokenization per layout; each class's prompt has the same tokens in every layout, so the same length
        layouts = {
            position: tokenize_prompts(replace(config, class_token_position=position), tokenizer, max_positions,
                                       pad_to=self.prompt_input_ids.shape[1])
            for position in set(class_token_positions(num_prompts))
        }  # fmt: skip
        positions = class_token_positions(num_prompts)
        ids = torch.cat([layouts[position].input_ids for position in positions])
        index = torch.cat([
            torch.where(layouts[p].context_index >= 0, layouts[p].context_index + k * config.n_ctx, -1)
            for k, p in enumerate(positions)
        ])  # fmt: skip
        self.num_prompts = num_prompts
        self.register_buffer("all_input_ids", ids.to(clip.device), persistent=False)
        self.register_buffer("all_context_index", index.to(clip.device), persistent=False)
        width = clip.config.text_config.hidden_size
        self.contexts = nn.Parameter(torch.randn(num_prompts - 1, config.n_ctx, width, device=clip.device) * 0.02)

    @classmethod
    def check_config(cls, config: CoOpPromptConfig) -> None:
        if config.class_specific_context:
            raise ValueError("ProDA learns K contexts shared by all classes: class_specific_context must be off.")
        if config.class_token_position != "end":
            raise ValueError(
                "ProDA places the class name itself (front in a quarter of its prompts, middle in a quarter, end in "
                "the rest): leave class_token_position at 'end'."
            )
        if config.ctx_init is not None and config.proda_num_prompts > 1:
            raise ValueError(
                "ProDA draws its K contexts at random (N(0, 0.02)) so that they differ: ctx_init would start one of "
                "them from text and the others not. Leave ctx_init unset."
            )

    @classmethod
    def check_loss_options(cls, options: LossOptions) -> None:
        if options.focal_gamma or options.label_smoothing_factor:
            raise ValueError(GAUSSIAN_FEATURES_REFUSE)

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.text_distribution(clip, context)[0]

    def text_distribution(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        vectors = torch.cat([context, self.contexts.flatten(0, 1).to(context.dtype)])
        features = self.encode_prompts(clip, vectors, self.all_input_ids, self.all_context_index)
        features = features.unflatten(0, (self.num_prompts, -1)).transpose(0, 1)  # (C, K, D)
        mean = features.mean(dim=1)
        spread = (features - mean[:, None]) / (self.num_prompts + 1) ** 0.5
        return mean, spread

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        return {"contexts": self.contexts.detach().contiguous()}

    def load_extra_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if state_dict["contexts"].shape != self.contexts.shape:
            raise ValueError(
                f"The saved ProDA contexts have shape {tuple(state_dict['contexts'].shape)} but this prompt needs "
                f"{tuple(self.contexts.shape)} (proda_num_prompts - 1, n_ctx, text width): they come from another "
                "prompt configuration or base model."
            )
        with torch.no_grad():
            self.contexts.copy_(state_dict["contexts"])

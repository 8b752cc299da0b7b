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
as ``proda_contexts.safetensors`` beside the adapter. A training step encodes K x C prompts, or, with
``proda_prompts_per_step`` = k, k x C as the released trainer does (4 of 32): the K contexts in a random order, k at
a time, a new order once all were used (:meth:`ProDALearner.select_prompts`, called at each step's start by the
callback of :meth:`ProDALearner.training_callbacks`); the step's mean and spread are those of its k contexts (spread
/ (k + 1), as released). Evaluation always uses all K. The released diversity term, the mean |cosine| between the
features of the K class-free prompts ``[SOS] ctx_k . [EOS]``, is :meth:`ProDALearner.prompt_diversity`, added to
the loss as the learner's regularization ``diversity`` (``proda_diversity_weight``, released 0.1).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase, TrainerCallback

from ..constants import PRODA_CONTEXTS_NAME
from ..losses import GAUSSIAN_FEATURES_REFUSE, LossOptions, WeightedTerm
from ..prompts.config import PromptConfig, tokenize_prompts
from ..prompts.hook import replaced_embeddings
from .coop import CoOpLearner

if TYPE_CHECKING:
    from ..config import CMPConfig
    from ..modeling import PromptTunedCLIPOutput


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
    test_options = {"proda_num_prompts": 4, "ctx_init": None}  # its K contexts start at random, never from text

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
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
        self.active_prompts: torch.Tensor | None = None  # the contexts of this training step (None: all K)
        self.register_buffer("all_input_ids", ids.to(clip.device), persistent=False)
        self.register_buffer("all_context_index", index.to(clip.device), persistent=False)
        # the class-free prompt "[SOS] ctx . [EOS]" is the prompt of a class named "." with template "{}"
        free = tokenize_prompts(replace(config, class_names=["."], template="{}", class_specific_context=False,
                                        class_token_position="end"), tokenizer, max_positions)  # fmt: skip
        offsets = torch.arange(num_prompts)[:, None] * config.n_ctx
        self.register_buffer("free_input_ids", free.input_ids.repeat(num_prompts, 1).to(clip.device), persistent=False)
        self.register_buffer(
            "free_context_index",
            torch.where(free.context_index >= 0, free.context_index + offsets, -1).to(clip.device),
            persistent=False,
        )
        width = clip.config.text_config.hidden_size
        self.contexts = nn.Parameter(torch.randn(num_prompts - 1, config.n_ctx, width, device=clip.device) * 0.02)

    @classmethod
    def check_config(cls, config: PromptConfig) -> None:
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
        ids, index = self.all_input_ids, self.all_context_index
        if self.training and self.active_prompts is not None:  # the step's k contexts: their k x C prompts
            ids, index = (
                t.unflatten(0, (self.num_prompts, -1))[self.active_prompts].flatten(0, 1) for t in (ids, index)
            )
        features = self.encode_prompts(clip, self._vectors(context), ids, index)
        features = features.unflatten(0, (len(ids) // len(self.prompt_input_ids), -1)).transpose(0, 1)  # (C, k, D)
        mean = features.mean(dim=1)
        spread = (features - mean[:, None]) / (features.shape[1] + 1) ** 0.5
        return mean, spread

    def select_prompts(self, step: int, per_step: int, seed: int) -> None:
        """The contexts training step ``step`` uses: the released sampling (a random order of the K, ``per_step`` at
        a time, a new order each K / per_step steps), the order drawn from (seed, cycle) alone so that a resumed
        run and every process of a distributed one draw the same."""
        cycle, position = divmod(step, self.num_prompts // per_step)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + cycle)
        order = torch.randperm(self.num_prompts, generator=generator)
        self.active_prompts = order[position * per_step : (position + 1) * per_step].to(self.all_input_ids.device)

    def prompt_diversity(self, clip: CLIPModel, context: torch.Tensor) -> torch.Tensor:
        """The released diversity term: the mean |cosine| between the unit features of the K class-free prompts
        ``[SOS] ctx_k . [EOS]``, over the K (K - 1) ordered pairs of different contexts."""
        mask = torch.ones_like(self.free_input_ids)
        with replaced_embeddings(clip.text_model.embeddings.token_embedding, self._vectors(context),
                                 self.free_context_index):  # fmt: skip
            pooled = clip.text_model(input_ids=self.free_input_ids, attention_mask=mask).pooler_output
        features = F.normalize(clip.text_projection(pooled), dim=-1)
        cosine = features @ features.t()
        off_diagonal = ~torch.eye(self.num_prompts, dtype=torch.bool, device=cosine.device)
        return cosine[off_diagonal].abs().mean()

    def regularization(
        self,
        clip: CLIPModel,
        context: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        outputs: PromptTunedCLIPOutput,
        args: CMPConfig,
    ) -> dict[str, WeightedTerm]:
        if not args.proda_diversity_weight:
            return {}
        return {"diversity": WeightedTerm(args.proda_diversity_weight, self.prompt_diversity(clip, context))}

    def training_callbacks(self, args: CMPConfig) -> list[TrainerCallback]:
        return [PromptSampling()] if args.proda_prompts_per_step else []

    def _vectors(self, context: torch.Tensor) -> torch.Tensor:
        """The K contexts' vectors, (K * n_ctx, width): the peft context first."""
        return torch.cat([context, self.contexts.flatten(0, 1).to(context.dtype)])

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


class PromptSampling(TrainerCallback):
    """ProDA's released sampling: the contexts of each training step chosen before its forward
    (``proda_prompts_per_step`` of them; the order drawn from the seed and the step alone)."""

    def on_step_begin(self, args: CMPConfig, state, control, model=None, **kwargs) -> None:
        model.learner.select_prompts(state.global_step, args.proda_prompts_per_step, args.seed)

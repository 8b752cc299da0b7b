"""MaPLe (Khattak et al., CVPR 2023): prompts in both towers, the vision ones coupled to the text ones.

With prompt depth J (capped by the towers' depth):

* text: the learned context enters at the input, as CoOp's; in text layers 1..J-1 a deep prompt of the same M
  vectors replaces the hidden states at the context positions (sequence length unchanged, so the causal and
  padding masks stay Hugging Face's own);
* vision: M prompt tokens are appended to the token sequence after the position embeddings and before the
  pre-layernorm, and in vision layers 1..J-1 replace the previous layer's outputs at those M positions. Layer 0's
  tokens are ``coupling[0](context)``, layer i's ``coupling[i](deep_prompt[i])``: linear maps from text width to
  vision width, so the image tower is prompted only through the text prompts.

Both towers are prompted by hooks (``cmp_hf.prompts.hook``) registered for the duration of the learner's own
forward: a plain CLIP forward on the same model is never altered. The image features change with training, so
they are never cached (``caches_image_features = False``), and the image tower runs at every step with gradients
flowing through it to the coupling maps and the context. The deep prompts (N(0, 0.02)) and the coupling maps
(PyTorch's Linear init) are saved as ``maple_prompts.safetensors`` beside the adapter.

The released recipe: n_ctx 2 with ``ctx_init="a photo of a"``: MaPLe learns the first n_ctx tokens of the init
text, initialised from their embeddings, and keeps the rest as fixed text before the class name
(``[SOS] ctx_1 ctx_2 of a <class>. [EOS]``); :meth:`MaPLeLearner.resolve_config` turns that into a context of
"a photo" and the template "of a {}.". Depth 9, SGD lr 0.0035, batch 4, 5 epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from ..constants import MAPLE_PROMPTS_NAME
from ..prompts.config import PromptConfig
from ..prompts.hook import transformed_layer_inputs, transformed_output
from .coop import CoOpLearner


def prompt_depth(clip: CLIPModel, depth: int) -> int:
    """J: the configured depth, capped by the shallower tower."""
    layers = min(clip.config.text_config.num_hidden_layers, clip.config.vision_config.num_hidden_layers)
    return min(depth, layers)


class MaPLeLearner(CoOpLearner):
    """(C, D) class text features from deeply prompted text; image features from the vision tower prompted through
    the coupling maps (both need the context)."""

    name = "maple"
    title = "MaPLe"
    caches_image_features = False
    weights_name = MAPLE_PROMPTS_NAME
    shares_prefix = False

    def build_weights(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> None:
        depth = prompt_depth(clip, config.maple_prompt_depth)
        text_width, vision_width = clip.config.text_config.hidden_size, clip.config.vision_config.hidden_size
        self.deep_prompts = nn.ParameterList(
            [nn.Parameter(torch.randn(config.n_ctx, text_width, device=clip.device) * 0.02) for _ in range(depth - 1)]
        )
        self.couplings = nn.ModuleList([nn.Linear(text_width, vision_width) for _ in range(depth)]).to(clip.device)

    @classmethod
    def check_config(cls, config: PromptConfig) -> None:
        if config.class_specific_context:
            raise ValueError(
                "MaPLe couples one shared context to the vision prompts: class_specific_context must be off."
            )

    @classmethod
    def resolve_config(cls, config: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> PromptConfig:
        """MaPLe's rule for an init text longer than n_ctx tokens: the first n_ctx tokens become the learned
        context, the rest stays as text at the start of the template. Otherwise CoOp's rule."""
        if config.ctx_init is None:
            return super().resolve_config(config, tokenizer)
        ids = tokenizer(config.ctx_init, add_special_tokens=False)["input_ids"]
        if config.n_ctx >= len(ids):
            return super().resolve_config(config, tokenizer)
        learned, fixed = (tokenizer.decode(part).strip() for part in (ids[: config.n_ctx], ids[config.n_ctx :]))
        if tokenizer(learned, add_special_tokens=False)["input_ids"] != ids[: config.n_ctx]:
            raise ValueError(
                f"ctx_init {config.ctx_init!r} cannot be split after its first {config.n_ctx} tokens at a word "
                "boundary: choose an n_ctx that ends on a whole word, or an init text of n_ctx tokens."
            )
        return replace(config, ctx_init=learned, template=f"{fixed} {config.template}")

    def text_features(
        self, clip: CLIPModel, context: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        index = self.prompt_context_index

        def deep(prompt: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
            def write(hidden: torch.Tensor) -> torch.Tensor:
                return torch.where((index >= 0)[..., None], prompt[index.clamp(min=0)].to(hidden.dtype), hidden)

            return write

        layers = clip.text_model.encoder.layers
        with transformed_layer_inputs({layers[i + 1]: deep(p) for i, p in enumerate(self.deep_prompts)}):
            return super().text_features(clip, context)

    def vision_prompts(self, context: torch.Tensor | None) -> list[torch.Tensor]:
        """The M vision prompt tokens of layers 0..J-1: the coupling maps' outputs, the only way the learned
        prompts reach the image tower."""
        if context is None:
            raise ValueError("MaPLe's image features depend on the learned context: pass context=.")
        sources = [context, *self.deep_prompts]
        pairs = zip(self.couplings, sources, strict=True)
        return [coupling(source.to(coupling.weight.dtype)) for coupling, source in pairs]

    def image_features(
        self, clip: CLIPModel, pixel_values: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Features of the image tower with :meth:`vision_prompts` appended after the embeddings and replacing the
        previous layer's outputs at those positions in the next layers."""
        first, *deeper = self.vision_prompts(context)
        batch = len(pixel_values)

        def append(embeddings: torch.Tensor) -> torch.Tensor:
            return torch.cat([embeddings, first.to(embeddings.dtype).expand(batch, -1, -1)], dim=1)

        def replace_last(prompt: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            def write(hidden: torch.Tensor) -> torch.Tensor:
                return torch.cat([hidden[:, : -len(prompt)], prompt.to(hidden.dtype).expand(batch, -1, -1)], dim=1)

            return write

        vision = clip.vision_model
        layers = {vision.encoder.layers[i + 1]: replace_last(p) for i, p in enumerate(deeper)}
        with transformed_output(vision.embeddings, append), transformed_layer_inputs(layers):
            pooled = vision(pixel_values=pixel_values.to(clip.dtype)).pooler_output
        return F.normalize(clip.visual_projection(pooled), dim=-1)

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().contiguous() for key, value in self.state_dict().items()}

    def load_extra_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in state_dict.items()}
        if found != expected:
            raise ValueError(
                f"The saved {self.title} prompts hold {len(found)} tensors {sorted(found.items())[:2]}... but this "
                f"prompt needs {len(expected)}: they come from another prompt depth, n_ctx or base model."
            )
        self.load_state_dict(state_dict)

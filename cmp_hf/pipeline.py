"""transformers' ``pipeline`` for a calibrated prompt: ``[{"label", "score"}]`` lists as ``image-classification``
gives, scored with the prompt's calibrated probabilities.

Importing cmp_hf registers the task ``"calibrated-image-classification"`` in transformers' ``PIPELINE_REGISTRY``:

    import cmp_hf
    from transformers import pipeline

    classifier = pipeline("calibrated-image-classification", model="you/coop-cmp-pets")
    classifier("cat.jpg", top_k=3)  # [{"label": "Abyssinian", "score": 0.91}, ...]

No remote code is involved (no ``trust_remote_code``): the pipeline's code is the installed cmp_hf. ``pipeline``
sees the prompt's ``adapter_config.json``, reads the base CLIP's config from the ``base_model_name_or_path`` it
names, and then loads the model through the task's model class, :class:`CalibratedCLIPLoader`. A ready
``CalibratedCLIP`` is taken as ``model=`` too: the way to pin a prompt revision, since ``pipeline`` hands the
*base model's* resolved revision to the loader and the loader therefore ignores ``revision``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .classifier import CalibratedCLIP

TASK = "calibrated-image-classification"


class CalibratedImageClassificationPipeline(Pipeline):
    """``image-classification`` for a ``CalibratedCLIP``: one image (PIL image, path, URL, uint8 array) or a list,
    ``top_k`` labels each (default 5), scores = the calibrated class probabilities (temperature, DAC). Batches with
    ``batch_size=`` like any pipeline; the class text features are computed once for all calls."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: CalibratedCLIP, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, CalibratedCLIP):
            raise TypeError(
                f"The {TASK} pipeline takes a CalibratedCLIP or the Hub id / directory of a cmp_hf prompt as model=, "
                f"got {type(model).__name__}."
            )
        kwargs["image_processor"] = kwargs.get("image_processor") or model.image_processor
        super().__init__(model, *args, **kwargs)

    def __repr__(self) -> str:  # Pipeline's asks the model for generation and modality attributes
        summary = {"classes": len(self.model.class_names), "device": str(self.device), "dtype": str(self.model.dtype)}
        return f"{type(self).__name__}: {summary}"

    def _sanitize_parameters(self, top_k: int | None = None, timeout: float | None = None):
        preprocess = {} if timeout is None else {"timeout": timeout}
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer (labels per image), got {top_k!r}.")
        return preprocess, {}, {} if top_k is None else {"top_k": top_k}

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            image = load_image(image, timeout=timeout)
        batches, _ = self.model.pixel_batches(image, batch_size=1)
        return {"pixel_values": next(batches)}

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.model.batch_logits(model_inputs["pixel_values"])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int = 5) -> list[dict[str, Any]]:
        probs = model_outputs["logits"][0].float().softmax(dim=-1)
        scores, indices = probs.topk(min(top_k, len(probs)))
        names = self.model.class_names
        return [{"label": names[i], "score": p} for p, i in zip(scores.tolist(), indices.tolist(), strict=True)]


class CalibratedCLIPLoader:
    """The task's model class: ``pipeline(TASK, model="<id or directory>")`` calls ``from_pretrained`` on it."""

    @staticmethod
    def from_pretrained(
        prompt: str, token: str | bool | None = None, dtype: torch.dtype | str | None = None, **pipeline_kwargs: Any
    ) -> CalibratedCLIP:
        """``CalibratedCLIP.from_pretrained(prompt)``; ``dtype`` bfloat16/float16 runs it under autocast. The other
        keywords ``pipeline`` passes (the base model's ``config`` and ``revision``, ...) do not apply to a prompt."""
        autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None
        return CalibratedCLIP.from_pretrained(prompt, token=token if isinstance(token, str) else None, dtype=autocast)


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=CalibratedImageClassificationPipeline, pt_model=CalibratedCLIPLoader, type="image"
)

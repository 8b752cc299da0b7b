"""Post-hoc calibration fitted after training; neither changes a prediction's argmax, only its confidence.

* Temperature scaling (Guo et al., ICML 2017): one scalar T > 0 divides the logits, fitted by minimising the NLL
  of held-out labelled logits (CoOp's few-shot validation set), so it assumes that set looks like the test data.
* Distance-aware calibration, DAC (Wang et al., ICML 2024; the authors' ``DistanseAwareCalibration``): for a prompt
  transferred to new classes, a per-class scale from how far each class's text feature moved away from the base
  classes with tuning; it needs no labels and only changes predictions of non-base classes.
* Shift-aware temperature: a per-image temperature that grows as the image lies farther from the few-shot training
  images (its mean cosine similarity to its nearest ones, against the same measure among the training images
  themselves), after proximity-informed calibration (Xiong et al., NeurIPS 2023). A prompt is fitted on a few
  images of its classes; an image unlike all of them (another domain, heavy corruption) is where its confidence is
  least earned. Only on the prompt's own classes: images of new classes are far from the training images by nature.
* Zero-shot anchoring: the probabilities become a mixture of the prompt's and zero-shot CLIP's (the hand-crafted
  prompt), an output-space ensemble as in WiSE-FT (Wortsman et al., CVPR 2022). Where the two disagree the mixture
  is less confident; on new classes, where the learned context has never been fitted, zero-shot CLIP is the better
  calibrated of the two, so a transferred prompt gets its own (larger) weight.

:class:`PostHocCalibration` holds all of them: it is saved with the prompt (``calibration.json``, and the training
images' features in ``calibration.safetensors``) and applied in ``PromptTunedCLIP.forward``, so the trainer's
evaluation, a transfer to other classes (``for_classes``) and ``CalibratedCLIP`` all calibrate the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from .atomic import save_safetensors, write_json
from .constants import CALIBRATION_FEATURES_NAME, CALIBRATION_NAME
from .integrity import load_weights_file, tensors_sha256

TEMPERATURE_PRIOR_STD = 0.25  # prior std of log T: T within [0.6, 1.65] at 2 sigma unless the data insist

logger = logging.getLogger(__name__)


@dataclass
class PostHocCalibration:
    """Post-hoc calibration of a prompt's logits: ``logits / temperature``, the shift-aware per-image temperature,
    DAC's class scales, then the mixture with zero-shot CLIP; each step only when it is set.

    Args:
        temperature: temperature-scaling T (1 = none), fitted by ``CMPTrainer.fit_temperature``.
        dac_k: when set, a transfer of the prompt to other classes computes DAC's class scales with k neighbours.
        shift_strength: gamma of the shift-aware temperature exp(gamma * u), u = how many standard deviations an
            image's proximity to the training images lies below their own typical proximity (0 = off).
        shift_neighbours: proximity = mean cosine similarity to this many nearest training images.
        zero_shot_weight: weight w of zero-shot CLIP in p = (1 - w) p_prompt + w p_zero_shot on the prompt's classes.
        transfer_zero_shot_weight: the same weight once the prompt is transferred to other classes.
        reference_features: L2-normalised image features of the training images (what the shift-aware temperature
            measures proximity to), set by ``CMPTrainer.fit_posthoc_calibration``; saved with the prompt.
        on_new_classes: whether the classes are other than the prompt's own (set by a transfer, never saved).
        class_scales: DAC's per-class scales of a transferred prompt (computed, never saved: they follow from the
            prompt and the classes).
        zero_shot_text_features: zero-shot CLIP's class text features for the current classes (computed by the
            model when a zero-shot weight is set, never saved).
    """

    temperature: float = 1.0
    dac_k: int | None = None
    shift_strength: float = 0.0
    shift_neighbours: int = 5
    zero_shot_weight: float = 0.0
    transfer_zero_shot_weight: float = 0.0
    reference_features: torch.Tensor | None = field(default=None, repr=False)
    on_new_classes: bool = field(default=False, repr=False)
    class_scales: torch.Tensor | None = field(default=None, repr=False)
    zero_shot_text_features: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.dac_k is not None and self.dac_k < 1:
            raise ValueError(f"dac_k must be >= 1 (neighbours among the base classes), got {self.dac_k}.")
        if not self.shift_strength >= 0 or self.shift_neighbours < 1:
            raise ValueError(
                f"shift_strength must be >= 0 and shift_neighbours >= 1, got {self.shift_strength} and "
                f"{self.shift_neighbours}."
            )
        for name in ("zero_shot_weight", "transfer_zero_shot_weight"):
            weight = getattr(self, name)
            if not 0 <= weight < 1:
                raise ValueError(f"{name} must be in [0, 1) (the mixture weight of zero-shot CLIP), got {weight}.")
        self._reference_proximity: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def anchor_weight(self) -> float:
        """The zero-shot weight in force: the transfer weight once transferred to other classes."""
        return self.transfer_zero_shot_weight if self.on_new_classes else self.zero_shot_weight

    @property
    def shifts(self) -> bool:
        """Whether the shift-aware temperature applies (set, fitted, and on the prompt's own classes)."""
        return self.shift_strength > 0 and self.reference_features is not None and not self.on_new_classes

    def apply(
        self,
        logits: torch.Tensor,
        image_features: torch.Tensor | None = None,
        zero_shot_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Calibrated logits. ``image_features`` are needed by the shift-aware temperature and ``zero_shot_logits``
        (zero-shot CLIP's logits for the same images and classes) by the anchoring; with anchoring the result is
        log-probabilities of the mixture (softmax of them gives the mixture back)."""
        logits = logits / self.temperature if self.temperature != 1.0 else logits
        image_temperature = None
        if self.shifts:
            if image_features is None:
                raise ValueError("The shift-aware temperature needs the images' features.")
            image_temperature = self.image_temperatures(image_features)[:, None].to(logits.dtype)
            logits = logits / image_temperature
        if self.class_scales is not None:
            logits = apply_class_scales(logits, self.class_scales)
        weight = self.anchor_weight
        if weight == 0:
            return logits
        if zero_shot_logits is None:
            raise ValueError("Zero-shot anchoring needs zero-shot CLIP's logits for the same images.")
        zero_shot_logits = zero_shot_logits.to(logits.dtype)
        if image_temperature is not None:
            zero_shot_logits = zero_shot_logits / image_temperature
        return torch.logaddexp(
            math.log1p(-weight) + logits.log_softmax(dim=-1), math.log(weight) + zero_shot_logits.log_softmax(dim=-1)
        )

    def image_temperatures(self, image_features: torch.Tensor) -> torch.Tensor:
        """exp(shift_strength * u) per image, u = (median - p) / std with p the image's proximity to the reference
        features and median, std those of the reference images' own leave-one-out proximities."""
        reference = self.reference_features.to(image_features.device, torch.float32)
        if self._reference_proximity is None:
            own = proximity(reference, reference, self.shift_neighbours, exclude_self=True)
            self._reference_proximity = own.median(), own.std().clamp_min(1e-6)
        median, std = (value.to(image_features.device) for value in self._reference_proximity)
        distance = (median - proximity(image_features.float(), reference, self.shift_neighbours)) / std
        return torch.exp(self.shift_strength * distance)

    def to_new_classes(self, class_scales: torch.Tensor | None = None) -> PostHocCalibration:
        """The calibration of this prompt moved to other classes: the same temperature, the transfer weight of the
        anchoring, no shift-aware temperature, and DAC's ``class_scales`` (:func:`distance_aware_scales`) when
        ``dac_k`` is set."""
        return replace(self, on_new_classes=True, class_scales=class_scales, zero_shot_text_features=None)

    def saved_values(self) -> dict[str, float | int | None]:
        """What the prompt's settings digest covers: ``calibration.json``'s values and the digest of the reference
        features (the class scales follow from the prompt and are never saved)."""
        values = self._json_values()
        if self.shifts:
            values["reference_features_sha256"] = tensors_sha256(self._reference_tensors())
        return values

    def _json_values(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in _SAVED_FIELDS}

    def _reference_tensors(self) -> dict[str, torch.Tensor]:
        return {"reference_features": self.reference_features.float().contiguous()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``calibration.json`` (and ``calibration.safetensors`` with the reference features when the
        shift-aware temperature is set), or remove stale ones when there is nothing to apply."""
        path = os.path.join(save_directory, CALIBRATION_NAME)
        features_path = os.path.join(save_directory, CALIBRATION_FEATURES_NAME)
        saved = self._json_values()
        if saved == {name: f.default for name, f in _DEFAULTS.items()}:
            for stale in (path, features_path):  # a directory reused for an uncalibrated prompt
                if os.path.isfile(stale):
                    os.remove(stale)
            return
        if self.shifts:
            save_safetensors(self._reference_tensors(), features_path)
        elif os.path.isfile(features_path):
            os.remove(features_path)
        write_json(path, saved, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PostHocCalibration:
        """What ``calibration.json`` (and ``calibration.safetensors``) say; none (T = 1, nothing else) without."""
        path = os.path.join(directory, CALIBRATION_NAME)
        if not os.path.isfile(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        unknown = set(saved) - set(_SAVED_FIELDS)
        if unknown:
            raise ValueError(f"{path} holds unknown fields {sorted(unknown)}: it was written by a newer cmp_hf.")
        if saved.get("shift_strength", 0) > 0:
            features_path = os.path.join(directory, CALIBRATION_FEATURES_NAME)
            if not os.path.isfile(features_path):
                raise FileNotFoundError(
                    f"{path} sets a shift-aware temperature but {features_path} (the training images' features) is "
                    "missing: copy or download the whole prompt again."
                )
            saved["reference_features"] = load_weights_file(features_path)["reference_features"]
        return cls(**saved)


def describe(calibration: PostHocCalibration) -> str:
    """One line for the model card: the post-hoc steps applied to this prompt's logits."""
    steps = []
    if calibration.temperature != 1.0:
        steps.append(f"temperature scaling, T = {calibration.temperature:.4g}")
    if calibration.shift_strength > 0:
        steps.append(f"shift-aware temperature, gamma {calibration.shift_strength:g} over the "
                     f"{calibration.shift_neighbours} nearest training images")  # fmt: skip
    if calibration.zero_shot_weight or calibration.transfer_zero_shot_weight:
        steps.append(f"zero-shot anchoring, weight {calibration.zero_shot_weight:g} on these classes and "
                     f"{calibration.transfer_zero_shot_weight:g} on classes it is transferred to")  # fmt: skip
    if calibration.dac_k is not None:
        steps.append(f"DAC on transferred classes, k = {calibration.dac_k}")
    return "; ".join(steps) if steps else "none"


_SAVED_FIELDS = ("temperature", "dac_k", "shift_strength", "shift_neighbours", "zero_shot_weight",
                 "transfer_zero_shot_weight")  # fmt: skip
_DEFAULTS = {f.name: f for f in fields(PostHocCalibration) if f.name in _SAVED_FIELDS}


def proximity(
    features: torch.Tensor, reference: torch.Tensor, neighbours: int, exclude_self: bool = False
) -> torch.Tensor:
    """Mean cosine similarity of each (L2-normalised) feature to its ``neighbours`` most similar reference features
    (with ``exclude_self``, ``features`` is ``reference`` and each row's own entry is left out)."""
    similarity = features @ reference.t()
    if exclude_self:
        similarity = similarity.fill_diagonal_(-math.inf)
    k = min(neighbours, reference.shape[0] - int(exclude_self))
    if k < 1:
        raise ValueError("The shift-aware temperature needs at least two training images.")
    return similarity.topk(k, dim=1).values.mean(dim=1)


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200, prior_std: float | None = TEMPERATURE_PRIOR_STD
) -> float:
    """Temperature scaling that cannot run away on a few-shot validation set: the T maximising the likelihood of
    ``logits / T`` plus a Gaussian prior N(0, ``prior_std``^2) on log T (L-BFGS on log T, float64; ``None``: plain
    maximum likelihood, Guo et al.).

    When every example is classified correctly, the likelihood has no maximum (it grows as T -> 0) and the few
    examples say nothing about how often the prompt is wrong: T = 1 is returned, with a log line that says so.
    """
    if len(labels) == 0:
        raise ValueError("Temperature scaling needs at least one labelled example.")
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels).long()
    if bool((logits.argmax(dim=1) == labels).all()):
        logger.info(
            "Temperature scaling: all %d validation examples are classified correctly, so they cannot tell how "
            "confident the prompt should be; T = 1 is kept (a larger or harder held-out set would give a fit).",
            len(labels),
        )
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels, reduction="sum")
        if prior_std is not None:
            loss = loss + 0.5 * (log_t / prior_std).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def distance_aware_scales(
    base_zero_shot: torch.Tensor,
    classes_zero_shot: torch.Tensor,
    base_tuned: torch.Tensor,
    classes_tuned: torch.Tensor,
    k: int = 5,
    base_radius: float = 0.05,
) -> torch.Tensor:
    """DAC (Wang et al., ICML 2024): one logit scale per class for a prompt transferred to new classes.

    For each class, the mean Euclidean distance to its k nearest base-class text features is measured twice, with
    the tuned prompt and with the hand-crafted (zero-shot) prompt; the scale is exp(-d_tuned) / exp(-d_zero_shot).
    A class whose tuned feature lies within ``base_radius`` of a base class is a base class: scale 1. It assumes
    that a new class far from the base classes after tuning, compared with before, deserves less confidence.
    """
    k = min(k, len(base_tuned))
    d_zero_shot = torch.cdist(classes_zero_shot.double(), base_zero_shot.double()).topk(k, largest=False).values
    d_tuned = torch.cdist(classes_tuned.double(), base_tuned.double()).topk(k, largest=False).values
    scales = torch.exp(-d_tuned.mean(dim=1)) / torch.exp(-d_zero_shot.mean(dim=1))
    return torch.where(d_tuned[:, 0] < base_radius, torch.ones_like(scales), scales).float()


def apply_class_scales(logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Multiply each sample's logits by the scale of its predicted class (a per-prediction temperature)."""
    return logits * scales.to(logits.device, logits.dtype)[logits.argmax(dim=1)][:, None]


@dataclass
class PostHocArguments:
    """The post-hoc options of ``CMPConfig`` (a base class of it, so they are ``TrainingArguments`` fields like the
    others: YAML keys, command-line flags, ``--help``), kept beside the calibration they describe."""

    temperature_scaling: bool = field(
        default=False,
        metadata={
            "help": "Temperature scaling after training, fitted on held-out labelled images (CMPTrainer's "
            "calibration_dataset; a recipe's few-shot validation split) with a N(0, 0.25^2) prior on log T; when "
            "every held-out image is classified correctly, T stays 1 (they cannot say how often the prompt errs)."
        },
    )
    shift_strength: float = field(
        default=0.0,
        metadata={
            "help": "Shift-aware temperature (0 = off): after training, the training images' features are kept with "
            "the prompt, and each image's logits are divided by exp(shift_strength * u), u = how many standard "
            "deviations its mean cosine similarity to its nearest training images lies below the training images' "
            "own (negative for typical images, which then keep or sharpen their confidence). Images unlike every "
            "training image, e.g. from another domain, get less confidence. The prompt's own classes only."
        },
    )
    shift_neighbours: int = field(
        default=5, metadata={"help": "Shift-aware temperature: the number of nearest training images averaged."}
    )
    zero_shot_weight: float = field(
        default=0.0,
        metadata={
            "help": "Zero-shot anchoring on the prompt's own classes: probabilities = (1 - w) x the prompt's + w x "
            "zero-shot CLIP's ('a photo of a {}.'), an output ensemble (WiSE-FT); 0 = off."
        },
    )
    transfer_zero_shot_weight: float = field(
        default=0.0,
        metadata={
            "help": "Zero-shot anchoring once the prompt is transferred to other classes (for_classes, novel "
            "classes), where the learned context was never fitted and zero-shot CLIP is usually the better "
            "calibrated; 0 = off."
        },
    )
    zero_shot_min_accuracy: float = field(
        default=0.0,
        metadata={
            "help": "Zero-shot anchoring only where zero-shot CLIP is competent: if its accuracy on the training "
            "images (which it was never fitted to) is below this fraction, both zero-shot weights become 0, with a "
            "log line (0 = always anchor)."
        },
    )

    def posthoc_calibration(self) -> PostHocCalibration:
        """The post-hoc steps these arguments ask for, before fitting (``CMPTrainer.fit_posthoc_calibration`` adds the
        temperature, the training images' features and the zero-shot gate); building it validates the values (and
        the gate's here), which ``CMPConfig`` does when it is built, before any training."""
        if not 0 <= self.zero_shot_min_accuracy <= 1:
            raise ValueError(
                "zero_shot_min_accuracy is a fraction of the training images, in [0, 1]; got "
                f"{self.zero_shot_min_accuracy}."
            )
        return PostHocCalibration(
            shift_strength=self.shift_strength,
            shift_neighbours=self.shift_neighbours,
            zero_shot_weight=self.zero_shot_weight,
            transfer_zero_shot_weight=self.transfer_zero_shot_weight,
        )

    @property
    def posthoc_requested(self) -> bool:
        """Whether training ends by fitting post-hoc calibration (temperature, shift-aware temperature, anchoring)."""
        return bool(
            self.temperature_scaling or self.shift_strength or self.zero_shot_weight or self.transfer_zero_shot_weight
        )

"""``CMPTrainer``'s post-hoc steps, fitted after training on the trained prompt (:mod:`cmp_hf.posthoc` holds
the maths and the saved calibration; this holds how a trainer gets the logits and image features they are fitted on).

:class:`PostHocFitting` uses what ``CMPTrainer.__init__`` sets up: ``_train_images`` and ``_calibration_images``
(the datasets as the user passed them) and ``_model_inputs`` (the input pipeline).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from datasets import Dataset
from transformers import Trainer

from . import posthoc
from .data.feature_cache import FEATURES_COLUMN

logger = logging.getLogger(__name__)


class PostHocFitting(Trainer):
    """Temperature scaling, the shift-aware temperature and zero-shot anchoring, fitted from a trainer's data."""

    def fit_temperature(self, dataset: Dataset) -> float:
        """Temperature scaling on ``dataset`` (e.g. the few-shot validation set): fit T on the prompt's logits,
        set it on the model (saved with it from now on) and return it."""
        calibration = self.model.calibration
        calibration.temperature = 1.0
        output = self.predict(dataset, metric_key_prefix="temperature_fit")
        logits, labels = torch.from_numpy(output.predictions), torch.from_numpy(output.label_ids)
        calibration.temperature = posthoc.fit_temperature(logits, labels)
        return calibration.temperature

    def fit_posthoc_calibration(self) -> None:
        """Fit the post-hoc steps ``args`` ask for (run at the end of :meth:`train`), replacing any earlier ones:
        temperature scaling on ``calibration_dataset``, then the shift-aware temperature (the training images'
        features, encoded as the learner encodes images, un-augmented) and the zero-shot anchoring weights, which
        are set to 0 where zero-shot CLIP classifies fewer than ``zero_shot_min_accuracy`` of the training images."""
        args = self.args
        self.model.calibration = posthoc.PostHocCalibration()  # T is fitted on the prompt's own logits
        if args.temperature_scaling:
            self.fit_temperature(self._calibration_images)
        anchoring = args.zero_shot_weight or args.transfer_zero_shot_weight
        features = self.image_features(self._train_images) if args.shift_strength or anchoring else None
        weights, zero_shot = (args.zero_shot_weight, args.transfer_zero_shot_weight), None
        if anchoring:
            with torch.no_grad():  # kept with the calibration: the forward would compute the same features again
                zero_shot = self.model.hand_crafted_text_features()
            accuracy = self._zero_shot_accuracy(features, zero_shot)
            if accuracy < args.zero_shot_min_accuracy:
                logger.info(
                    "Zero-shot anchoring off: zero-shot CLIP classifies %.1f %% of the training images correctly, "
                    "below zero_shot_min_accuracy (%.1f %%).", 100 * accuracy, 100 * args.zero_shot_min_accuracy,
                )  # fmt: skip
                weights, zero_shot = (0.0, 0.0), None
        self.model.calibration = replace(
            args.posthoc_calibration(),
            temperature=self.model.calibration.temperature,
            zero_shot_weight=weights[0],
            transfer_zero_shot_weight=weights[1],
            reference_features=features if args.shift_strength else None,
            zero_shot_text_features=zero_shot,
        )

    def _zero_shot_accuracy(self, train_features: torch.Tensor, zero_shot: torch.Tensor) -> float:
        """Zero-shot CLIP's accuracy on the training images, from their features and its class text features."""
        labels = torch.as_tensor(self._train_images[self.args.label_column])
        predicted = (train_features @ zero_shot.float().cpu().t()).argmax(dim=1)
        return float((predicted == labels).float().mean())

    @torch.no_grad()
    def image_features(self, dataset: Dataset) -> torch.Tensor:
        """The (L2-normalised) image features of ``dataset``'s images, from the feature cache when there is one,
        gathered over processes in the dataset's order."""
        if not isinstance(dataset, Dataset) or len(dataset) < 2:
            raise ValueError("The shift-aware temperature needs a training set (a datasets.Dataset of 2+ images).")
        self.model.eval()
        found = []
        for batch in self.get_test_dataloader(self._model_inputs(dataset)):
            batch = self._prepare_inputs(batch)
            features = batch.get(FEATURES_COLUMN)
            if features is None:
                features = self.model.image_features(batch["pixel_values"])
            found.append(self.accelerator.gather_for_metrics(features.float()).cpu())
        return torch.cat(found)

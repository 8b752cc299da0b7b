"""Prompt learners, one module each, and the registry that maps ``prompt_learner`` names to them."""

from ..prompts.config import PromptConfig
from .base import PromptLearner
from .cocoop import CoCoOpLearner
from .coop import CoOpLearner
from .maple import MaPLeLearner
from .proda import ProDALearner
from .promptsrc import PromptSRCLearner

LEARNERS: dict[str, type[PromptLearner]] = {
    learner.name: learner for learner in (CoOpLearner, CoCoOpLearner, MaPLeLearner, ProDALearner, PromptSRCLearner)
}


def learner_class(config: PromptConfig) -> type[PromptLearner]:
    """The learner ``config.learner`` names, after it has checked the prompt options (before any model is built)."""
    if config.learner not in LEARNERS:
        hint = ""
        if config.learner.lower() == "kgcoop":  # the paper's fifth method is a loss term, not a learner
            hint = (
                " KgCoOp is CoOp plus a loss term: keep prompt_learner coop (or another learner) and set "
                "kgcoop_weight (its paper and recipes/configs/suite/learners/kgcoop.yaml: 8.0)."
            )
        raise ValueError(f"Unknown prompt learner {config.learner!r}: use one of {sorted(LEARNERS)}.{hint}")
    learner = LEARNERS[config.learner]
    learner.check_options(config)
    learner.check_config(config)
    return learner


__all__ = [
    "LEARNERS", "CoCoOpLearner", "CoOpLearner", "MaPLeLearner", "ProDALearner", "PromptLearner", "PromptSRCLearner",
    "learner_class",
]  # fmt: skip

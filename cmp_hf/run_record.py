"""The record of a recipe run in its output directory, in one typed format: ``run.json`` (what the run was) and
``metrics.json`` (what it measured), written and read by :class:`cmp_hf.runs.RunDir`, read by the paper's tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .config import CMPConfig

_CONFIG_DEFAULTS = {option.name: option.default for option in fields(CMPConfig)}


@dataclass
class RunRecord:
    """What a recipe run was (``run.json``: every field but ``metrics``) and what it measured (``metrics.json``:
    ``{eval set: {metric: value}}``). Fields a ``run.json`` lacks (one of an older version) take CMPConfig's
    defaults; keys this version does not know are ignored."""

    dataset: str
    setting: str  # "all_8shot", "base_to_novel_16shot", ...
    shots: int | None = None
    seed: int | None = None
    cmp_lambda: float = _CONFIG_DEFAULTS["cmp_lambda"]
    cmp_form: str = _CONFIG_DEFAULTS["cmp_form"]
    cmp_competitors: str = _CONFIG_DEFAULTS["cmp_competitors"]
    kgcoop_weight: float = _CONFIG_DEFAULTS["kgcoop_weight"]
    prompt_learner: str = _CONFIG_DEFAULTS["prompt_learner"]
    fewshot_sampling: str | None = None  # with shots: how the few-shot sample was drawn
    data_root: str | None = None
    coop_test: dict[str, bool] = field(default_factory=dict)  # suite dataset -> is its test set CoOp's?
    temperature: float | None = None  # the fitted post-hoc temperature; None until the run has trained
    dac_k: int | None = None
    preset: str | None = None
    shift_strength: float = _CONFIG_DEFAULTS["shift_strength"]
    zero_shot_weight: float = _CONFIG_DEFAULTS["zero_shot_weight"]
    transfer_zero_shot_weight: float = _CONFIG_DEFAULTS["transfer_zero_shot_weight"]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: CMPConfig, **values: Any) -> RunRecord:
        """A record of ``config``'s run: the fields CMPConfig also has are taken from it, the others given."""
        shared = [option.name for option in fields(cls) if option.name in _CONFIG_DEFAULTS]
        return cls(**{**{name: getattr(config, name) for name in shared}, **values})

    def run_json(self) -> dict[str, Any]:
        """``run.json``'s content: every field but the metrics."""
        return {key: value for key, value in asdict(self).items() if key != "metrics"}

    @classmethod
    def from_json(cls, run: dict[str, Any], metrics: dict[str, dict[str, float]] | None = None) -> RunRecord:
        known = {option.name for option in fields(cls)} - {"metrics"}
        missing = [name for name in ("dataset", "setting") if name not in run]
        if missing:
            raise ValueError(f"run.json lacks {missing}")
        return cls(**{key: value for key, value in run.items() if key in known}, metrics=metrics or {})

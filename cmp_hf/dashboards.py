"""Evaluation figures on the experiment trackers Trainer reports to (``report_to``).

Trainer already sends every scalar (``eval/<set>_ece_pct``, ...) to the trackers; a calibration run is read from its
reliability diagram, which no tracker gets by itself. ``EvalFiguresCallback`` adds, after each evaluation of an
eval set, its reliability diagram and risk-coverage curve as images: through the writer of Trainer's own
``TensorBoardCallback`` (same run directory and event stream as the scalars) and through ``trackio.log`` with
``trackio.Image``. ``CMPTrainer`` registers it when ``report_to`` names one of these trackers; remove it with
``trainer.remove_callback(EvalFiguresCallback)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, TrackioCallback

from .eval_report import FIGURES, EvalReport

IMAGE_TRACKERS = ("tensorboard", "trackio")


class EvalFiguresCallback(TrainerCallback):
    """Log each new evaluation's figures to TensorBoard and trackio, under ``eval/<set>_<figure>``.

    ``reports`` is the trainer's ``eval_reports`` (filled before ``on_evaluate``) and ``callbacks`` the trainer's
    callback list, where the tracker callbacks live; both are read at each evaluation, not copied.
    """

    def __init__(self, reports: dict[str, EvalReport], callbacks: list[TrainerCallback]) -> None:
        self.reports = reports
        self.callbacks = callbacks
        self._logged: dict[str, EvalReport] = {}

    @staticmethod
    def wanted(report_to: Iterable[str] | None) -> bool:
        """Whether ``report_to`` (as TrainingArguments normalises it: a list) names a tracker that takes images."""
        return bool(set(report_to or ()) & set(IMAGE_TRACKERS))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> TrainerControl | None:
        if not state.is_world_process_zero:
            return None
        # a report object is replaced at each evaluation of its set: log those not logged yet
        fresh = {name: report for name, report in self.reports.items() if self._logged.get(name) is not report}
        self._logged.update(fresh)
        if not fresh:
            return None
        images = {
            f"eval/{name}_{figure}": report.image(figure) for name, report in fresh.items() for figure in FIGURES
        }
        for callback in self.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                for tag, image in images.items():
                    callback.tb_writer.add_image(tag, image, state.global_step, dataformats="HWC")
                callback.tb_writer.flush()
            elif isinstance(callback, TrackioCallback):
                import trackio  # present: Trainer made the callback; its on_log has started the run

                trackio.log({tag: trackio.Image(image, caption=tag) for tag, image in images.items()})
        return None

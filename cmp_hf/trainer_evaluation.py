"""``CMPTrainer``'s evaluation: every eval set's calibration metrics and report (the maths fed batch by batch, its
result computed once per set), class text features once.

Kept apart from the training loop (as transformers keeps Seq2SeqTrainer's generation apart from Trainer):
:class:`CalibrationEvaluation` overrides Trainer's ``evaluate``, ``predict`` and ``evaluation_loop`` and uses what
``CMPTrainer.__init__`` sets up: ``_model_inputs`` (the input pipeline), ``eval_reports``, ``_components`` and
``_report_name``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import EvalPrediction, Trainer

from .eval_report import EvalReport
from .metrics import CalibrationAccumulator, CalibrationMetrics, NonFiniteScoresError


class CalibrationEvaluation(Trainer):
    """Trainer's evaluation with the calibration maths run once per eval set and its report kept by name."""

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        class_names: list[str] | None = None,
    ) -> dict[str, float]:
        """As Trainer's, and:

        * datasets of images passed here go through the same feature cache as the eval sets;
        * ``class_names`` evaluates under other classes with the same learned context (CoOp's transfer to novel
          classes or to another dataset): the dataset's labels index ``class_names``;
        * each eval set's report (metrics + reliability table) is kept in ``eval_reports`` under its name (the key
          of a dict of eval sets; ``metric_key_prefix`` without its ``eval_`` for a single set, ``"eval"`` when
          that is all it is) and saved with the model as ``eval/<name>/``.
        """
        override = eval_dataset is not None
        datasets = eval_dataset if override else self.eval_dataset
        if isinstance(datasets, dict):
            metrics = {}
            for name, dataset in datasets.items():  # Trainer looks a name up in self.eval_dataset (cached loaders)
                dataset = dataset if override else name
                metrics.update(self._evaluate_set(dataset, name, ignore_keys, metric_key_prefix, class_names))
            return metrics
        name = metric_key_prefix.removeprefix("eval_")
        return self._evaluate_set(eval_dataset, name, ignore_keys, metric_key_prefix, class_names, single=True)

    def _evaluate_set(
        self,
        dataset: Dataset | str | None,
        name: str,
        ignore_keys: list[str] | None,
        metric_key_prefix: str,
        class_names: list[str] | None,
        single: bool = False,
    ) -> dict[str, float]:
        prefix = metric_key_prefix if single else f"{metric_key_prefix}_{name}"
        classes = self.model.over_classes(class_names) if class_names is not None else nullcontext()
        self._report_name = name
        try:
            with classes:
                return super().evaluate(self._model_inputs(dataset), ignore_keys, prefix)
        finally:
            self._report_name = None

    def get_eval_dataloader(self, eval_dataset: Dataset | str | None = None):
        """As Trainer's, except that a dataset passed in (not a name of ``self.eval_dataset``) neither gets nor leaves
        a cached loader. Trainer keeps persistent-workers loaders by name and files every passed dataset under
        ``"eval"``, so the next passed dataset would be read through the first one's loader: its numbers, silently."""
        if eval_dataset is None or isinstance(eval_dataset, str) or not self.args.dataloader_persistent_workers:
            return super().get_eval_dataloader(eval_dataset)
        own = getattr(self, "_eval_dataloaders", {}).pop("eval", None)  # self.eval_dataset's, kept aside
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            cached = getattr(self, "_eval_dataloaders", {})
            cached.pop("eval", None)
            if own is not None:
                cached["eval"] = own

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        return super().predict(self._model_inputs(test_dataset), ignore_keys, metric_key_prefix)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Evaluate with the class text features computed once, and add the mean loss terms to the metrics.

        With the default ``compute_metrics`` an evaluation feeds the calibration maths each batch as Trainer's loop
        gathers it (``batch_eval_metrics``, into a :class:`~cmp_hf.metrics.CalibrationAccumulator`): it keeps no
        logits, and the set's report and numbers come once, at the end. A prediction keeps its logits (Trainer's
        ``eval_accumulation_steps`` moves them off the device as usual) and the maths takes them at the end. Another
        ``compute_metrics`` gets the whole set's arrays, as usual, concatenated once (Trainer concatenates at every
        batch, quadratic in the set's size), or, with ``batch_eval_metrics``, each batch as Trainer gives it."""
        self.model.eval()
        self._components["eval"].reset()  # drop leftovers of an interrupted evaluation
        name = self._report_name
        own_metrics = self._computes_calibration_metrics()
        compute_metrics, reported = self.compute_metrics, name is not None or own_metrics
        accumulator = CalibrationAccumulator(self.args.calibration_bins)
        users_batches = self.args.batch_eval_metrics and not own_metrics  # a compute_metrics(p, compute_result)
        streamed = users_batches or (own_metrics and description != "Prediction")
        saved = self.args.eval_do_concat_batches, self.args.batch_eval_metrics, compute_metrics
        self.args.eval_do_concat_batches, self.args.batch_eval_metrics = False, streamed
        if streamed:
            users = compute_metrics if users_batches else None
            self.compute_metrics = _accumulating(accumulator if reported else None, users)
        else:
            self.compute_metrics = None if own_metrics else _on_whole_arrays(compute_metrics)
        try:
            with self.model.fixed_text_features():
                output = super().evaluation_loop(
                    dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
                )
        except NonFiniteScoresError as error:  # from a CalibrationMetrics with other bins
            raise self._non_finite_eval_error(name, error.rows) from error
        finally:
            self.args.eval_do_concat_batches, self.args.batch_eval_metrics, self.compute_metrics = saved
        output = output._replace(predictions=_joined(output.predictions), label_ids=_joined(output.label_ids))
        terms = self._components["eval"].pop(self._sum_over_processes, prefix=f"{metric_key_prefix}_")
        if not streamed and reported and output.predictions is not None and output.label_ids is not None:
            accumulator.update_from_trainer(output.predictions, output.label_ids)
        if accumulator.num_rows:
            output.metrics.update(self._report_metrics(accumulator, name, metric_key_prefix, own_metrics))
        output.metrics.update(terms)
        return output

    def _report_metrics(
        self, accumulator: CalibrationAccumulator, name: str | None, prefix: str, own_metrics: bool
    ) -> dict[str, float]:
        """The set's report (kept under ``name``); its metrics, prefixed, when they stand for the default
        ``compute_metrics`` (which Trainer did not call), to go where Trainer puts its numbers."""
        try:  # the maths found the non-finite rows: no second pass over the logits here
            report = EvalReport.from_result(name or prefix, accumulator.result())
        except NonFiniteScoresError as error:
            raise self._non_finite_eval_error(name, error.rows) from error
        if name is not None:
            self.eval_reports[name] = report
        return {f"{prefix}_{key}": value for key, value in report.metrics.items()} if own_metrics else {}

    def _non_finite_eval_error(self, name: str | None, rows: np.ndarray) -> ValueError:
        return ValueError(
            f"Eval set {name!r} gives non-finite logits for {len(rows)} rows (first: {rows[:10].tolist()}): their "
            f"images hold NaN or infinite values. Fix or drop those rows of the {self.args.image_column} column; no "
            "report of this set was written."
        )

    def _computes_calibration_metrics(self) -> bool:
        """Whether ``compute_metrics`` is the default ``CalibrationMetrics`` with the eval report's bins: then the
        report's metrics are its numbers and Trainer need not compute them a second time."""
        computed = self.compute_metrics
        return isinstance(computed, CalibrationMetrics) and computed.n_bins == self.args.calibration_bins


def _joined(values: Any) -> Any:
    """One array from Trainer's per-batch list of arrays (``eval_do_concat_batches=False``); anything else as is."""
    return np.concatenate(values) if isinstance(values, list) else values


def _accumulating(accumulator: CalibrationAccumulator | None, users: Callable | None) -> Callable:
    """``compute_metrics`` for Trainer's ``batch_eval_metrics``: each gathered batch into ``accumulator`` (when the
    set's report is wanted), and to the user's own per-batch ``compute_metrics`` if there is one."""

    def compute(prediction: EvalPrediction, compute_result: bool) -> dict[str, float]:
        if accumulator is not None:
            accumulator.update_from_trainer(prediction.predictions, prediction.label_ids)
        return users(prediction, compute_result=compute_result) if users is not None else {}

    return compute


def _on_whole_arrays(compute_metrics: Callable | None) -> Callable | None:
    """``compute_metrics`` called with whole-set arrays while Trainer gathers per-batch lists of them."""
    if compute_metrics is None:
        return None

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        fields = ("predictions", "label_ids", "inputs", "losses")
        return compute_metrics(EvalPrediction(**{name: _joined(getattr(prediction, name)) for name in fields}))

    return compute

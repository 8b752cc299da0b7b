"""``CMPTrainer``: prompt tuning of a frozen CLIP with cross-entropy + lambda * CMP, evaluated for calibration."""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from huggingface_hub import ModelCard
from transformers import CLIPModel, CLIPProcessor, TrainerCallback, set_seed

from .atomic import staged_directory, write_text
from .card import CardInfo, model_card
from .config import CMPConfig
from .constants import MODEL_CARD_NAME, TRAINING_ARGS_NAME
from .dashboards import EvalFiguresCallback
from .data.checks import check_columns, check_labels, check_training_set
from .data.collator import ROW_COLUMN
from .data.feature_cache import FEATURES_COLUMN
from .data.loading import class_names_from_features
from .data.pipeline import InputPipeline, named_datasets
from .eval_report import EvalReport
from .factory import load_prompt_weights, prompt_model
from .hub import hub_errors, push_checkpoint, push_output_dir, require_token
from .losses import margin_variance, training_objective
from .losses.components import LossComponents
from .metrics import CalibrationMetrics
from .modeling import ZERO_SHOT_TEMPLATE, PromptTunedCLIP
from .runs import RunDir
from .schedulers import coop_scheduler
from .trainer_evaluation import CalibrationEvaluation
from .trainer_posthoc import PostHocFitting

logger = logging.getLogger(__name__)


class CMPTrainer(PostHocFitting, CalibrationEvaluation):
    """Trainer for prompts on a frozen CLIP with the Confidence Misalignment Penalty.

    ``model`` may be a Hub id or local directory of a CLIP, a ``CLIPModel`` or a ready ``PromptTunedCLIP`` (whose
    own prompt options then apply). A plain CLIP gets a new prompt (learner ``args.prompt_learner``) built from
    ``args`` and ``class_names`` (default: the ``ClassLabel`` names of the train set's label column). The processor
    comes from ``processing_class`` or is loaded from where the CLIP was.

    The loss is cross-entropy (or focal loss, or label-smoothed cross-entropy) + ``cmp_lambda`` x CMP, plus MbLS and
    KgCoOp terms when their weights are set. Logged besides the loss: ``ce`` (plain cross-entropy, whatever the
    loss), ``cmp`` (the penalty before ``cmp_lambda``), each active baseline term, and ``misclassified`` (fraction
    of samples whose arg-max is wrong). Evaluation returns the calibration metrics of :mod:`cmp_hf.metrics` for each
    eval set and computes the class text features once per evaluation.

    Evaluation (:class:`~cmp_hf.trainer_evaluation.CalibrationEvaluation`) and the post-hoc steps fitted after
    training (:class:`~cmp_hf.trainer_posthoc.PostHocFitting`) live in their own modules; this one holds the set-up,
    the loss, the schedule, saving and the Hub.

    ``run_dir``: ``args.output_dir`` as a caller that already claimed it hands it over (the recipe: checked, locked,
    its resume point resolved; :class:`~cmp_hf.runs.RunDir`). Without it, the trainer claims ``args.output_dir``
    itself when :meth:`train` starts and holds it until the trainer is gone.
    """

    # compute_loss returns a per-batch mean: Trainer must divide it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: str | CLIPModel | PromptTunedCLIP,
        args: CMPConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: CLIPProcessor | None = None,
        class_names: list[str] | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        calibration_dataset: Dataset | None = None,
        run_dir: RunDir | None = None,
    ) -> None:
        if args is None:
            args = CMPConfig(output_dir="cmp-output")
        if not isinstance(args, CMPConfig):
            raise TypeError(f"args must be a CMPConfig (it carries the CMP and prompt options), got {type(args)}.")
        if args.push_to_hub:
            require_token(args.hub_token)
        self._claimed = run_dir is not None  # by the caller; if not, train() claims the output directory
        self._run_dir = run_dir if self._claimed else RunDir(args.output_dir)
        if not self._claimed and args.should_save:  # Trainer creates output_dir: a file there, a read-only or full
            self._run_dir.check_is_writable()  # disk fail now, named
        datasets = named_datasets(train_dataset, eval_dataset)
        for name, dataset in datasets:
            check_columns(dataset, name, args.image_column, args.label_column, needs_images=data_collator is None)
        if class_names is None and isinstance(train_dataset, Dataset):
            class_names = class_names_from_features(train_dataset, args.label_column)
        prompt_config = None
        if class_names is not None:  # the names checked (by PromptConfig) before anything is loaded, and only there
            prompt_config = args.prompt_config(class_names)
            for name, dataset in datasets:
                check_labels(dataset, name, args.label_column, len(class_names))
        check_training_set(train_dataset, args.label_column)
        loss_options = args.loss_options()
        if isinstance(model, PromptTunedCLIP) and model.learner.name != args.prompt_learner:  # CMPConfig checked
            model.learner.check_loss_options(loss_options)  # the losses with its own learner, not this one
        set_seed(args.seed)  # the random context init draws from torch's generator
        model, processing_class = prompt_model(model, prompt_config, processing_class)
        if not self._claimed:  # a claimed run_dir resolved its resume point
            self._run_dir.resume_from(args.resume_from_checkpoint)
        self._run_dir.check_checkpoint_is_this_run(args, asdict(model.prompt_config))  # before features are encoded
        if args.temperature_scaling and calibration_dataset is None:
            raise ValueError(
                "temperature_scaling fits T on held-out labelled images after training: pass calibration_dataset= "
                "(e.g. the validation half of cmp_hf.data.few_shot_sets; a recipe uses its few-shot validation split: "
                "set shots), or turn temperature_scaling off."
            )
        self._train_images = train_dataset  # the un-augmented training images (the shift-aware temperature's)
        self._calibration_images = calibration_dataset
        self.input_pipeline = InputPipeline(args)  # a user's collator gets the datasets as they are
        if data_collator is None:
            self.input_pipeline = InputPipeline.default(model, processing_class.image_processor, args, datasets)
            data_collator = self.input_pipeline.collator
            train_dataset, eval_dataset = self.input_pipeline.prepare(train_dataset, eval_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or CalibrationMetrics(args.calibration_bins),
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._components = {"train": LossComponents(), "eval": LossComponents()}
        self._loss_options = loss_options
        self._hand_crafted: dict[tuple[str, ...], torch.Tensor] = {}  # KgCoOp's anchors, per list of class names
        for callback in model.learner.training_callbacks(args):  # the learner's own steps (ProDA's sampling, ...)
            self.add_callback(callback)
        self.eval_reports: dict[str, EvalReport] = {}  # the last evaluation of each eval set, saved with the model
        self._report_name: str | None = None  # the eval set being evaluated, while evaluate() runs
        if EvalFiguresCallback.wanted(args.report_to):  # reliability diagrams on TensorBoard / trackio
            self.add_callback(EvalFiguresCallback(self.eval_reports, self.callback_handler.callbacks))
        self.dataset_name: str | None = None  # shown in the model card; set through create_model_card

    def _model_inputs(self, dataset: Any) -> Any:
        """A dataset to evaluate or predict on, as the collator takes it (:class:`~cmp_hf.data.pipeline.InputPipeline`
        reads cached features in batches)."""
        return self.input_pipeline.for_reading(dataset)

    # ---- training -----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As Trainer's, and: ``resume_from_checkpoint`` defaults to the run directory's resume point
        (``args.resume_from_checkpoint``, a recipe's option), ``True`` takes the last *complete* checkpoint of
        ``output_dir``, and a missing path, a checkpoint cut off mid-save or one saved by another run (other prompt,
        seed, loss or optimizer) is an error before any training (:class:`~cmp_hf.runs.RunDir`). So is an
        ``output_dir`` holding a finished run (unless ``args.overwrite_output_dir``) or in use by another process:
        unless the trainer was handed a claimed ``run_dir``, the main process locks it from here until this trainer
        is deleted."""
        if resume_from_checkpoint is not None:
            self._run_dir.resume_from(resume_from_checkpoint)
            self._run_dir.check_checkpoint_is_this_run(self.args, asdict(self.model.prompt_config))
        if not self._claimed:  # checked again on every train(); locked once, until this trainer is gone
            locked = self._run_dir.locked
            self._run_dir.acquire(self.args.overwrite_output_dir, is_main_process=self.is_world_process_zero())
            if self._run_dir.locked and not locked:
                weakref.finalize(self, self._run_dir.release)
        checkpoint = self._run_dir.checkpoint
        output = super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )
        if self.args.posthoc_requested:
            self.fit_posthoc_calibration()
        return output

    def end_training(self) -> None:
        """End a multi-process run before the interpreter does: destroy its process group now. (Nothing to do on one
        process.) Call it last: the trainer cannot train after it.

        accelerate's ``end_training`` drops torch.distributed's references to the group, but the DDP-wrapped model
        holds it too, so gloo's worker threads would live on until interpreter shutdown, where one finishing the
        clean-up of a collective needs the GIL and aborts the process ("terminate called without an active
        exception", exit -6) after the run has finished and saved. The order matters: the wrapper goes first, while
        torch.distributed still holds the group (its reducer's reference is dropped with the GIL held: were it the
        last, the group's destructor would wait on a worker that waits for the GIL); then destroying the group drops
        the last reference through torch's binding, which releases the GIL while the workers are joined."""
        self.model_wrapped = self.model
        self.accelerator.free_memory()  # its references to the wrapped model, and a garbage collection
        self.accelerator.end_training()

    # ---- loss and logging ---------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs)
        rows = len(labels) if model.training else self._rows_of_the_eval_set(len(labels))
        if 0 < rows < len(labels):  # the loss of the set's own rows (the padding's outputs still go to the gather)
            own_inputs = {key: value[:rows] for key, value in model_inputs.items()}
            loss, terms = self._objective(model, own_inputs, outputs.first_rows(rows), labels[:rows])
        else:
            loss, terms = self._objective(model, model_inputs, outputs, labels)
        if model.training:
            self._stop_at_non_finite_loss(loss, terms, inputs)
        if rows:
            self._components["train" if model.training else "eval"].add(terms, rows)
        return (loss, {"logits": outputs.logits.float()}) if return_outputs else loss

    def _objective(
        self, model: torch.nn.Module, model_inputs: dict[str, torch.Tensor], outputs, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective (cross-entropy, CMP, the baselines, the learner's own terms) of a batch."""
        prompt_model = self.accelerator.unwrap_model(model)
        hand_crafted = self._hand_crafted_text_features(model) if self._loss_options.kgcoop_weight else None
        variance = None  # a learner with Gaussian class features (ProDA) trains on a bound that needs it
        if outputs.text_spread is not None:
            variance = margin_variance(outputs.image_features, outputs.text_spread, labels)
        learner_terms = prompt_model.learner.regularization(
            prompt_model.clip, prompt_model.context, model_inputs, outputs, self.args
        )
        return training_objective(
            outputs.logits.float(), labels, self._loss_options, outputs.text_features, hand_crafted, variance,
            learner_terms,
        )  # fmt: skip

    def _rows_of_the_eval_set(self, batch_size: int) -> int:
        """How many rows of this process's eval batch belong to the eval set. At the end of a multi-process
        evaluation accelerate pads the last round of batches with rows from the set's start, so that every process
        has a full batch, and ``gather_for_metrics`` drops them from the gathered outputs (the first ``remainder``
        rows of the round are the set's); the eval loss and its logged terms must not count them either."""
        state = self.accelerator.gradient_state
        if self.args.world_size == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return batch_size
        return min(max(state.remainder - self.accelerator.process_index * batch_size, 0), batch_size)

    def _stop_at_non_finite_loss(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> None:
        """Raise at the first non-finite training loss, naming the step and the term, before it reaches the prompt.

        Trainer would step on it and log it as 0 (``logging_nan_inf_filter``), leaving a NaN prompt that is then
        saved as if it were trained. Every process takes the same decision (one small reduction) so that none is
        left waiting in a collective.
        """
        non_finite = (~torch.isfinite(loss.detach())).float()
        if self.args.world_size > 1:
            non_finite = self.accelerator.reduce(non_finite, reduction="max")
        if not non_finite.item():
            return
        bad = {name: value.item() for name, value in terms.items() if not torch.isfinite(value).all()}
        images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_features")}
        bad_rows = sorted({row for value in images.values() for row in _non_finite_rows(value)})
        cause = (
            f"the batch's images hold NaN or infinite values (rows {bad_rows} of the batch): check the dataset's "
            f"{self.args.image_column} column"
            if bad_rows
            else "the inputs are finite: lower learning_rate or check the loss options (cmp_lambda, focal_gamma, ...)"
        )
        raise FloatingPointError(
            f"Non-finite training loss at step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}): "
            f"{', '.join(f'{name} = {value}' for name, value in bad.items()) or f'loss = {loss.item()}'}; {cause}. "
            "Training stopped before this step changed the prompt; nothing was saved from it."
        )

    def _hand_crafted_text_features(self, model: torch.nn.Module) -> torch.Tensor:
        """KgCoOp's anchor for the classes the model classifies now (they change under ``evaluate(class_names=)``)."""
        model = self.accelerator.unwrap_model(model)
        key = tuple(model.class_names)
        if key not in self._hand_crafted:
            self._hand_crafted[key] = model.hand_crafted_text_features(self.args.kgcoop_template or ZERO_SHOT_TEMPLATE)
        return self._hand_crafted[key]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the loss terms accumulated since the last one
            logs.update(self._components["train"].pop(self._sum_over_processes))
        super().log(logs, start_time)

    def _sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum")

    # ---- schedule -----------------------------------------------------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not self.args.coop_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        steps_per_epoch = self._update_steps_per_epoch()
        self.lr_scheduler = coop_scheduler(
            optimizer if optimizer is not None else self.optimizer,
            steps_per_epoch=steps_per_epoch,
            num_epochs=math.ceil(num_training_steps / steps_per_epoch),
            warmup_epochs=self.args.coop_warmup_epochs,
            warmup_lr=self.args.coop_warmup_lr,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _update_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, as Trainer counts them (per-process batches, then accumulation)."""
        if not isinstance(self.train_dataset, Dataset):
            raise ValueError("coop_schedule needs a train dataset with a length (epochs are undefined otherwise).")
        global_batch = self._train_batch_size * self.args.world_size
        batches = len(self.train_dataset) / global_batch
        batches = math.floor(batches) if self.args.dataloader_drop_last else math.ceil(batches)
        return max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)

    # ---- save and load: the prompt is a peft adapter plus prompt_config.json -------------------------------------

    def save_locally(self, output_dir: str | None = None) -> None:
        """Write the prompt (adapter + prompt_config.json + calibration), the training arguments as JSON, the last
        evaluation of each eval set (metrics + reliability diagram) and the model card: a directory the Hub repo
        mirrors. ``save_model`` without its push (Trainer's also pushes when ``push_to_hub`` is set): a recipe saves
        between steps this way and pushes once, last, so a Hub failure cannot stop a run half-way. Only the
        process that saves (``args.should_save``) writes.

        Every file is replaced whole, so no reader sees a half-written one. The prompt is saved into
        ``output_dir`` itself, not with the other files: its calibration then sees the directory and removes a
        calibration file of an earlier save that the current prompt no longer has.
        """
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        card = str(self._model_card())  # rendered before anything is written
        with staged_directory(output_dir) as staging:  # moved in only once the prompt below is saved
            write_text(os.path.join(staging, TRAINING_ARGS_NAME), self.args.to_json_string())
            for report in self.eval_reports.values():
                report.save(staging)
            write_text(os.path.join(staging, MODEL_CARD_NAME), card)
            self.model.save_pretrained(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer's save_model and checkpoints come here; the prompt's own state is all there is to save
        self.save_locally(output_dir)

    # ---- Hub: the card (cmp_hf.card) and pushes (cmp_hf.hub) -----------------------------------------------------

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Write ``README.md`` (cmp_hf's card: metrics table, diagrams, model-index with ECE) to ``output_dir``.

        ``dataset_name`` is remembered for later saves; other Trainer card arguments are not used.
        """
        if dataset_name is not None:
            self.dataset_name = dataset_name
        if self.is_world_process_zero():
            write_text(os.path.join(self.args.output_dir, MODEL_CARD_NAME), str(self._model_card(model_name)))

    def _model_card(self, model_name: str | None = None) -> ModelCard:
        info = CardInfo.of_training(
            self.model, self.args, self.train_dataset, model_name=model_name, dataset_name=self.dataset_name,
            repo_id=self.hub_model_id,  # the repo loads the prompt once pushed; the output directory until then
        )  # fmt: skip
        return model_card(list(self.eval_reports.values()), info)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        with hub_errors("creating the Hub repo", retry=None):
            super().init_hf_repo(token=token, private=private)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> str | None:
        """Save (prompt, eval reports, card: ``kwargs`` go to :meth:`create_model_card`) and upload what
        :func:`cmp_hf.hub.push_output_dir` uploads, the prompt's files and its eval reports, never checkpoints
        (Trainer's push uploads the whole directory). Errors say what to do. Returns the commit URL on the main
        process; a push always blocks."""
        token = token if token is not None else self.args.hub_token
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_locally()
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        self._finish_current_push()
        return push_output_dir(
            self.args.output_dir, self.hub_model_id, token=token, private=private,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message or "End of training",
        )  # fmt: skip

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intermediate pushes (``hub_strategy`` other than "end"): :func:`cmp_hf.hub.push_checkpoint`."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            push_checkpoint(checkpoint_folder, self.hub_model_id, self.state.global_step,
                            token=self.args.hub_token, revision=self.args.hub_revision)  # fmt: skip

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_prompt_weights(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_prompt_weights(self.model, self.state.best_model_checkpoint)

    def _set_signature_columns_if_needed(self) -> None:
        # The collator, not the model's forward, decides which columns matter.
        if self._signature_columns is None:
            columns = [
                self.args.image_column,
                self.args.label_column,
                FEATURES_COLUMN,
                ROW_COLUMN,
                "pixel_values",
                "labels",
            ]
            self._signature_columns = columns


def _non_finite_rows(values: torch.Tensor) -> list[int]:
    if not torch.is_tensor(values) or not values.is_floating_point():
        return []
    return torch.nonzero(~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)).flatten().tolist()

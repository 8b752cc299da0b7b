"""Evaluation figures on trackers: read back from TensorBoard's event files with tensorboard's own reader."""

import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.dashboards import EvalFiguresCallback


def read_events(output_dir: Path) -> EventAccumulator:
    (run,) = {path.parent for path in output_dir.rglob("events.out.tfevents.*")}  # one run directory
    events = EventAccumulator(str(run), size_guidance={IMAGES: 0, SCALARS: 0})
    events.Reload()
    return events


def make_trainer(tmp_path, tiny_clip_dir, train_set, test_set, report_to) -> CMPTrainer:
    config = CMPConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=report_to, save_strategy="no", disable_tqdm=True,
        max_steps=2, per_device_train_batch_size=8, n_ctx=4, eval_strategy="steps", eval_steps=1, logging_steps=1,
    )  # fmt: skip
    return CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set, eval_dataset={"test": test_set})


def test_tensorboard_gets_the_reliability_diagram_beside_the_ece(tmp_path, tiny_clip_dir, train_set, test_set):
    trainer = make_trainer(tmp_path, tiny_clip_dir, train_set, test_set, report_to="tensorboard")
    assert any(isinstance(callback, EvalFiguresCallback) for callback in trainer.callback_handler.callbacks)
    trainer.train()  # evaluates after steps 1 and 2
    metrics = trainer.evaluate()  # after training: Trainer reopens its writer for the scalars, the images follow

    events = read_events(tmp_path / "out")
    assert {"eval/test_reliability", "eval/test_risk_coverage"} <= set(events.Tags()["images"])
    diagrams = events.Images("eval/test_reliability")
    assert [d.step for d in diagrams] == [1, 2, 2]
    with Image.open(io.BytesIO(diagrams[-1].encoded_image_string)) as png:
        drawn = np.asarray(png.convert("RGB"))
    assert np.array_equal(drawn, trainer.eval_reports["test"].image("reliability"))  # the last evaluation's
    ece = events.Scalars("eval/test_ece_pct")
    assert len(ece) == 3 and ece[-1].value == pytest.approx(metrics["eval_test_ece_pct"], rel=1e-6)


def test_no_tracker_no_callback_and_trackio_gets_images(tmp_path, tiny_clip_dir, train_set, test_set, monkeypatch):
    quiet = make_trainer(tmp_path, tiny_clip_dir, train_set, test_set, report_to="none")
    assert not any(isinstance(callback, EvalFiguresCallback) for callback in quiet.callback_handler.callbacks)

    # trackio itself needs pillow < 13 here, so the tracker is replaced by a recorder of what the callback sends it
    logged = []
    fake = types.SimpleNamespace(
        Image=lambda value, caption=None: ("image", value.shape, value.dtype, caption), log=logged.append
    )
    monkeypatch.setitem(sys.modules, "trackio", fake)
    from transformers.integrations import TrackioCallback

    callbacks = [TrackioCallback.__new__(TrackioCallback)]  # only its type matters to EvalFiguresCallback
    callback = EvalFiguresCallback(quiet.eval_reports, callbacks)
    quiet.evaluate()
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=0)
    callback.on_evaluate(quiet.args, state, None)
    callback.on_evaluate(quiet.args, state, None)  # nothing new evaluated: nothing sent again
    assert len(logged) == 1 and set(logged[0]) == {"eval/test_reliability", "eval/test_risk_coverage"}
    kind, shape, dtype, caption = logged[0]["eval/test_reliability"]
    assert kind == "image" and len(shape) == 3 and shape[2] == 3 and dtype == np.uint8

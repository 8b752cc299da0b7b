"""The training recipe end to end, launched the way users launch it: ``accelerate launch recipes/train.py <yaml>``."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, quickstart_config
from suite_copies import local_copy
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from transformers import CLIPProcessor, HfArgumentParser

from cmp_hf import CMPConfig, PromptTunedCLIP, calibration_metrics
from cmp_hf.data import DOMAIN_SHIFTS, SUITE, CLIPImageCollator, load_image_dataset
from cmp_hf.runs import RunDir
from cmp_hf.scripts import train
from cmp_hf.scripts.config_file import parse_config_and_overrides
from recipes import bench_speed


def write_config(path: Path, testbed: Path, **overrides) -> Path:
    return quickstart_config(testbed, path, **{"output_dir": str(path / "unused"), **overrides})


@pytest.mark.slow
def test_accelerate_launch_trains_evaluates_and_saves(tmp_path, testbed):
    config = write_config(tmp_path, testbed, num_train_epochs=2, shots=4, report_to="tensorboard")
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/single_process.yaml"), str(ROOT / "recipes/train.py"), str(config),
        "--output_dir", str(output_dir), "--seed", "3",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}  # the few-shot validation set (min(k, 4) per class) is evaluated too
    assert {"accuracy_pct", "ace_pct", "mce_pct", "mce_weighted_pct", "brier", "cmp", "ce"} <= set(metrics["test"])
    model = PromptTunedCLIP.from_pretrained(output_dir).eval()
    assert model.class_names == ["blue", "green", "red", "yellow"]  # imagefolder sorts class folders
    # metrics.json holds what the saved prompt gives on the test split
    test = load_image_dataset(str(testbed / "data"))["test"]
    batch = CLIPImageCollator(CLIPProcessor.from_pretrained(testbed / "clip").image_processor)(list(test))
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits.numpy()
    expected = calibration_metrics(batch["labels"].numpy(), logits=logits)
    assert metrics["test"]["ece_pct"] == pytest.approx(100 * expected["ece"], abs=1e-3)
    assert metrics["test"]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert "{'loss'" not in result.stdout and "| test | trained |" in result.stdout  # a table, not log dicts
    assert str(output_dir) in result.stdout.splitlines()[-1]  # ends saying where the files are
    # report_to: tensorboard from the YAML: the scalars and the reliability diagrams are in the run's event files
    events = EventAccumulator(str(next(output_dir.rglob("events.out.tfevents.*")).parent), {IMAGES: 0})
    events.Reload()
    assert {"eval/test_reliability", "eval/val_reliability"} <= set(events.Tags()["images"])
    assert "eval/test_ece_pct" in events.Tags()["scalars"]


@pytest.mark.parametrize("quiet", [True, False])
def test_a_bad_config_under_accelerate_launch_prints_its_error_once(tmp_path, testbed, quiet):
    """``accelerate launch --quiet`` (the README's commands) shows the recipe's error once; without it, accelerate
    adds its own CalledProcessError traceback for the same failure."""
    config = write_config(tmp_path, testbed, cmp_lambda=float("nan"))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *(["--quiet"] if quiet else []), "--config_file",
        str(ROOT / "recipes/accelerate/single_process.yaml"), str(ROOT / "recipes/train.py"), str(config),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert result.returncode != 0
    assert result.stderr.count("ValueError: Loss weights must be finite numbers") == 1
    assert ("CalledProcessError" in result.stderr) is not quiet


def test_command_line_overrides_the_yaml(tmp_path, testbed):
    config = write_config(tmp_path, testbed, seed=1, cmp_form="ratio")
    script, cmp = parse_config_and_overrides(train.make_parser(), [str(config), "--seed", "5", "--shots", "2"])
    assert cmp.seed == 5 and script.shots == 2 and cmp.cmp_form == "ratio" and isinstance(cmp, CMPConfig)
    assert script.eval_splits == ["test"]


def test_unknown_yaml_keys_are_rejected(tmp_path, testbed):
    config = write_config(tmp_path, testbed, cmp_lamda=0.5)
    with pytest.raises(ValueError, match=r"Unknown keys in the config file: \['cmp_lamda'\]"):
        parse_config_and_overrides(train.make_parser(), [str(config)])


def test_missing_split_is_reported_before_training(tmp_path, testbed):
    script, cmp = parse_config_and_overrides(
        train.make_parser(), [str(write_config(tmp_path, testbed, eval_splits=["validation"]))]
    )
    with pytest.raises(ValueError, match=r"Splits \['validation'\] are not in .* \(it has \['train', 'test'\]\)"):
        train.main(script, cmp)


def test_shipped_configs_parse():
    parser = HfArgumentParser((train.ScriptArguments, CMPConfig))
    for path in (ROOT / "recipes/configs").glob("*.yaml"):
        script, cmp = parse_config_and_overrides(parser, [str(path)])
        assert script.model_name_or_path and script.dataset_name, path


def test_speed_benchmark_runs_and_the_formulations_agree(capsys):
    args = bench_speed.make_parser().parse_args([
        "--size", "tiny", "--classes", "4", "--n_ctx", "4", "--epoch_classes", "4", "--shots", "4",
        "--batch_size", "4", "--steps", "1", "--cocoop_classes", "4", "--text_chunk_classes", "2", "--device", "cpu",
    ])  # fmt: skip
    figures = bench_speed.main(args)
    assert figures["loss_gap"] <= 1e-5 and figures["train_loss_gap"] <= 1e-5 and figures["prompt_gap"] <= 1e-5
    printed = capsys.readouterr().out
    assert "| seconds per epoch |" in printed and "speed-up per epoch: (a)/(c)" in printed
    assert "| 4 | 4 | 1 |" in printed and "CoCoOp step" in printed and "Activation checkpointing" in printed


def test_speed_benchmark_skips_the_sections_set_to_zero_classes(capsys):
    args = bench_speed.make_parser().parse_args([
        "--size", "tiny", "--classes", "4", "--n_ctx", "4", "--steps", "1", "--epoch_classes", "0",
        "--cocoop_classes", "0", "--device", "cpu",
    ])  # fmt: skip
    figures = bench_speed.main(args)
    printed = capsys.readouterr().out
    assert "cocoop_time" not in figures and "loss_gap" not in figures and set(figures["steps"]) == {(4, 4)}
    assert "CoCoOp step" not in printed and "Epoch:" not in printed and "Activation checkpointing" in printed


def test_suite_configs_parse_and_name_registry_entries():
    parser = train.make_parser()
    configs = sorted((ROOT / "recipes/configs/suite").glob("*.yaml"))
    assert len(configs) == 15  # base + 13 datasets + ImageNet -> shifts
    for path in configs:
        if path.name == "base.yaml":
            continue
        script, cmp = parse_config_and_overrides(parser, [str(path), "--seed", "3", "--use_cpu", "true"])
        assert script.benchmark in SUITE, path
        assert all(key in SUITE for key in script.eval_benchmarks or []), path
        assert cmp.seed == 3 and cmp.coop_schedule and script.shots in (8, 16)
        assert script.fewshot_sampling == "coop"  # CoOp's few-shot images for each seed
    dg, _ = parse_config_and_overrides(
        parser, [str(ROOT / "recipes/configs/suite/imagenet_to_shifts.yaml"), "--use_cpu", "true"]
    )
    assert dg.eval_benchmarks == list(DOMAIN_SHIFTS) and dg.shots == 16


def test_suite_run_with_base_to_novel_and_transfer(tmp_path, tiny_clip_dir):
    local_copy("dtd", tmp_path / "dtd", rows_per_class=6)  # 3 classes: base = 2, novel = 1
    local_copy("cifar10", tmp_path / "cifar10")
    argv = [
        "--model_name_or_path", tiny_clip_dir, "--benchmark", "dtd", "--data_dir", str(tmp_path / "dtd"),
        "--base_to_novel", "true", "--shots", "2", "--eval_benchmarks", "cifar10",
        "--eval_data_dirs", str(tmp_path / "cifar10"), "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--report_to", "none",
        "--save_strategy", "no", "--n_ctx", "4", "--image_feature_cache_dir", str(tmp_path / "cache"),
        "--kgcoop_weight", "1.0",
    ]  # fmt: skip
    metrics = train.main(*parse_config_and_overrides(train.make_parser(), argv))
    assert set(metrics) == {"val", "test_base", "test_novel", "cifar10"}
    run = RunDir(tmp_path / "run").read_record()  # what the report reads: a finished run
    assert run.setting == "base_to_novel_2shot" and run.dataset == "dtd" and run.metrics == metrics
    assert run.coop_test == {"dtd": False, "cifar10": False}  # Hub test splits, not CoOp's
    assert run.kgcoop_weight == 1.0 and run.temperature == 1.0  # from the config; the fitted (here: none) temperature
    assert "dtd (the Hub repo's test split, not CoOp's)" in (tmp_path / "run" / "README.md").read_text()
    saved_args = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert saved_args["kgcoop_template"] == SUITE["dtd"].template == "{} texture."  # KgCoOp's anchor, as released
    assert metrics["test_novel"]["accuracy_pct"] == 100.0  # one novel class: a 1-way task
    for name in metrics:
        assert (tmp_path / "run" / "eval" / name / "reliability.png").exists()
    split = json.loads((tmp_path / "run" / "fewshot_split.json").read_text())
    assert len(split["train"]) == 2 * 2 and len(split["val"]) == 2 * 2  # base classes only


def test_cocoop_cost_benchmark_runs():
    from recipes import bench_cocoop_cost

    options = dict(size="tiny", classes=3, batches=[1, 2], repeats=1, proda_num_prompts=4, proda_prompts_per_step=2)
    learners = ["coop", "cocoop", "maple", "proda", "proda_sampled"]
    costs = bench_cocoop_cost.main(argparse.Namespace(**options, learners=learners))
    # what the benchmark claims to time: CoOp and MaPLe encode the C prompts once, CoCoOp B x C, ProDA K x C, and
    # ProDA as released k x C plus the K class-free prompts of its diversity term
    assert {key: cost.prompts for key, cost in costs.items()} == {
        ("coop", 1): 3, ("coop", 2): 3, ("cocoop", 1): 3, ("cocoop", 2): 6, ("maple", 1): 3, ("maple", 2): 3,
        ("proda", 1): 12, ("proda", 2): 12, ("proda_sampled", 1): 2 * 3 + 4,
        ("proda_sampled", 2): 2 * 3 + 4}  # fmt: skip


def test_serving_benchmark_runs_and_the_three_ways_agree(capsys):
    from recipes import bench_serving

    args = bench_serving.make_parser().parse_args([
        "--size", "tiny", "--classes", "4", "12", "--images", "6", "--batch_size", "4", "--latency_repeats", "1",
        "--throughput_repeats", "1",
    ])  # fmt: skip
    results = bench_serving.main(args)
    assert set(results) == {4, 12} and all(set(ways) == {"before", "now", "floor"} for ways in results.values())
    assert max(row["max_diff"] for ways in results.values() for row in ways.values()) < 1e-4
    printed = capsys.readouterr().out
    assert "| 12 | now / floor |" in printed and "| 4 | before / now |" in printed


def test_evaluation_benchmark_runs():
    from recipes import bench_evaluation

    args = bench_evaluation.make_parser().parse_args(["--samples", "300", "--classes", "20", "--repeats", "1"])
    results = bench_evaluation.main(args)
    assert set(results) == {"maths", "trainer.evaluate", "metrics stage", "loss terms", "evaluate module"}
    assert all(seconds > 0 for seconds in results.values())


def test_cmp_hf_command_is_installed_and_explains_each_option():
    command = str(Path(sys.executable).with_name("cmp-hf"))
    usage = subprocess.run([command], capture_output=True, text=True)
    assert usage.returncode != 0 and "cmp-hf train <config.yaml>" in usage.stderr
    result = subprocess.run([command, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    assert "--cmp_lambda CMP_LAMBDA" in text and "0 gives plain CoOp; 1.0 is the authors' ICML-25 code default" in text
    assert "--prompt_learner PROMPT_LEARNER" in text and "--base_to_novel" in text


def test_summary_ends_with_the_base_novel_harmonic_mean():
    row = {"ece_pct": 5.0, "nll": 0.5}
    metrics = {
        "test_base": {**row, "accuracy_pct": 80.0}, "test_novel": {**row, "accuracy_pct": 60.0},
        "zeroshot_test_base": {**row, "accuracy_pct": 70.0}, "zeroshot_test_novel": {**row, "accuracy_pct": 70.0},
    }  # fmt: skip
    lines = train.summary(metrics).splitlines()
    assert lines[-2] == f"| test base/novel HM | trained | {2 * 80 * 60 / 140:.2f} | | |"  # 68.57, not the mean 70
    assert lines[-1] == "| test base/novel HM | zero-shot | 70.00 | | |"
    assert not any("HM" in line for line in train.summary({"test": metrics["test_base"]}).splitlines())

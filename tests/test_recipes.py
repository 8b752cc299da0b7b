"""The training recipe end to end, launched the way users launch it: ``accelerate launch recipes/train.py <yaml>``."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_speed
import pytest
import train
from conftest import ROOT, quickstart_config
from transformers import HfArgumentParser

from cmp_hf import CMPConfig, PromptTunedCLIP
from cmp_hf.cli import parse_config_and_overrides


def write_config(path: Path, testbed: Path, **overrides) -> Path:
    return quickstart_config(testbed, path, **{"output_dir": str(path / "unused"), **overrides})


@pytest.mark.slow
def test_accelerate_launch_trains_evaluates_and_saves(tmp_path, testbed):
    config = write_config(tmp_path, testbed, num_train_epochs=2, shots=4)
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/single_process.yaml"), str(ROOT / "recipes/train.py"), str(config),
        "--output_dir", str(output_dir), "--seed", "3",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics) == {"test"}
    assert 0 <= metrics["test"]["ece_pct"] <= 100 and metrics["test"]["nll"] > 0
    assert {"accuracy_pct", "ace_pct", "mce_pct", "mce_weighted_pct", "brier", "cmp", "ce"} <= set(metrics["test"])
    model = PromptTunedCLIP.from_pretrained(output_dir)
    assert model.class_names == ["blue", "green", "red", "yellow"]  # imagefolder sorts class folders


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


def test_speed_benchmark_runs_and_both_formulations_agree(capsys):
    options = dict(size="tiny", classes=4, shots=4, batch_size=4, seed=1, device="cpu", bf16=False)
    figures = bench_speed.main(argparse.Namespace(**options))
    assert figures["loss_gap"] <= 1e-5 and figures["train_loss_gap"] <= 1e-5
    printed = capsys.readouterr().out
    assert "| seconds per epoch |" in printed and "speed-up per epoch (a)/(b)" in printed

"""The offline testbed: its data sources and pools, and the shipped micro-CLIP (a model that learnt something)."""

import argparse
import gzip
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from transformers import CLIPModel, CLIPProcessor

from cmp_hf import CMPConfig, CMPTrainer, calibration_metrics
from cmp_hf.data import base_novel_classes, few_shot_sets, subset_classes
from cmp_hf.testing.testbed import (
    DIGIT_NAMES,
    _load_npy_pickle,
    mnist_arrays,
    pool_indices,
    shape_arrays,
    shift,
)
from cmp_hf.testing.testbed import testbed_task as load_task  # (a "test*" name would be collected by pytest)

MICRO_CLIP = str(ROOT / "model_cards" / "micro-clip")


@pytest.fixture(scope="session")
def mnist_task():
    return load_task("mnist")


def test_pools_are_disjoint_fixed_and_complete():
    pools = {name: pool_indices(5000, name) for name in ("pretrain", "fewshot", "test")}
    assert sum(len(p) for p in pools.values()) == 5000
    assert not set(pools["pretrain"]) & set(pools["test"]) and not set(pools["fewshot"]) & set(pools["test"])
    assert np.array_equal(pools["test"], pool_indices(5000, "test"))


def test_only_numpy_is_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        _load_npy_pickle(str(path))
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        pickle.dump(np.arange(6).reshape(2, 3), f)
    assert _load_npy_pickle(str(good)).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_shapes_and_shifts_are_deterministic():
    a, sa, ca = shape_arrays(20, seed=3)
    b, sb, cb = shape_arrays(20, seed=3)
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and np.array_equal(ca, cb) and a.shape == (20, 28, 28, 3)
    images = mnist_arrays()[0][:4]
    assert np.array_equal(shift(images, "invert"), 255 - images)
    assert not np.array_equal(shift(images, "blur"), images)
    assert np.array_equal(shift(images, "noise", seed=1), shift(images, "noise", seed=1))


def test_task_splits(mnist_task):
    assert set(mnist_task) == {"train", "test", "test_noise", "test_invert", "test_blur", "test_sklearn_digits"}
    shapes = load_task("shapes")
    assert len(shapes["train"].features["label"].names) == 24 and len(shapes["test"]) == 600
    noisy = load_task("animals_noisy")
    assert "test_sklearn_digits" not in noisy and len(noisy["test"]) == 2000
    assert mnist_task["train"].features["label"].names == DIGIT_NAMES
    assert len(mnist_task["test"]) == len(mnist_task["test_blur"]) == 1000


def test_shipped_tokenizer_is_clip_bpe():
    tokenizer = CLIPProcessor.from_pretrained(MICRO_CLIP).tokenizer
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a three.")["input_ids"])
    assert tokens == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "three</w>",
        ".</w>",
        "<|endoftext|>",
    ]
    assert len(tokenizer) < 1000 and tokenizer.eos_token_id == len(tokenizer) - 1


def test_micro_clip_classifies_zero_shot(mnist_task):
    model = CLIPModel.from_pretrained(MICRO_CLIP).eval()
    processor = CLIPProcessor.from_pretrained(MICRO_CLIP)
    test = mnist_task["test"]
    with torch.no_grad():
        text = processor.tokenizer([f"a photo of a {n}." for n in DIGIT_NAMES], padding=True, return_tensors="pt")
        pixels = processor.image_processor(images=[im.convert("RGB") for im in test["image"]], return_tensors="pt")
        logits = model(**text, pixel_values=pixels["pixel_values"]).logits_per_image.numpy()
    accuracy = calibration_metrics(np.asarray(test["label"]), logits=logits)["accuracy"]
    assert accuracy > 0.5  # chance is 0.1: the shipped model has learnt digits


def test_cmp_lowers_the_training_penalty(tmp_path, mnist_task):
    base, _ = base_novel_classes(10)
    pool = subset_classes(mnist_task["train"], base)
    train, _ = few_shot_sets(pool, shots=8, seed=1)
    config = CMPConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        num_train_epochs=30, per_device_train_batch_size=40, logging_steps=1, ctx_init="a photo of a",
        cmp_lambda=1.0, learning_rate=0.01, image_feature_cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer = CMPTrainer(model=MICRO_CLIP, args=config, train_dataset=train)
    trainer.train()
    cmp = [entry["cmp"] for entry in trainer.state.log_history if "cmp" in entry]
    assert np.mean(cmp[-5:]) < 0.5 * np.mean(cmp[:5])


def test_quickstart_config_runs_on_a_small_budget(tmp_path):
    subprocess.run([sys.executable, "recipes/make_testbed_data.py", str(tmp_path / "testbed")], check=True, cwd=ROOT)
    command = [
        sys.executable, "recipes/train.py", "recipes/configs/quickstart.yaml", "--num_train_epochs", "3",
        "--dataset_name", str(tmp_path / "testbed" / "animals_noisy"), "--output_dir", str(tmp_path / "out"),
        "--image_feature_cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| test_novel | zero-shot |" in result.stdout and "| test_blur_base | trained |" in result.stdout
    for name in ("test_base", "test_novel", "test_noise_base", "test_blur_novel"):
        assert (tmp_path / "out" / "eval" / name / "reliability.png").exists()


@pytest.mark.slow
def test_pretraining_recipe_is_deterministic(tmp_path):
    from recipes import pretrain_micro_clip

    def run(name):
        args = argparse.Namespace(
            output_dir=str(tmp_path / name), steps=2, batch_size=32, lr=1e-3, logit_scale=100.0, shapes=100, seed=0,
            cache_dir=None, bpe_from=str(MICRO_CLIP),  # the shipped tokenizer's merges: no package index needed
        )  # fmt: skip
        report = pretrain_micro_clip.main(args)
        return report, (tmp_path / name / "model.safetensors").read_bytes()

    first, weights = run("a")
    second, again = run("b")
    assert weights == again and first["zero_shot_test"] == second["zero_shot_test"]
    loaded = CLIPModel.from_pretrained(tmp_path / "a")
    assert loaded.config.vision_config.patch_size == 4 and loaded.config.text_config.hidden_size == 96


def test_calibration_benchmark_runs_on_a_small_budget(tmp_path):
    from recipes import bench_calibration

    options = dict(model=MICRO_CLIP, tasks=["mnist"], noise=[30.0], partitions=["first_half", "interleaved"],
                   shots=[1], seeds=[1, 2], epoch_scale=0.1, out=str(tmp_path / "bench"),
                   methods=["CoOp-CE", "CMP log_ratio/all l=1", "MaPLe", "MaPLe + CMP l=1"])  # fmt: skip
    rows = bench_calibration.main(argparse.Namespace(**options))
    assert {r["eval_set"] for r in rows} == {"base", "novel", "shifted"}
    assert len(rows) == 5 * 2 * 3 * 2  # (zero-shot + 4 methods) x 2 seeds x 3 eval sets x 2 partitions
    markdown = (tmp_path / "bench.md").read_text()
    assert "paired difference against the baseline" in markdown
    assert "noise 30, first_half | noise 30, interleaved | average [min, max]" in markdown
    assert "### Summary, mnist, 1 shots" in markdown
    for method, against in [("CMP log_ratio/all l=1", "CoOp-CE"), ("MaPLe", "CoOp-CE"), ("MaPLe + CMP l=1", "MaPLe")]:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} | {against} |"))
        assert len(re.findall(r"[+-]\d+\.\d\d \[[^]]+\] \([012]/2\)", row)) == 5  # 5 summary cells, 2 partitions
    # the summary's paired difference is the mean over cells of (method - its baseline) per seed, from the rows
    paired = [np.mean([next(r["ece"] for r in rows if (r["method"], r["seed"], r["partition"], r["eval_set"]) == key)
                       for key in ((method, seed, partition, "novel") for seed in (1, 2))])
              for method in ("MaPLe + CMP l=1", "MaPLe") for partition in ("first_half", "interleaved")]  # fmt: skip
    expected = np.mean(paired[:2]) - np.mean(paired[2:])
    row = next(line for line in markdown.splitlines() if line.startswith("| MaPLe + CMP l=1 | MaPLe |"))
    assert row.split(" | ")[5].startswith(f"{expected:+.2f} [")  # novel ece column
    assert bench_calibration.report(bench_calibration.read_rows(str(tmp_path / "bench.csv")), None) == markdown
    for partition in ("first_half", "interleaved"):
        zero_shot_base = [r["accuracy"] for r in rows if (r["method"], r["eval_set"], r["partition"]) ==
                          ("zero-shot", "base", partition)]  # fmt: skip
        assert zero_shot_base[0] == zero_shot_base[1] > 60  # no training: the same for every seed, above chance (20)
    trained = {(r["seed"], r["partition"]): r["accuracy"] for r in rows if (r["method"], r["eval_set"]) ==
               ("CoOp-CE", "base")}  # fmt: skip
    assert len(set(trained.values())) > 1  # each seed and partition trained its own prompt


def test_benchmark_post_hoc_methods_share_a_prompt_exactly_and_get_verdicts(tmp_path):
    """A method that differs from an earlier one only after training (the preset after CoOp-CE) starts from that
    prompt: its numbers equal those of its own fresh training; the verdict lines recompute from the rows."""
    from recipes import bench_calibration as bench

    clip, processor = CLIPModel.from_pretrained(MICRO_CLIP).eval(), CLIPProcessor.from_pretrained(MICRO_CLIP)
    setting = bench.settings(argparse.Namespace(tasks=["animals"], noise=[30.0], partitions=["second_half"]))[0]
    train, val = few_shot_sets(setting.pool, 2, seed=1)
    preset, ce = bench.METHODS["Calibrated (preset)"], bench.METHODS["CoOp-CE"]
    trained = {}
    plain = bench.run(clip, processor, setting, train, val, ce, 1, 20, str(tmp_path), trained=trained)
    shared = bench.run(clip, processor, setting, train, val, preset, 1, 20, str(tmp_path), trained=trained)
    fresh = bench.run(clip, processor, setting, train, val, preset, 1, 20, str(tmp_path))
    assert len(trained) == 1 and shared == fresh and shared != plain
    rows = [dict(task="animals", noise=30.0, partition="second_half", method=method, shots=2, seed=1, eval_set=name,
                 **values) for method, result in (("CoOp-CE", plain), ("Calibrated (preset)", shared))
            for name, values in result.items()]  # fmt: skip
    line = next(line for line in bench.verdicts(rows) if line.startswith("- Calibrated (preset):"))
    for name in ("base", "novel", "shifted"):
        change = 100 * (shared[name]["ece"] - plain[name]["ece"]) / plain[name]["ece"]
        assert f"{name} {change:+.1f} %" in line
    worst = max(shared[name]["ece"] - plain[name]["ece"] for name in ("base", "novel", "shifted"))
    assert f"2 {'pass' if worst <= 0.5 else 'FAIL'} (worst cell {worst:+.2f}" in line


def test_readme_offline_notebook_snippet_runs(tmp_path):
    """The README's offline notebook block, run as written from a directory holding the testbed and the micro-CLIP,
    then its prompt loaded from another working directory (the base model is recorded as an absolute path)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"<!-- offline-notebook -->\n```python\n(.*?)```", readme, re.S).group(1)
    subprocess.run(
        [sys.executable, "recipes/make_testbed_data.py", str(tmp_path / "build/testbed")], check=True, cwd=ROOT
    )
    (tmp_path / "model_cards").symlink_to(ROOT / "model_cards")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval_test_ece_pct" in result.stdout
    probabilities = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    (tmp_path / "elsewhere").mkdir()
    load = "from cmp_hf import CalibratedCLIP; CalibratedCLIP.from_pretrained('../build/notebook-prompt')"
    loaded = subprocess.run(
        [sys.executable, "-c", load], cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]

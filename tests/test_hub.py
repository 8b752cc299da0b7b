"""Push and pull through a loopback Hub (tests/hub_server.py) with the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, so every Hub call runs in a subprocess whose environment
points at the loopback server; the trained model it is compared with stays in this process.
"""

import dataclasses
import hashlib
import io
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hub_env, quickstart_config, run
from hub_server import FakeHub, Repo
from huggingface_hub import ModelCard
from PIL import Image

from cmp_hf import CalibratedCLIP
from cmp_hf.card import CARD_TEMPLATE, CardInfo, model_card
from cmp_hf.constants import PROMPT_FILES
from cmp_hf.data.fewshot import examples_per_class
from cmp_hf.eval_report import EvalReport
from cmp_hf.hub import pushed_files
from cmp_hf.learners import LEARNERS

REPO = "tester/tiny-prompt"


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


def train_and_push(tmp_path: Path, testbed: Path, hub: FakeHub, **overrides) -> Path:
    output_dir = tmp_path / "run"
    config = quickstart_config(
        testbed, tmp_path, output_dir=str(output_dir), num_train_epochs=2, shots=4, push_to_hub=True,
        hub_model_id=REPO, **overrides,
    )  # fmt: skip
    result = run([sys.executable, "recipes/train.py", str(config)], hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 0, result.stderr[-5000:]
    assert not hub.unknown_routes, hub.unknown_routes
    return output_dir


def probe_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]


PULL = textwrap.dedent(
    """
    import sys
    import numpy as np
    from PIL import Image
    from peft import PeftModel
    from transformers import CLIPModel, pipeline
    from cmp_hf import CalibratedCLIP

    repo, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    model = CalibratedCLIP.from_pretrained(repo)
    base = model.model.prompt_config.base_model_name_or_path
    peft_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(base), repo)
    vectors = peft_model.prompt_encoder["default"].embedding.weight
    top = pipeline("calibrated-image-classification", model=repo, device="cpu")(images, top_k=1)  # the card's way
    np.savez(out, logits=model.logits(images).numpy(), proba=model.predict_proba(images),
             vectors=vectors.detach().numpy(), names=np.array(model.class_names),
             top_labels=np.array([result[0]["label"] for result in top]),
             top_scores=np.array([result[0]["score"] for result in top]))
    """
)


@pytest.mark.slow
def test_recipe_push_then_pull_gives_the_same_predictions(tmp_path, testbed, hub):
    output_dir = train_and_push(tmp_path, testbed, hub)
    files = hub.repos[REPO].files
    for name in ("adapter_model.safetensors", "adapter_config.json", "prompt_config.json", "README.md",
                 "eval/test/metrics.json", "eval/test/reliability.png", "training_args.json"):  # fmt: skip
        assert name in files, name
        assert files[name] == (output_dir / name).read_bytes(), name  # the repo mirrors the output directory
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl", ".pickle"))]

    card = ModelCard(files["README.md"].decode())
    metrics = json.loads(files["eval/test/metrics.json"])
    ece = [r for r in card.data.eval_results if r.metric_type == "ece" and r.dataset_split == "test"]
    assert len(ece) == 1 and ece[0].metric_value == pytest.approx(metrics["ece_pct"], abs=1e-6)
    assert card.data.base_model == str(testbed / "clip") and card.data.library_name == "peft"
    assert "eval/test/reliability.png" in card.text and "CalibratedCLIP.from_pretrained" in card.text
    with Image.open(io.BytesIO(files["eval/test/reliability.png"])) as png:
        assert png.format == "PNG" and png.size[0] >= 400

    result = run([sys.executable, "-c", PULL, REPO, str(tmp_path / "pulled.npz")], hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 0, result.stderr[-5000:]
    pulled = np.load(tmp_path / "pulled.npz")
    local = CalibratedCLIP.from_pretrained(output_dir)
    images = probe_images()
    np.testing.assert_array_equal(pulled["logits"], local.logits(images).numpy())
    np.testing.assert_allclose(pulled["proba"].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(pulled["vectors"], local.model.context.detach().numpy())
    assert list(pulled["names"]) == local.class_names
    proba = local.predict_proba(images)  # the pipeline, from the repo id, gives the calibrated top class
    assert list(pulled["top_labels"]) == [local.class_names[i] for i in proba.argmax(axis=1)]
    np.testing.assert_allclose(pulled["top_scores"], proba.max(axis=1), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("learner", sorted(name for name, learner in LEARNERS.items() if learner.weights_name))
def test_learners_with_own_weights_train_push_and_pull_through_the_recipe(tmp_path, testbed, hub, learner):
    options = {"n_ctx": 2, "per_device_train_batch_size": 4, **LEARNERS[learner].test_options}
    output_dir = train_and_push(tmp_path, testbed, hub, prompt_learner=learner, cmp_lambda=1.0, **options)
    files, weights = hub.repos[REPO].files, LEARNERS[learner].weights_name
    assert files[weights] == (output_dir / weights).read_bytes()  # the learner's own tensors travel with the adapter
    assert f"(`{learner}`)" in files["README.md"].decode()  # the card says which learner it is
    result = run([sys.executable, "-c", PULL, REPO, str(tmp_path / "pulled.npz")], hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 0, result.stderr[-5000:]
    local = CalibratedCLIP.from_pretrained(output_dir)
    assert local.model.learner.name == learner
    np.testing.assert_array_equal(np.load(tmp_path / "pulled.npz")["logits"], local.logits(probe_images()).numpy())


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def saved_run(tmp_path, tiny_clip_dir, train_set, test_set):
    from cmp_hf import CMPConfig, CMPTrainer

    config = CMPConfig(
        output_dir=str(tmp_path / "saved"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        max_steps=2, per_device_train_batch_size=8, n_ctx=4,
    )  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set, eval_dataset={"test": test_set})
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    return tmp_path / "saved"


def push(saved: Path, tmp_path: Path, endpoint: str, token: str | None = "hf_test_token"):
    """Through the installed ``cmp-hf`` command, as the error messages tell users to."""
    cmp_hf_command = Path(sys.executable).with_name("cmp-hf")
    return run([str(cmp_hf_command), "push", str(saved), REPO], hub_env(tmp_path, endpoint, token))


def test_refused_push_leaves_files_intact_and_can_be_rerun(tmp_path, hub, saved_run):
    before = tree_digest(saved_run)
    hub.refuse_commits = True
    refused = push(saved_run, tmp_path, hub.endpoint)
    assert refused.returncode != 0
    assert "the Hub refused the request (HTTP 403" in refused.stderr
    assert f"run `cmp-hf push {saved_run} {REPO}` to push again" in refused.stderr
    assert tree_digest(saved_run) == before and not hub.repos[REPO].files
    hub.refuse_commits = False
    again = push(saved_run, tmp_path, hub.endpoint)
    assert again.returncode == 0, again.stderr[-3000:]
    assert hub.repos[REPO].files["adapter_model.safetensors"] == (saved_run / "adapter_model.safetensors").read_bytes()
    assert tree_digest(saved_run) == before


def test_push_without_token_says_how_to_log_in(tmp_path, hub, saved_run):
    result = push(saved_run, tmp_path, hub.endpoint, token=None)
    assert result.returncode != 0 and "no valid token" in result.stderr and "HF_TOKEN" in result.stderr


def test_push_without_network_says_so(tmp_path, saved_run):
    result = push(saved_run, tmp_path, "http://127.0.0.1:9")  # nothing listens on the discard port
    assert result.returncode != 0 and "could not reach the Hub at http://127.0.0.1:9" in result.stderr


def test_push_of_an_incomplete_directory_is_refused_before_the_network(tmp_path, saved_run):
    (saved_run / "prompt_config.json").unlink()
    result = push(saved_run, tmp_path, "http://127.0.0.1:9")
    assert result.returncode != 0 and "lacks ['prompt_config.json']" in result.stderr


@pytest.mark.slow
def test_hub_strategy_every_save_pushes_during_training(tmp_path, testbed, hub):
    output_dir = train_and_push(tmp_path, testbed, hub, save_strategy="steps", save_steps=1,
                                hub_strategy="every_save")  # fmt: skip
    summaries = [summary for _, summary in hub.repos[REPO].commits]
    assert any(summary.startswith("Training in progress") for summary in summaries), summaries
    assert summaries[-1] == "End of training"
    # every push, intermediate ones included, uploads the prompt and its reports only: no optimizer or RNG state,
    # no lock, no pickled training arguments
    files = hub.repos[REPO].files
    assert "prompt_config.json" in files and set(pushed_files(output_dir)) <= set(files)
    assert not [name for name in files if name.endswith((".pt", ".pth", ".bin", ".lock")) or "checkpoint" in name]


def test_pulling_a_repo_without_prompt_config_names_the_file(tmp_path, hub, saved_run):
    broken = Repo()
    broken.files = {"adapter_config.json": (saved_run / "adapter_config.json").read_bytes()}
    broken.commits.append(("1" * 40, "only the adapter config"))
    hub.repos["tester/broken"] = broken
    script = "from cmp_hf import CalibratedCLIP; CalibratedCLIP.from_pretrained('tester/broken')"
    result = run([sys.executable, "-c", script], hub_env(tmp_path, hub.endpoint))
    assert result.returncode != 0 and "has no prompt_config.json" in result.stderr


def test_model_card_is_written_with_the_prompt(saved_run):
    card = ModelCard.load(saved_run / "README.md")
    assert card.data.library_name == "peft" and "calibration" in card.data.tags
    ece = next(r for r in card.data.eval_results if r.metric_type == "ece")
    assert ece.dataset_split == "test" and ece.metric_args == {"n_bins": 10}
    metrics = json.loads((saved_run / "eval/test/metrics.json").read_text())
    assert ece.metric_value == pytest.approx(metrics["ece_pct"], abs=1e-6)
    assert metrics["num_samples"] == 16 and metrics["n_bins"] == 10 and len(metrics["reliability"]["count"]) == 10
    for metric_type, key in (("classwise_ece", "classwise_ece_pct"), ("aurc", "aurc")):  # what peers report
        result = next(r for r in card.data.eval_results if r.metric_type == metric_type)
        assert result.metric_value == pytest.approx(metrics[key], abs=1e-6) and 0 <= metrics["aurc"] <= 1
    assert "Classwise ECE (%)" in {r.metric_name for r in card.data.eval_results}
    assert "eval/test/risk_coverage.png" in card.text and "| AURC |" in card.text
    assert "## License" in card.text and "Apache License 2.0 (`Apache-2.0`" in card.text  # pyproject's license
    with Image.open(saved_run / "eval/test/risk_coverage.png") as png:
        assert png.format == "PNG"
    assert torch.is_tensor(CalibratedCLIP.from_pretrained(saved_run).logits(probe_images()))


CARD_INFO = dict(
    model_name="tiny-prompt", repo_id=REPO, base_model="openai/clip-vit-base-patch16", learner="CoCoOp",
    learner_name="cocoop", dataset_name="patches", num_classes=4, class_list="red, green, blue, yellow", n_ctx=4,
    num_vectors=4, ctx_init="N(0, 0.02)", class_token_position="end", class_specific_context=False,
    template="a photo of a {}.", train_size=None, shots="-", cmp_lambda=0.5, cmp_form="log_ratio",
    cmp_competitors="all", optimizer="sgd", learning_rate=0.002, batch_size=32, schedule="cosine schedule",
    length="10 epochs", seed=3, n_bins=15, posthoc="none", preset=None, preset_options="", preset_evidence="",
)  # fmt: skip


def test_card_info_has_one_field_per_template_variable():
    from importlib import resources

    import jinja2
    from jinja2 import meta

    template = resources.files("cmp_hf").joinpath("templates", CARD_TEMPLATE).read_text(encoding="utf-8")
    variables = meta.find_undeclared_variables(jinja2.Environment().parse(template))
    rendered = {"card_data", "reports", "base_model_url"}  # model_card's own: the metadata, the reports, the link
    assert variables - rendered == {field.name for field in dataclasses.fields(CardInfo)}
    with pytest.raises(TypeError, match="learner_name"):  # a field left unset is an error, not a blank on the card
        CardInfo(**{key: value for key, value in CARD_INFO.items() if key != "learner_name"})


def test_card_rendered_from_card_info_names_the_prompt_and_its_metrics():
    rng = np.random.default_rng(0)
    report = EvalReport.from_logits("test", rng.normal(size=(40, 4)).astype(np.float32), rng.integers(0, 4, 40))
    card = model_card([report], CardInfo(**CARD_INFO))
    assert card.data.library_name == "peft" and "calibration" in card.data.tags
    assert card.data.model_name == "tiny-prompt" and card.data.base_model == "openai/clip-vit-base-patch16"
    ece = next(r for r in card.data.eval_results if r.metric_type == "ece")
    assert ece.dataset_split == "test" and ece.dataset_name == "patches" and ece.metric_args == {"n_bins": 10}
    assert ece.metric_value == pytest.approx(report.metrics["ece_pct"], abs=1e-6)
    assert "Classwise ECE (%)" in {r.metric_name for r in card.data.eval_results}
    text = card.text
    assert f"{report.folder}/risk_coverage.png" in text and "| AURC |" in text
    assert f'CalibratedCLIP.from_pretrained("{REPO}")' in text and "CoCoOp (`cocoop`)" in text
    assert "[`openai/clip-vit-base-patch16`](https://huggingface.co/openai/clip-vit-base-patch16)" in text
    assert "| training examples | - (- per class) |" in text  # a stream: its size is unknown
    assert "| loss | cross-entropy + 0.5 x CMP (`log_ratio` form, `all` competitors) |" in text
    assert "ECE and MCE use 15 equal-width bins" in text and "preset" not in text
    sized = model_card([], dataclasses.replace(CardInfo(**CARD_INFO), train_size=64, shots="16"))
    assert "| training examples | 64 (16 per class) |" in sized.text and not sized.data.eval_results


def test_shots_on_the_card_say_how_balanced_the_training_set_is():
    from datasets import Dataset

    assert examples_per_class(Dataset.from_dict({"label": [0, 1, 2, 0, 1, 2]})) == "2"
    assert examples_per_class(Dataset.from_dict({"label": [0, 0, 0, 1, 2, 2]})) == "1-3"
    assert examples_per_class(None) == "-" and examples_per_class(Dataset.from_dict({"label": []})) == "-"


@pytest.mark.slow
def test_a_refused_recipe_push_comes_last_and_the_printed_command_pushes_everything(tmp_path, testbed, hub):
    output_dir = tmp_path / "run"
    config = quickstart_config(
        testbed, tmp_path, output_dir=str(output_dir), num_train_epochs=2, shots=4, push_to_hub=True,
        hub_model_id=REPO, save_strategy="epoch",
    )  # fmt: skip
    hub.refuse_commits = True
    refused = run([sys.executable, "recipes/train.py", str(config)], hub_env(tmp_path, hub.endpoint))
    assert refused.returncode != 0 and "the Hub refused the request (HTTP 403" in refused.stderr
    assert "The run itself finished" in refused.stderr
    # training, evaluation and every local file completed before the push
    assert set(json.loads((output_dir / "metrics.json").read_text())) == {"val", "test"}
    for name in ("eval/val/metrics.json", "eval/test/reliability.png", "README.md", "run.json", *PROMPT_FILES):
        assert (output_dir / name).is_file(), name
    assert "ECE (%)" in (output_dir / "README.md").read_text()  # the card carries the metrics
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not hub.repos[REPO].files and not (output_dir / ".cmp_hf.lock").exists()

    hub.refuse_commits = False
    command = f"cmp-hf push {output_dir} {REPO}"
    assert f"run `{command}` to push again" in refused.stderr
    again = run([str(Path(sys.executable).with_name("cmp-hf")), *command.split()[1:]], hub_env(tmp_path, hub.endpoint))
    assert again.returncode == 0, again.stderr[-3000:]
    files = hub.repos[REPO].files
    assert sorted(files) == sorted(pushed_files(output_dir))  # in full: the prompt, its reports and metrics, the card
    assert {"metrics.json", "eval/val/metrics.json", "eval/test/risk_coverage.png", "README.md"} <= set(files)
    assert all(files[name] == (output_dir / name).read_bytes() for name in files if name != "README.md")
    assert files["README.md"].decode() == (output_dir / "README.md").read_text().replace(str(output_dir), REPO)
    assert not [name for name in files if "checkpoint" in name or name.endswith((".pt", ".pth", ".bin"))]
    assert f"Checkpoints stay local (not pushed): 2 checkpoint-* directories in {output_dir}" in again.stdout


def test_pushed_files_leave_out_checkpoints_logs_and_staging(tmp_path):
    for name in ("adapter_model.safetensors", "prompt_config.json", "README.md", "eval/metrics.json",
                 "eval/test/reliability.png", "checkpoint-5/adapter_model.safetensors", "checkpoint-5/optimizer.pt",
                 "checkpoint-5/trainer_state.json", "runs/x/events.out.tfevents.1", "runs/x/meta.json",
                 "training_args.bin", ".cmp_hf.lock", ".cmp_hf-staging-abc/prompt_config.json"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    top = ["README.md", "adapter_model.safetensors", "prompt_config.json"]
    assert pushed_files(tmp_path) == [*top, "eval/metrics.json", "eval/test/reliability.png"]


def test_pushed_card_loads_from_the_repo_id(tmp_path, hub, saved_run):
    local = (saved_run / "README.md").read_text()
    assert f'CalibratedCLIP.from_pretrained("{saved_run}")' in local  # saved: the line that works here
    result = push(saved_run, tmp_path, hub.endpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    card = hub.repos[REPO].files["README.md"].decode()
    assert f'CalibratedCLIP.from_pretrained("{REPO}")' in card and str(saved_run) not in card.split("## Use")[1]
    assert f'pipeline("calibrated-image-classification", model="{REPO}")' in card  # tried in the push-pull test
    assert (saved_run / "README.md").read_text() == local  # the local directory is only read

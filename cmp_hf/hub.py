"""The Hub side of a trained prompt: its model card, pushing an output directory, and fetching a repo.

A pushed repo holds exactly what ``CMPTrainer.save_model`` writes: the peft adapter (safetensors), the JSON that
rebuilds the prompt, one ``eval/<set>/`` folder per eval set (metrics JSON, reliability diagram, risk-coverage
curve) and the card, plus a recipe's ``metrics.json`` and ``run.json``. Checkpoints (``checkpoint-*``, with
optimizer and RNG state), tracker logs and anything else in the directory stay local.
Fetching takes JSON and safetensors only: nothing is ever unpickled from a repo.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_token,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, LocalTokenNotFoundError
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .constants import EVAL_DIR, MODEL_CARD_NAME, PROMPT_FILES
from .eval_report import EvalReport

CARD_TEMPLATE = "prompt_card.md"
PUSHED_SUFFIXES = (".safetensors", ".json", ".md")  # top-level files a push uploads, with everything under eval/
PULL_PATTERNS = ["*.safetensors", "*.json"]
# model-index entries: metric type -> (key in the eval report's metrics, name shown on the Hub)
CARD_METRICS = {
    "accuracy": ("accuracy_pct", "Accuracy (%)"),
    "ece": ("ece_pct", "ECE (%)"),
    "ace": ("ace_pct", "ACE (%)"),
    "mce": ("mce_pct", "MCE (%)"),
    "classwise_ece": ("classwise_ece_pct", "Classwise ECE (%)"),
    "nll": ("nll", "NLL"),
    "brier": ("brier", "Brier"),
    "aurc": ("aurc", "AURC"),
}


def preset_evidence(preset: str | None) -> str:
    """The benchmark summary shipped for a preset (``templates/<preset>_benchmark.md``, written by
    ``recipes/bench_calibration.py --card_summary``), shown on the card of every prompt trained with it."""
    if preset is None:
        return ""
    summary = resources.files("cmp_hf").joinpath("templates", f"{preset}_benchmark.md")
    return summary.read_text(encoding="utf-8").strip() if summary.is_file() else ""


class HubError(RuntimeError):
    """A Hub operation failed; the message says why and what to do. Local files are never touched by a push."""


def model_card(reports: list[EvalReport], **info: Any) -> ModelCard:
    """Render the card: ``info`` fills the template (see ``templates/prompt_card.md``); each report adds a row,
    two figures and ``EvalResult``s (accuracy, ECE, ACE, MCE, classwise ECE in percent; NLL, Brier, AURC) to the
    ``model-index``."""
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=info["dataset_name"],
            dataset_name=info["dataset_name"],
            dataset_split=report.name,
            metric_type=metric,
            metric_name=shown,
            metric_value=round(report.metrics[key], 6),
            metric_args={"n_bins": report.n_bins},
        )
        for report in reports
        for metric, (key, shown) in CARD_METRICS.items()
    ]
    card_data = ModelCardData(
        model_name=info["model_name"],
        base_model=info["base_model"] or None,
        library_name="peft",
        pipeline_tag="image-classification",
        tags=["cmp_hf", "clip", "coop", "prompt-tuning", "calibration", "cmp"],
        eval_results=eval_results or None,
    )
    template = resources.files("cmp_hf").joinpath("templates", CARD_TEMPLATE).read_text(encoding="utf-8")
    base = info["base_model"]
    url = f"https://huggingface.co/{base}" if base and not os.path.isdir(base) else None  # no link to a local dir
    return ModelCard.from_template(card_data, template_str=template, reports=reports, base_model_url=url, **info)


def require_token(token: str | None) -> None:
    """Fail before training when a push is planned and no token is at hand (it would only fail at the end)."""
    if not (token or get_token()):
        raise HubError(
            "push_to_hub is set but no Hugging Face token was found: log in with `hf auth login`, set HF_TOKEN or "
            "pass hub_token, then start again (or turn push_to_hub off and push later with `cmp-hf push`)."
        )


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload calibrated CoOp prompt",
) -> str:
    """Upload a saved prompt directory (:func:`pushed_files`: prompt, metrics, diagrams, card; no checkpoints) to
    ``repo_id`` in one commit; returns the commit URL.

    Checks that the directory is complete before any network call. On failure raises :class:`HubError` with what
    to do; the directory is only read, so re-running the push later uploads the same files.
    """
    output_dir = os.fspath(output_dir)
    missing = [name for name in (*PROMPT_FILES, MODEL_CARD_NAME) if not os.path.isfile(os.path.join(output_dir, name))]
    if missing:
        raise HubError(f"{output_dir} lacks {missing}: save the trained prompt there first (CMPTrainer.save_model).")
    api = HfApi()
    with hub_errors(f"pushing {output_dir} to {repo_id}", retry=f"cmp-hf push {output_dir} {repo_id}"):
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        card = card_for_repo(output_dir, repo_id)  # the card's usage lines must name the repo, not this directory
        operations = [
            CommitOperationAdd(
                path_in_repo=name,
                path_or_fileobj=card if name == MODEL_CARD_NAME and card else os.path.join(output_dir, name),
            )
            for name in pushed_files(output_dir)
        ]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, token=token, revision=revision)
    return commit.commit_url


RESULTS_CSV = "results.csv"  # the long-format table of a pushed results dataset (recipes/report.py --push_to_hub)
RESULTS_TABLES = "tables.md"


def push_results(
    csv_path: str | os.PathLike, markdown_path: str | os.PathLike, repo_id: str, token: str | None = None,
    private: bool | None = None,
) -> str:  # fmt: skip
    """Upload a grid's tables as a Hub dataset repo: the long CSV (``load_dataset(repo_id)`` reads it), the Markdown
    tables and a card that shows them; one commit, returns its URL. Raises :class:`HubError` with what to do."""
    markdown = Path(markdown_path).read_text(encoding="utf-8")
    data = DatasetCardData(
        tags=["cmp_hf", "clip", "prompt-tuning", "calibration", "cmp"],
        configs=[{"config_name": "default", "data_files": RESULTS_CSV}],
    )
    body = (
        "# Calibrated prompt tuning: results\n\nProduced by `recipes/report.py` of cmp_hf from a grid of runs "
        f"(`recipes/sweep.py`). `{RESULTS_CSV}`: one row per table cell (layout, setting, dataset, learner, method, "
        f"eval set, metric, mean, std, n); `{RESULTS_TABLES}`: the tables below.\n\n{markdown}\n"
    )
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    operations = [
        CommitOperationAdd(RESULTS_CSV, os.fspath(csv_path)),
        CommitOperationAdd(RESULTS_TABLES, os.fspath(markdown_path)),
        CommitOperationAdd("README.md", str(card).encode()),
    ]
    api = HfApi()
    with hub_errors(
        f"pushing the results to {repo_id}", retry=f"recipes/report.py <runs_dir> --push_to_hub {repo_id}"
    ):
        api.create_repo(repo_id, repo_type="dataset", token=token, private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id, operations, commit_message="Upload cmp_hf results", repo_type="dataset", token=token
        )
    return commit.commit_url


def pushed_files(output_dir: str | os.PathLike) -> list[str]:
    """What a push uploads, as paths relative to ``output_dir``: its top-level safetensors, JSON and Markdown files
    (the prompt, training_args.json, a recipe's metrics.json and run.json, the card) and every file under
    ``eval/``. Checkpoints (optimizer, RNG state: pickles), tracker logs, lock and staging files are left out."""
    output_dir = os.fspath(output_dir)
    names = [
        name
        for name in sorted(os.listdir(output_dir))
        if name.endswith(PUSHED_SUFFIXES)
        and not name.startswith(".")
        and os.path.isfile(os.path.join(output_dir, name))
    ]
    for root, _, files in sorted(os.walk(os.path.join(output_dir, EVAL_DIR))):
        names += [
            os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
            for name in sorted(files)
            if not name.startswith(".")
        ]
    return names


def checkpoints_note(output_dir: str | os.PathLike) -> str | None:
    """A line saying where the run's checkpoints are, which no push uploads; ``None`` when there are none."""
    found = sorted(path.name for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir())
    if not found:
        return None
    return (
        f"Checkpoints stay local (not pushed): {len(found)} {PREFIX_CHECKPOINT_DIR}-* directories in "
        f"{os.fspath(output_dir)} ({', '.join(found)}); resume from them with resume_from_checkpoint."
    )


def card_for_repo(output_dir: str, repo_id: str) -> bytes | None:
    """The saved card with the local directory it was saved in replaced by ``repo_id`` (``None`` if it names none),
    so that its ``from_pretrained(...)`` lines work for a reader of the repo."""
    card = Path(output_dir, MODEL_CARD_NAME).read_text(encoding="utf-8")
    local = f'"{os.path.abspath(output_dir)}"'
    return card.replace(local, f'"{repo_id}"').encode("utf-8") if local in card else None


def fetch_prompt(repo_or_dir: str | os.PathLike, revision: str | None = None, token: str | None = None) -> str:
    """A local directory holding the prompt: ``repo_or_dir`` itself, or a snapshot of JSON + safetensors files; an
    error says which it is not (no such directory, a file, not a Hub id, no network)."""
    if os.path.isdir(repo_or_dir):
        return os.fspath(repo_or_dir)
    if os.path.exists(repo_or_dir):
        raise NotADirectoryError(
            f"Prompt {os.fspath(repo_or_dir)!r} is a file, not a prompt directory; {_PROMPT_HINT}."
        )
    try:
        with hub_errors(f"downloading {repo_or_dir}", retry=None):
            return snapshot_download(str(repo_or_dir), revision=revision, token=token, allow_patterns=PULL_PATTERNS)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"Prompt {os.fspath(repo_or_dir)!r} not found: there is no such directory and it is not a valid Hub repo "
            f"id; {_PROMPT_HINT}."
        ) from error
    except LocalEntryNotFoundError as error:  # offline, or the Hub is unreachable, and no cached copy
        raise ConnectionError(
            f"Prompt {os.fspath(repo_or_dir)!r}: no such local directory, and no network to fetch it from the Hub "
            f"({constants.ENDPOINT} could not be reached, or HF_HUB_OFFLINE is set) nor a copy in the local Hugging "
            "Face cache. Check the path; for a Hub repo, connect and retry, or download it once where there is a "
            f"network (`hf download {os.fspath(repo_or_dir)}`)."
        ) from error


_PROMPT_HINT = "pass the directory save_pretrained (or CMPTrainer.save_model) wrote, or a Hub repo id (user/name)"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx; httpx2 from huggingface_hub 2)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        if importlib.util.find_spec(module) is not None:
            found.append(importlib.import_module(module).TransportError)
    return tuple(found)


@contextmanager
def hub_errors(action: str, retry: str | None) -> Iterator[None]:
    """Turn Hub client errors into a :class:`HubError` that says what happened and what to do."""
    try:
        yield
    except (LocalTokenNotFoundError, HfHubHTTPError, *_transport_errors()) as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, LocalTokenNotFoundError) or status == 401:
            advice = "no valid token: log in with `hf auth login` or set HF_TOKEN (pushing needs write access)"
        elif status is not None:
            server = str(getattr(error, "server_message", None) or error).splitlines()[0]
            advice = f"the Hub refused the request (HTTP {status}: {server})"
            if status == 403:
                advice += "; check that your token can write to this repo"
        else:
            advice = f"could not reach the Hub at {constants.ENDPOINT} ({error}); check the network and HF_ENDPOINT"
        message = f"Failed {action}: {advice}."
        if retry:
            message += f" Nothing local was changed; run `{retry}` to push again."
        raise HubError(message) from error


def repo_name(output_dir: str | os.PathLike, hub_model_id: str | None) -> str:
    """Trainer's rule: the Hub id given, else the output directory's name."""
    return hub_model_id or Path(output_dir).absolute().name

"""Prompt digests: what ``write_digests`` records, and ``verify_digests`` refusing altered tensors or manifests."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from cmp_hf.constants import PROMPT_DIGEST_NAME
from cmp_hf.integrity import SETTINGS_KEY, settings_sha256, verify_digests, write_digests

SETTINGS = {"prompt": {"class_names": ["a", "b"]}, "calibration": {"temperature": 1.0}}


def verify(directory) -> None:
    verify_digests(directory, ["w.safetensors"], SETTINGS, saved_with_digest=True)


@pytest.fixture
def saved(tmp_path):
    """A directory with one weights file and its digest manifest."""
    save_file({"ctx": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)},
              tmp_path / "w.safetensors")  # fmt: skip
    write_digests(tmp_path, ["w.safetensors"], SETTINGS)
    return tmp_path


def test_the_digest_covers_names_dtypes_shapes_and_bytes(saved):
    h = hashlib.sha256()  # by hand: the tensors in name order, each "name:dtype:shape\n" then its raw bytes
    h.update(b"b:torch.int64:(2,)\n" + (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
    h.update(b"ctx:torch.float32:(2, 3)\n" + torch.arange(6.0).numpy().tobytes())
    manifest = json.loads((saved / PROMPT_DIGEST_NAME).read_text())
    assert manifest == {"sha256": {"w.safetensors": h.hexdigest()}, SETTINGS_KEY: settings_sha256(SETTINGS)}
    verify(saved)
    save_file({"ctx": torch.arange(6.0).reshape(3, 2), "b": torch.tensor([1, 2])}, saved / "w.safetensors")
    with pytest.raises(ValueError, match="w.safetensors does not match the digest"):  # same bytes, new shape
        verify(saved)


@pytest.mark.parametrize(
    "manifest",
    ["{}", '{"sha-256": {"w.safetensors": "00"}}', '["w.safetensors"]', '{"sha256": ["w.safetensors"]}', "{not json"],
)
def test_a_manifest_without_its_digests_is_refused_not_read_as_empty(saved, manifest):
    (saved / PROMPT_DIGEST_NAME).write_text(manifest)
    with pytest.raises(ValueError, match=f"{PROMPT_DIGEST_NAME} is corrupt"):
        verify(saved)

"""CoOp's data folder from a Hub repo: ``data_root: hub:<repo id>`` downloads one dataset's folder and reads it with
the same loader as a local folder (``cmp_hf.data.coop_layout``).

Some public repos re-host CoOp's data folder, for example ``zhengli97/prompt_learning_dataset`` (a model repo):
its card lists the 11 base-to-novel datasets and the four ImageNet shifts and says the repo holds the datasets to be
used. Whether it includes every ``split_zhou_*.json`` and how it packs each folder could not be checked offline.
Such a repo may hold each dataset as its folder or as one archive of it; both are accepted: ``<folder>/...`` as
CoOp's layout, or ``<folder>.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz`` at the repo root, extracted once beside the
Hub cache; the loader then refuses a folder without its split file, naming it. ``hub:datasets/<repo id>`` names a
dataset repo. Only the requested dataset's files are downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .coop_layout import COOP_LAYOUTS

HUB_PREFIX = "hub:"
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz")


def resolve_coop_root(root: str, key: str, revision: str | None = None) -> str:
    """A local CoOp data folder as given; for ``hub:<repo id>``, a local root holding ``key``'s folder."""
    if not root.startswith(HUB_PREFIX) or key not in COOP_LAYOUTS:  # the loader names an unknown key
        return root
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HOME

    repo_id, repo_type = root.removeprefix(HUB_PREFIX), "model"
    if repo_id.startswith("datasets/"):
        repo_id, repo_type = repo_id.removeprefix("datasets/"), "dataset"
    folder = COOP_LAYOUTS[key].folder
    archives = [folder + extension for extension in ARCHIVE_EXTENSIONS]
    local = snapshot_download(
        repo_id, repo_type=repo_type, revision=revision, allow_patterns=[f"{folder}/*", *archives]
    )
    if os.path.isdir(os.path.join(local, folder)):
        return local
    archive = next((os.path.join(local, a) for a in archives if os.path.isfile(os.path.join(local, a))), None)
    if archive is None:
        raise FileNotFoundError(
            f"{key}: the Hub repo {repo_id} has no {folder}/ folder and no archive of it ({', '.join(archives)}) "
            f"at its root, so it does not carry CoOp's {key} in CoOp's layout: point data_root at a local CoOp data "
            "folder or at another repo."
        )
    commit = os.path.basename(os.path.normpath(local))  # snapshot_download's folder is snapshots/<commit>
    extracted = os.path.join(HF_HOME, "cmp_hf_coop", f"{repo_type}s--{repo_id.replace('/', '--')}", commit)
    if not os.path.isdir(os.path.join(extracted, folder)):
        _extract(archive, extracted, folder)
    return extracted


def _extract(archive: str, root: str, folder: str) -> None:
    """Unpack ``archive`` into ``root/folder`` atomically: into a temporary folder first, then one rename (an
    archive holding ``folder/`` at its top, or the folder's content directly)."""
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{folder}-") as scratch:
        unpacked = os.path.join(scratch, "unpacked")
        shutil.unpack_archive(archive, unpacked, **({} if archive.endswith(".zip") else {"filter": "data"}))
        top = os.path.join(unpacked, folder)
        target = os.path.join(root, folder)
        try:
            os.rename(top if os.path.isdir(top) else unpacked, target)
        except OSError:
            if not os.path.isdir(target):  # another process unpacked it meanwhile: keep theirs
                raise

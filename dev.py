#!/usr/bin/env python3
"""Set up the project's environment and run its jobs, with nothing but Python 3 and pip on the machine.

    python3 dev.py quickstart [--option value ...]   # calibrated CoOp, shipped micro-CLIP, offline data; prints
                                                     # base/novel/shifted; options go to the recipe
    python3 dev.py test [pytest args]   # ruff, then the test suite

Both create ``.venv`` on first use (``pip install -c constraints.txt -e .[dev,testbed,bench]`` with torch pinned to
2.13.0, then animal-mnist without its declared tensorflow dependency) and reinstall only when pyproject.toml or
constraints.txt change.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".cmp_hf-install-stamp"
QUICKSTART_OUTPUT = ROOT / "build" / "quickstart" / "prompt"  # recipes/configs/quickstart.yaml's output_dir


def run(*command: str | Path) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True)


def ensure_environment() -> None:
    digest = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints.txt")))
    if STAMP.exists() and STAMP.read_text() == digest.hexdigest():
        return
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    run(PYTHON, "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "-e", ".[dev,testbed,bench]")
    # animal-mnist declares tensorflow but only ships data: install it without dependencies
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "-c", "constraints.txt", "animal-mnist")
    STAMP.write_text(digest.hexdigest())


def quickstart(options: list[str]) -> None:
    """Build the testbed and run the quickstart recipe, ``options`` added to its command line. A quickstart run
    again replaces the last one's output (said first), unless ``options`` name another output_dir."""
    run(PYTHON, "recipes/make_testbed_data.py", "build/testbed")
    again = []
    if (QUICKSTART_OUTPUT / "metrics.json").exists() and not any(o.startswith("--output_dir") for o in options):
        print(
            f"{QUICKSTART_OUTPUT.relative_to(ROOT)} holds the last quickstart run: replacing it "
            "(--overwrite_output_dir true). To keep it, run with --output_dir <another directory>.",
            flush=True,
        )
        again = ["--overwrite_output_dir", "true"]
    run(
        BIN / "accelerate", "launch", "--quiet", "--config_file", "recipes/accelerate/single_process.yaml",
        "recipes/train.py", "recipes/configs/quickstart.yaml", *again, *options,
    )  # fmt: skip


def test(pytest_args: list[str]) -> None:
    run(PYTHON, "-m", "ruff", "check", ".")
    run(PYTHON, "-m", "pytest", *pytest_args)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("quickstart", "test"):
        sys.exit(__doc__)
    ensure_environment()
    try:
        quickstart(sys.argv[2:]) if sys.argv[1] == "quickstart" else test(sys.argv[2:])
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)

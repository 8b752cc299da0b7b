"""Push a saved prompt directory (what ``cmp-hf train`` or CMPTrainer.save_model wrote) to the Hub, no retraining.

    cmp-hf push <output_dir> <user/repo> [--private] [--revision BRANCH]

Uploads the adapter (safetensors), prompt_config.json, the other top-level JSON (metrics.json, run.json, ...),
eval/<set>/{metrics.json,reliability.png,risk_coverage.png} and README.md; checkpoint-* directories stay local.
The token comes from `hf auth login` or HF_TOKEN. The directory is only read: after a failure, run it again.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..hub import checkpoints_note, push_output_dir


def run(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="cmp-hf push", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true", default=None)
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    url = push_output_dir(args.output_dir, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.output_dir} to {url}")
    note = checkpoints_note(args.output_dir)
    if note:
        print(note)
    return url


"""The ``cmp-hf`` command (installed with the package), as trl ships ``trl sft``:

    cmp-hf train <config.yaml> [--option value ...]   # train, evaluate, save (and push) a prompt
    cmp-hf push <output_dir> <user/repo>               # push a saved prompt directory to the Hub

``cmp-hf train`` runs in the current process; for several GPUs use ``accelerate launch -m cmp_hf.scripts.train
<config.yaml>`` (or, from a clone, ``accelerate launch recipes/train.py <config.yaml>``: the same code).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .atomic import OutputWriteError
from .hub import HubError

COMMANDS = ("train", "push")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.exit(__doc__)
    if argv[0] not in COMMANDS:
        sys.exit(f"cmp-hf: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}.\n{__doc__}")
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from .scripts.train import run

            run(rest)
        else:
            from .scripts.push import run

            print(f"pushed to {run(rest)}")
    except (HubError, OutputWriteError) as error:  # they say what happened and what to do: no traceback needed
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

"""Push a saved prompt directory to the Hub without retraining: ``cmp-hf push`` as a script.

    python recipes/push.py <output_dir> <user/repo> [--private] [--revision BRANCH]
"""

import sys

from cmp_hf.cli import main

if __name__ == "__main__":
    main(["push", *sys.argv[1:]])

"""Train a prompt with CMP, evaluate its calibration, save (and push) it: ``cmp_hf.scripts.train`` as a script.

    accelerate launch --quiet recipes/train.py recipes/configs/quickstart.yaml [--seed 2 --output_dir ...]
    accelerate launch --quiet --config_file recipes/accelerate/multi_gpu.yaml --num_processes 4 \
        recipes/train.py my.yaml

The installed package runs the same code as ``cmp-hf train <config.yaml>``; ``--help`` lists every option.
"""

import sys

from cmp_hf.scripts.train import run

if __name__ == "__main__":
    run(sys.argv[1:])

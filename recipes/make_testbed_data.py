"""Write the offline testbed tasks (cmp_hf.data.testbed) as save_to_disk DatasetDicts, for recipes/train.py.

    python recipes/make_testbed_data.py build/testbed [--tasks animals_noisy mnist]

Each task directory holds `train` (the few-shot pool), `test`, and shifted test sets (`test_noise`, `test_invert`,
`test_blur`, and `test_sklearn_digits` for the MNIST tasks), all 10 classes; `base_to_novel: true` in a recipe
splits them.
"""

from __future__ import annotations

import argparse
import os

from cmp_hf.testing.testbed import TASKS, testbed_task


def main(directory: str, tasks: list[str]) -> None:
    for task in tasks:
        path = os.path.join(directory, task)
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            print(f"{path} exists")
            continue
        testbed_task(task).save_to_disk(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--tasks", nargs="+", default=["animals_noisy"], choices=sorted(TASKS))
    args = parser.parse_args()
    main(args.directory, args.tasks)

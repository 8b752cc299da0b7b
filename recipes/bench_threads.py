"""Training speed of the quickstart against the number of CPU threads torch uses (``OMP_NUM_THREADS``).

    python recipes/bench_threads.py                          # OMP_NUM_THREADS unset, 1 and 2; 3 rounds, interleaved
    python recipes/bench_threads.py --threads unset 1 4 --rounds 5 --epochs 50

Each measurement is a fresh process (torch reads ``OMP_NUM_THREADS`` once, at import) that trains the quickstart's
prompt (recipes/configs/quickstart.yaml: micro-CLIP, 16 shots of 5 base classes, batch 32, cached image features)
for ``--epochs`` epochs with evaluation off, and reports Trainer's ``train_steps_per_second``. The settings are
interleaved round by round, so a neighbour's load spreads over all of them; the table gives every round, so the
spread is visible. Needs the testbed data: ``python recipes/make_testbed_data.py build/testbed``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIG = "recipes/configs/quickstart.yaml"


def train_once(epochs: int) -> dict[str, float]:
    """Train the quickstart prompt in this process; its steps/s and torch's thread count."""
    import torch

    from cmp_hf import CMPTrainer
    from cmp_hf.scripts.config_file import parse_config_and_overrides
    from cmp_hf.scripts.train import load_run_data, make_parser

    with tempfile.TemporaryDirectory() as out:
        overrides = ["--output_dir", out, "--num_train_epochs", str(epochs), "--zero_shot_baseline", "false"]
        script_args, config = parse_config_and_overrides(make_parser(), [CONFIG, *overrides])
        data = load_run_data(script_args, config)
        trainer = CMPTrainer(script_args.model_name_or_path, config, train_dataset=data.train)
        result = trainer.train()
    return {"steps_per_s": result.metrics["train_steps_per_second"], "torch_threads": torch.get_num_threads()}


def measure(threads: str, epochs: int) -> dict[str, float]:
    """One fresh process with OMP_NUM_THREADS = ``threads`` (``unset``: removed from the environment)."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if threads != "unset":
        env["OMP_NUM_THREADS"] = threads
    code = f"import json, recipes.bench_threads as b; print(json.dumps(b.train_once({epochs})))"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {threads: [] for threads in args.threads}
    print(f"quickstart training, {args.epochs} epochs, {os.cpu_count()} CPUs; steps/s per round")
    for round_ in range(args.rounds):
        for threads in args.threads:
            figures = measure(threads, args.epochs)
            results[threads].append(figures["steps_per_s"])
            print(
                f"round {round_ + 1}  OMP_NUM_THREADS={threads:<5}  torch threads {figures['torch_threads']}  "
                f"{figures['steps_per_s']:.1f} steps/s"
            )
    for threads, values in results.items():
        print(f"OMP_NUM_THREADS={threads:<5} min {min(values):.1f}  max {max(values):.1f} steps/s")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", default=["unset", "1", "2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    main(parser.parse_args())

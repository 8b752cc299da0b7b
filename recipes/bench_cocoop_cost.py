"""What CoCoOp's image-conditional prompts cost per training step, against CoOp, by batch size.

    python recipes/bench_cocoop_cost.py [--classes 10 --batches 1 4 32]

CoOp encodes the C class prompts once per step whatever the batch; CoCoOp encodes B x C prompts (one set per
image). On a randomly initialised text tower of ViT-B/16 sizes (no weights needed to time it), prints the median
seconds of a forward + backward step from cached image features for each learner and batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPModel

from cmp_hf import CoOpPromptConfig, PromptTunedCLIP
from cmp_hf.tiny import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import SIZES, random_clip_config  # noqa: E402


def main(args: argparse.Namespace) -> dict[tuple[str, int], float]:
    tokenizer = tiny_tokenizer()
    config = random_clip_config(args.size, tokenizer)
    torch.manual_seed(0)
    clip = CLIPModel(config)
    names = [f"class {i}" for i in range(args.classes)]
    seconds = {}
    for learner in ("coop", "cocoop"):
        model = PromptTunedCLIP.from_clip(
            clip, tokenizer, CoOpPromptConfig(class_names=names, n_ctx=4, learner=learner)
        )
        for batch in args.batches:
            features = torch.nn.functional.normalize(torch.randn(batch, config.projection_dim), dim=-1)
            timings = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(image_features=features).logits.sum().backward()
                timings.append(time.perf_counter() - start)
            seconds[learner, batch] = sorted(timings)[len(timings) // 2]
            print(f"{learner:6s} batch {batch:3d} x {args.classes} classes: {seconds[learner, batch]:.3f} s per step")
        model.remove_hook()
    return seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit-b16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 32])
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args())

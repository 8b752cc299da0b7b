"""What each prompt learner costs per training step, against CoOp, by batch size.

    python recipes/bench_cocoop_cost.py [--classes 10 --batches 1 4 32 --learners coop cocoop maple proda]

CoOp encodes the C class prompts once per step whatever the batch; CoCoOp encodes B x C prompts (one set per
image); ProDA K x C (K = --proda_num_prompts); "proda_sampled", ProDA's released step, k x C (k =
--proda_prompts_per_step of the K contexts) plus its diversity term's K class-free prompts; MaPLe C, but its image
features cannot be cached, so its step also runs the prompted image tower, forward and backward, on the batch's
images. On a randomly initialised CLIP of
ViT-B/16 sizes (no weights needed to time it), prints the median seconds of a forward + backward step for each
learner and batch size (from cached image features, or from 224 px images for MaPLe).
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch
from transformers import CLIPModel

from cmp_hf import PromptConfig, PromptTunedCLIP
from cmp_hf.testing.tiny import SIZES, random_clip_config, tiny_tokenizer

N_CTX = {"coop": 4, "cocoop": 4, "maple": 2, "proda": 4, "proda_sampled": 4}  # context lengths as released


class StepCost(NamedTuple):
    seconds: float  # median wall time of a forward + backward step
    prompts: int  # class prompts the text encoder ran in that step


def main(args: argparse.Namespace) -> dict[tuple[str, int], StepCost]:
    tokenizer = tiny_tokenizer()
    config = random_clip_config(args.size, tokenizer)
    torch.manual_seed(0)
    clip = CLIPModel(config)
    encoded: list[int] = []  # prompts per text-encoder call

    def count(module, args, kwargs, output) -> None:
        encoded.append(len(kwargs["input_ids"]))

    clip.text_model.register_forward_hook(count, with_kwargs=True)
    names = [f"class {i}" for i in range(args.classes)]
    costs = {}
    for learner in args.learners:
        sampled = learner == "proda_sampled"
        prompt = PromptConfig(class_names=names, n_ctx=N_CTX[learner], learner="proda" if sampled else learner,
                                  proda_num_prompts=args.proda_num_prompts)  # fmt: skip
        model = PromptTunedCLIP.from_clip(clip, tokenizer, prompt).train()
        for batch in args.batches:
            if model.learner.caches_image_features:
                inputs = {"image_features": torch.nn.functional.normalize(torch.randn(batch, config.projection_dim))}
            else:
                size = config.vision_config.image_size
                inputs = {"pixel_values": torch.randn(batch, 3, size, size)}
            timings = []
            for step in range(args.repeats):
                encoded.clear()
                if sampled:  # the step CMPTrainer takes with proda_prompts_per_step and proda_diversity_weight
                    model.learner.select_prompts(step, args.proda_prompts_per_step, seed=0)
                start = time.perf_counter()
                loss = model(**inputs).logits.sum()
                if sampled:
                    loss = loss + model.learner.prompt_diversity(model.clip, model.context)
                loss.backward()
                timings.append(time.perf_counter() - start)
            costs[learner, batch] = StepCost(sorted(timings)[len(timings) // 2], sum(encoded))
            print(f"{learner:6s} batch {batch:3d} x {args.classes} classes: {costs[learner, batch].seconds:.3f} s per "
                  f"step ({costs[learner, batch].prompts} prompts encoded)")  # fmt: skip
    return costs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit-b16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learners", nargs="+", default=["coop", "cocoop"], choices=sorted(N_CTX))
    parser.add_argument("--proda_num_prompts", type=int, default=32)
    parser.add_argument("--proda_prompts_per_step", type=int, default=4)
    main(parser.parse_args())

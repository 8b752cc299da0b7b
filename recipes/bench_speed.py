"""Speed of one CoOp epoch: the reference formulation against cmp_hf's default, side by side in one process.

    python recipes/bench_speed.py                       # 10 classes x 16 shots, ViT-B/16 sizes, CPU
    python recipes/bench_speed.py --classes 100 --shots 2
    python recipes/bench_speed.py --device cuda --bf16  # on a GPU

(a) reference: the image encoder runs on every batch and every prompt is padded to 77 tokens (CoOp, DAC and the
    paper's code); (b) cmp_hf's default: image features cached once, prompts cut to the longest real prompt.
Both are CMPTrainer runs on the same randomly initialised CLIP of ViT-B/16 sizes (no weights are needed to time
it), the same synthetic 224-px images and the same seed. Printed: seconds per epoch and their ratio, the one-off
cache build, the mean training loss of the epoch and the loss after it (they must agree within 1e-5: the two
formulations compute the same thing), the text encoder's share of a step (its forward + backward over all class
prompts, timed alone after the epoch, over the mean step time; timing noise can push it past 100 % when the step
is nothing but the text encoder), and peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import psutil
import torch
from datasets import ClassLabel, Dataset, Features, Image
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, set_seed

from cmp_hf import CMPConfig, CMPTrainer, PromptTunedCLIP
from cmp_hf.testing.tiny import SIZES, random_clip_config, tiny_tokenizer


def synthetic_images(classes: int, shots: int, size: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(classes * shots)]
    labels = [i % classes for i in range(classes * shots)]
    names = [f"class {i}" for i in range(classes)]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory above the level at entry: CUDA allocator on GPU, sampled resident set size on CPU (MiB)."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    process, stop, peak = psutil.Process(), threading.Event(), [0]
    start = process.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["mib"] = (max(peak[0], process.memory_info().rss) - start) / 2**20


def text_step_seconds(model: PromptTunedCLIP, repeats: int = 3) -> float:
    """Forward + backward of the text encoder for all class prompts (what a cached step still pays)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.text_features().sum().backward()
        timings.append(time.perf_counter() - start)
    model.context.grad = None
    return float(np.median(timings))


def run(args: argparse.Namespace, clip_dir: str, data: Dataset, reference: bool) -> dict[str, float]:
    processor = CLIPProcessor.from_pretrained(clip_dir)
    config = CMPConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=args.device == "cpu", bf16=args.bf16, report_to="none",
        save_strategy="no", disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, seed=args.seed, n_ctx=16,
        cache_image_features=not reference, image_feature_cache_dir=tempfile.mkdtemp(),
        image_feature_batch_size=args.batch_size,
    )  # fmt: skip
    set_seed(args.seed)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = PromptTunedCLIP.from_clip(
        clip, processor.tokenizer, config.prompt_config(data.features["label"].names, clip_dir),
        pad_prompts_to=77 if reference else None,
    )  # fmt: skip
    device = torch.device(args.device)
    with peak_memory(device) as memory:
        start = time.perf_counter()
        trainer = CMPTrainer(model=model, args=config, train_dataset=data, processing_class=processor)
        cache_seconds = time.perf_counter() - start
        output = trainer.train()
    epoch_seconds = output.metrics["train_runtime"]
    steps = trainer.state.global_step
    return {
        "epoch_s": epoch_seconds,
        "cache_s": cache_seconds if not reference else 0.0,
        "train_loss": output.training_loss,
        "context": trainer.model.context.detach().float().cpu().clone(),
        "text_share": text_step_seconds(trainer.model) / (epoch_seconds / steps),
        "peak_mib": memory["mib"],
        "prompt_tokens": trainer.model.learner.prompt_input_ids.shape[1],
        "model": trainer.model,
    }


def loss_after_epoch(model: PromptTunedCLIP, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(image_features=features).logits.float(), labels).item()


def main(args: argparse.Namespace) -> dict[str, float]:
    tokenizer = tiny_tokenizer()
    config = random_clip_config(args.size, tokenizer)
    size = config.vision_config.image_size
    data = synthetic_images(args.classes, args.shots, size, args.seed)
    clip_dir = tempfile.mkdtemp()
    set_seed(args.seed)
    CLIPModel(config).save_pretrained(clip_dir)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)

    print(f"{args.size} sizes, {args.classes} classes x {args.shots} shots, batch {args.batch_size}, "
          f"device {args.device}, bf16 {args.bf16}, torch threads {torch.get_num_threads()}")  # fmt: skip
    reference = run(args, clip_dir, data, reference=True)
    cached = run(args, clip_dir, data, reference=False)

    # Loss after the epoch, both trained prompts on the same exact image features.
    model = cached["model"]
    pixel_batches = [
        image_processor(images=[data[i]["image"] for i in range(s, min(s + 32, len(data)))], return_tensors="pt")
        for s in range(0, len(data), 32)
    ]
    device = next(model.parameters()).device
    features = torch.cat([model.image_features(b["pixel_values"].to(device)) for b in pixel_batches])
    labels = torch.tensor(data["label"], device=device)
    after = {name: loss_after_epoch(r["model"], features, labels) for name, r in (("a", reference), ("b", cached))}

    rows = [
        ("seconds per epoch", f"{reference['epoch_s']:.2f}", f"{cached['epoch_s']:.2f}"),
        ("one-off cache build (s)", "-", f"{cached['cache_s']:.2f}"),
        ("prompt length (tokens)", str(reference["prompt_tokens"]), str(cached["prompt_tokens"])),
        ("mean training loss of the epoch", f"{reference['train_loss']:.7f}", f"{cached['train_loss']:.7f}"),
        ("loss after the epoch", f"{after['a']:.7f}", f"{after['b']:.7f}"),
        ("text encoder fwd+bwd alone / mean step", f"{reference['text_share']:.0%}", f"{cached['text_share']:.0%}"),
        ("peak memory above start (MiB)", f"{reference['peak_mib']:.0f}", f"{cached['peak_mib']:.0f}"),
    ]  # fmt: skip
    print("\n| | (a) reference | (b) cmp_hf default |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    ratio = reference["epoch_s"] / cached["epoch_s"]
    print(f"\nspeed-up per epoch (a)/(b): {ratio:.1f}x")
    print(f"epoch + cache build, (a)/(b): {reference['epoch_s'] / (cached['epoch_s'] + cached['cache_s']):.2f}x")
    print(f"|loss after (a) - (b)| = {abs(after['a'] - after['b']):.2e}; "
          f"|mean training loss (a) - (b)| = {abs(reference['train_loss'] - cached['train_loss']):.2e}; "
          f"max |prompt (a) - (b)| = {(reference['context'] - cached['context']).abs().max().item():.2e}")  # fmt: skip
    return {
        "ratio": ratio,
        "loss_gap": abs(after["a"] - after["b"]),
        "train_loss_gap": abs(reference["train_loss"] - cached["train_loss"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit-b16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    main(parser.parse_args())

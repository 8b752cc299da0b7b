"""Speed of CoOp training: the reference formulation, cmp_hf's cached step before the shared-prefix encoder, and now.

    OMP_NUM_THREADS=2 python recipes/bench_speed.py                      # epochs + steps at 10, 100, 1000 classes
    python recipes/bench_speed.py --device cuda --bf16                   # the same on a GPU, in a few minutes
    python recipes/bench_speed.py --size tiny --classes 4 --shots 4      # a smoke run

Class names are ImageNet's (shipped with cmp_hf; an even spread of them below 1000 classes), tokenized by a BPE
tokenizer that makes each of their words one token, so prompt lengths are realistic.

Epoch table (``--epoch_classes`` x ``--shots``, CMPTrainer runs): (a) reference: the image encoder runs on every
batch and every prompt is padded to 77 tokens (CoOp, DAC and the paper's code); (b) cached image features, every
class prompt through the full text encoder (cmp_hf before the shared-prefix encoder); (c) cmp_hf's default: cached
features, the shared prefix computed once, class suffixes in length buckets.
Step table (``--classes`` x ``--n_ctx``): the same three training steps (forward, loss, backward, SGD step) timed
alone; the reference only up to ``--reference_max_classes``. Then CoCoOp at ``--cocoop_batch`` images, (b) against
(c), and activation checkpointing of the text encoding at the largest class count.

(a) reference: the image encoder runs on every batch and every prompt is padded to 77 tokens (CoOp, DAC and the
    paper's code); (b) cmp_hf's default: image features cached once, prompts cut to the longest real prompt.
All run on the same randomly initialised CLIP of ViT-B/16 sizes (no weights are needed to time it), the same
synthetic 224-px images and the same seed. Printed per epoch: seconds and ratios, the one-off cache build, the mean
training loss and the loss after the epoch (they must agree within 1e-5: the formulations compute the same thing),
and peak memory above start (CUDA allocator on GPU, sampled resident set size on CPU, so CPU figures are coarse).
"""

from __future__ import annotations

import argparse
import re
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
from cmp_hf.data.suite import imagenet_classnames
from cmp_hf.prompts import PromptConfig
from cmp_hf.testing.tiny import SIZES, random_clip_config, tiny_tokenizer

VARIANTS = {  # name: (cached image features, 77-token prompts, shared prefix)
    "reference": (False, True, False),
    "full text": (True, False, False),
    "shared prefix": (True, False, True),
}


def class_names(classes: int) -> list[str]:
    """``classes`` ImageNet names spread evenly over the 1000 (all of them at 1000)."""
    names = imagenet_classnames()
    return [names[i * len(names) // classes] for i in range(classes)]


def synthetic_images(names: list[str], shots: int, size: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(len(names) * shots)]
    labels = [i % len(names) for i in range(len(names) * shots)]
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


def prompt_model(args, clip_dir: str, names: list[str], variant: str, **prompt) -> PromptTunedCLIP:
    """A new prompt for ``names`` on the CLIP in ``clip_dir``, encoding its text the way ``variant`` does."""
    _, padded, shared = VARIANTS[variant]
    processor = CLIPProcessor.from_pretrained(clip_dir)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    config = PromptConfig(
        class_names=names, allow_duplicate_names=True, base_model_name_or_path=clip_dir, **prompt
    )
    model = PromptTunedCLIP.from_clip(clip, processor.tokenizer, config, pad_prompts_to=77 if padded else None)
    model.learner.shares_prefix = shared
    return model.to(args.device)


def run_epoch(args, clip_dir: str, names: list[str], data: Dataset, variant: str) -> dict:
    cached = VARIANTS[variant][0]
    processor = CLIPProcessor.from_pretrained(clip_dir)
    config = CMPConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=args.device == "cpu", bf16=args.bf16, report_to="none",
        save_strategy="no", disable_tqdm=True, num_train_epochs=1, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, seed=args.seed, n_ctx=16,
        cache_image_features=cached, image_feature_cache_dir=tempfile.mkdtemp(),
        image_feature_batch_size=args.batch_size,
    )  # fmt: skip
    set_seed(args.seed)
    model = prompt_model(args, clip_dir, names, variant, n_ctx=16)
    with peak_memory(torch.device(args.device)) as memory:
        start = time.perf_counter()
        trainer = CMPTrainer(model=model, args=config, train_dataset=data, processing_class=processor)
        cache_seconds = time.perf_counter() - start
        output = trainer.train()
    return {
        "epoch_s": output.metrics["train_runtime"],
        "cache_s": cache_seconds if cached else 0.0,
        "train_loss": output.training_loss,
        "context": trainer.model.context.detach().float().cpu().clone(),
        "peak_mib": memory["mib"],
        "prompt_tokens": model.learner.prompt_input_ids.shape[1],
        "model": trainer.model,
    }


def loss_after_epoch(model: PromptTunedCLIP, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(image_features=features).logits.float(), labels).item()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(args, model: PromptTunedCLIP, inputs: dict, labels: torch.Tensor, steps: int) -> dict:
    """Median seconds of ``steps`` training steps (after one warm-up step outside the timing, which does count in
    the peak memory) and the peak memory above start."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    timings = []
    with peak_memory(torch.device(args.device)) as memory:
        for _ in range(steps + 1):
            synchronize(args.device)
            start = time.perf_counter()
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(**inputs).logits
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(args.device)
            timings.append(time.perf_counter() - start)
    return {"s": float(np.median(timings[1:])), "mib": memory["mib"]}


def step_inputs(args, model: PromptTunedCLIP, batch: int, variant: str, size: int) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, len(model.class_names), (batch,), generator=generator).to(args.device)
    if VARIANTS[variant][0]:
        features = torch.nn.functional.normalize(torch.randn(batch, model.clip.config.projection_dim), dim=-1)
        return {"image_features": features.to(args.device)}, labels
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(args.device, dtype)}, labels


def measure_step(args, clip_dir, names, variant, size, batch, steps, checkpoint=False, **prompt) -> dict:
    model = prompt_model(args, clip_dir, names, variant, **prompt)
    if checkpoint:
        model.activation_checkpointing_enable(text_chunk_classes=args.text_chunk_classes)
    inputs, labels = step_inputs(args, model, batch, variant, size)
    return time_steps(args, model, inputs, labels, steps)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def epoch_section(args, clip_dir: str, size: int, image_processor) -> dict:
    names = class_names(args.epoch_classes)
    data = synthetic_images(names, args.shots, size, args.seed)
    results = {variant: run_epoch(args, clip_dir, names, data, variant) for variant in VARIANTS}
    model = results["shared prefix"]["model"]
    device = next(model.parameters()).device
    pixel_batches = [
        image_processor(images=[data[i]["image"] for i in range(s, min(s + 32, len(data)))], return_tensors="pt")
        for s in range(0, len(data), 32)
    ]
    features = torch.cat([model.image_features(b["pixel_values"].to(device)) for b in pixel_batches])
    labels = torch.tensor(data["label"], device=device)
    after = {variant: loss_after_epoch(r["model"], features, labels) for variant, r in results.items()}
    a, b, c = (results[v] for v in VARIANTS)
    print(f"\nEpoch: {args.epoch_classes} classes x {args.shots} shots, batch {args.batch_size}, n_ctx 16")
    print_table(["", "(a) reference", "(b) cached, full text", "(c) cached, shared prefix"], [
        ["seconds per epoch", *(f"{r['epoch_s']:.2f}" for r in (a, b, c))],
        ["one-off cache build (s)", "-", f"{b['cache_s']:.2f}", f"{c['cache_s']:.2f}"],
        ["prompt length (tokens)", *(str(r["prompt_tokens"]) for r in (a, b, c))],
        ["mean training loss of the epoch", *(f"{r['train_loss']:.7f}" for r in (a, b, c))],
        ["loss after the epoch", *(f"{after[v]:.7f}" for v in VARIANTS)],
        ["peak memory above start (MiB)", *(f"{r['peak_mib']:.0f}" for r in (a, b, c))],
    ])  # fmt: skip
    print(f"\nspeed-up per epoch: (a)/(c) {a['epoch_s'] / c['epoch_s']:.1f}x, "
          f"(a)/(b) {a['epoch_s'] / b['epoch_s']:.1f}x, (b)/(c) {b['epoch_s'] / c['epoch_s']:.1f}x; "
          f"epoch + cache build (a)/(c): {a['epoch_s'] / (c['epoch_s'] + c['cache_s']):.2f}x")  # fmt: skip
    gaps = {
        "loss_gap": max(abs(after[v] - after["reference"]) for v in VARIANTS),
        "train_loss_gap": max(abs(r["train_loss"] - a["train_loss"]) for r in (b, c)),
        "prompt_gap": max((r["context"] - a["context"]).abs().max().item() for r in (b, c)),
    }
    print(f"max |loss after - (a)| = {gaps['loss_gap']:.2e}; max |mean training loss - (a)| = "
          f"{gaps['train_loss_gap']:.2e}; max |prompt - (a)| = {gaps['prompt_gap']:.2e}")  # fmt: skip
    return {"epoch_ratio": a["epoch_s"] / c["epoch_s"], **gaps}


def step_section(args, clip_dir: str, size: int) -> dict:
    rows, figures = [], {}
    for classes in args.classes:
        names = class_names(classes)
        for n_ctx in args.n_ctx:
            steps = max(1, min(args.steps, 3000 // classes))
            variants = [v for v in VARIANTS if v != "reference" or classes <= args.reference_max_classes]
            r = {
                v: measure_step(args, clip_dir, names, v, size, args.batch_size, steps, n_ctx=n_ctx) for v in variants
            }
            ref = r.get("reference")
            b, c = r["full text"], r["shared prefix"]
            rows.append([
                str(classes), str(n_ctx), str(steps), f"{ref['s']:.3f}" if ref else "-", f"{b['s']:.3f}",
                f"{c['s']:.3f}", f"{ref['s'] / c['s']:.1f}x" if ref else "-", f"{b['s'] / c['s']:.1f}x",
                f"{ref['mib']:.0f}" if ref else "-", f"{b['mib']:.0f}", f"{c['mib']:.0f}",
                f"{b['mib'] / max(c['mib'], 1):.1f}x",
            ])  # fmt: skip
            figures[(classes, n_ctx)] = {"time": b["s"] / c["s"], "memory": b["mib"] / max(c["mib"], 1)}
    print(f"\nTraining steps (batch {args.batch_size}; (a) encodes its images every step; median over the steps "
          "after one warm-up step)")  # fmt: skip
    print_table([
        "classes", "n_ctx", "steps", "(a) s/step", "(b) s/step", "(c) s/step", "(a)/(c)", "(b)/(c)",
        "(a) MiB", "(b) MiB", "(c) MiB", "(b)/(c) memory",
    ], rows)  # fmt: skip
    return figures


def cocoop_section(args, clip_dir: str, size: int) -> dict:
    names = class_names(args.cocoop_classes)
    steps = max(1, min(args.steps, 300 // args.cocoop_classes))
    r = {
        v: measure_step(args, clip_dir, names, v, size, args.cocoop_batch, steps, n_ctx=4, learner="cocoop")
        for v in ("full text", "shared prefix")
    }
    b, c = r["full text"], r["shared prefix"]
    print(f"\nCoCoOp step: {args.cocoop_classes} classes, batch {args.cocoop_batch} ({args.cocoop_batch} x "
          f"{args.cocoop_classes} prompts), n_ctx 4, {steps} steps")  # fmt: skip
    print_table(["", "(b) full text", "(c) shared prefix", "(b)/(c)"], [
        ["s/step", f"{b['s']:.3f}", f"{c['s']:.3f}", f"{b['s'] / c['s']:.1f}x"],
        ["peak memory above start (MiB)", f"{b['mib']:.0f}", f"{c['mib']:.0f}", f"{b['mib'] / max(c['mib'], 1):.1f}x"],
    ])  # fmt: skip
    return {"cocoop_time": b["s"] / c["s"]}


def checkpoint_section(args, clip_dir: str, size: int) -> None:
    classes = max(args.classes)
    names, steps = class_names(classes), max(1, min(args.steps, 3000 // classes))
    rows = []
    for label, checkpoint, chunk in (
        ("off", False, None), ("on, one group per length bucket", True, None),
        (f"on, at most {args.text_chunk_classes} classes per group", True, args.text_chunk_classes),
    ):  # fmt: skip
        saved, args.text_chunk_classes = args.text_chunk_classes, chunk
        r = measure_step(args, clip_dir, names, "shared prefix", size, args.batch_size, steps, n_ctx=16,
                         checkpoint=checkpoint)  # fmt: skip
        args.text_chunk_classes = saved
        rows.append([label, f"{r['s']:.3f}", f"{r['mib']:.0f}"])
    print(f"\nActivation checkpointing of the text encoding, (c) at {classes} classes, n_ctx 16, {steps} steps")
    print_table(["checkpointing", "s/step", "peak memory above start (MiB)"], rows)


def main(args: argparse.Namespace) -> dict:
    names = imagenet_classnames()
    tokenizer = tiny_tokenizer({word for name in names for word in re.findall(r"[a-z]+", name.lower())})
    config = random_clip_config(args.size, tokenizer)
    size = config.vision_config.image_size
    clip_dir = tempfile.mkdtemp()
    set_seed(args.seed)
    CLIPModel(config).save_pretrained(clip_dir)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    print(f"{args.size} sizes, device {args.device}, bf16 {args.bf16}, torch threads {torch.get_num_threads()}")
    figures = epoch_section(args, clip_dir, size, image_processor) if args.epoch_classes else {}
    figures["steps"] = step_section(args, clip_dir, size)
    if args.cocoop_classes:
        figures.update(cocoop_section(args, clip_dir, size))
    checkpoint_section(args, clip_dir, size)
    return figures


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="vit-b16")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[10, 100, 1000], help="class counts of the step table"
    )
    parser.add_argument("--n_ctx", type=int, nargs="+", default=[16, 4], help="context lengths of the step table")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per step-table entry (fewer when large)")
    parser.add_argument(
        "--reference_max_classes",
        type=int,
        default=100,
        help="largest class count at which the 77-token reference step is timed (it is slow)",
    )
    parser.add_argument("--epoch_classes", type=int, default=100, help="classes of the epoch table (0: skip it)")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cocoop_classes", type=int, default=100, help="classes of the CoCoOp step (0: skip it)")
    parser.add_argument("--cocoop_batch", type=int, default=4)
    parser.add_argument("--text_chunk_classes", type=int, default=128, help="group size of the checkpointing row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())

"""Speed and memory of serving a prompt: ``CalibratedCLIP`` now, as it was, and the floor, side by side.

    OMP_NUM_THREADS=2 python recipes/bench_serving.py                       # 10, 100, 1000 classes, ViT-B/16 sizes
    python recipes/bench_serving.py --device cuda --bf16                    # the same on a GPU (autocast bf16)
    python recipes/bench_serving.py --size tiny                             # a smoke run (seconds, on a tiny CLIP)

Three ways to get the same calibrated logits, on the same randomly initialised CLIP of ViT-B/16 sizes (no weights
are needed to time it), the same prompt and the same 224-px pixel values (image preprocessing, the same for all,
is left out):

(a) before: what ``CalibratedCLIP`` did until now, the prompt module's forward on every image of the call at once,
    which encodes the class prompts again at each call (kept here only to measure it);
(b) now: ``CalibratedCLIP.logits``, class features kept from the first call, ``--batch_size`` images per forward;
(c) floor: ``CLIPModel.get_image_features`` on the same batches plus one matrix product with class features
    computed beforehand: what no classifier over this CLIP can beat.

Printed per class count: per-image latency of one-image calls (median of ``--latency_repeats``), throughput of
``--images``-image calls (256 by default; median of ``--throughput_repeats``), their ratios to the floor and to
(a), the largest logit difference from (a), and each call's peak memory above its start (CUDA allocator on GPU,
sampled resident set size on CPU, so CPU figures are coarse).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessorPil, CLIPModel, set_seed

from cmp_hf import CalibratedCLIP, PromptTunedCLIP
from cmp_hf.prompts import PromptConfig
from cmp_hf.testing.tiny import random_clip_config, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python recipes/<script>.py`
from recipes.bench_speed import class_names, peak_memory, print_table, synchronize  # noqa: E402


def build(args: argparse.Namespace, names: list[str]) -> CalibratedCLIP:
    tokenizer = tiny_tokenizer(word for name in names for word in name.replace("_", " ").split())
    config = random_clip_config(args.size, tokenizer)
    set_seed(args.seed)
    prompt = PromptConfig(class_names=names, n_ctx=16, allow_duplicate_names=True)
    model = PromptTunedCLIP.from_clip(CLIPModel(config).eval(), tokenizer, prompt).to(args.device)
    size = config.vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CalibratedCLIP(model, processor, dtype=torch.bfloat16 if args.bf16 else None)


def autocast(args: argparse.Namespace):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.bf16 else nullcontext()


def before(args, classifier: CalibratedCLIP, pixel_values: torch.Tensor) -> torch.Tensor:
    """(a): the prompt module's forward, text encoder included, on the whole call in one batch."""
    with torch.no_grad(), autocast(args):
        return classifier.model(pixel_values=pixel_values.to(classifier.device)).logits.float().cpu()


def floor(args, classifier: CalibratedCLIP, text: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """(c): image features and one matrix product with class features computed beforehand."""
    clip, out = classifier.model.clip, []
    with torch.inference_mode(), autocast(args):
        for chunk in pixel_values.split(args.batch_size):
            features = clip.get_image_features(pixel_values=chunk.to(classifier.device)).pooler_output
            out.append((clip.logit_scale.exp() * F.normalize(features, dim=-1) @ text.t()).float().cpu())
    return torch.cat(out)


def seconds(args, call) -> float:
    synchronize(args.device)
    start = time.perf_counter()
    call()
    synchronize(args.device)
    return time.perf_counter() - start


def timed(args, call) -> tuple[float, float, torch.Tensor]:
    """Seconds and peak MiB of one call, and its result."""
    with peak_memory(torch.device(args.device)) as memory:
        result = []
        elapsed = seconds(args, lambda: result.append(call()))
    return elapsed, memory["mib"], result[0]


def measure(args, classes: int) -> dict[str, dict[str, float]]:
    """The three ways on the same images. Their repeats take turns (a, b, c, a, b, c, ...), so that a change in
    the machine's load over the run falls on all three alike; one-image calls are timed without the memory
    sampler (a thread that would take a share of a small call)."""
    classifier = build(args, class_names(classes))
    size = classifier.model.clip.config.vision_config.image_size
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.images, 3, size, size, generator=generator)
    one = pixel_values[:1]
    with torch.no_grad(), autocast(args):
        text = classifier.model.text_features()
    classifier.logits(one)  # (b)'s class features, computed once per prompt, as a server does at start-up
    ways = {
        "before": lambda x: before(args, classifier, x),
        "now": lambda x: classifier.logits(x, batch_size=args.batch_size, progress=False),
        "floor": lambda x: floor(args, classifier, text, x),
    }
    for call in ways.values():
        call(one)  # warm-up
    latency = {name: [] for name in ways}
    for _ in range(args.latency_repeats):
        for name, call in ways.items():
            latency[name].append(seconds(args, lambda call=call: call(one)))
    runs = {name: [] for name in ways}
    for _ in range(args.throughput_repeats):
        for name, call in ways.items():
            runs[name].append(timed(args, lambda call=call: call(pixel_values)))
    results = {
        name: {
            "latency_s": statistics.median(latency[name]),
            "throughput": args.images / statistics.median(elapsed for elapsed, _, _ in runs[name]),
            "peak_mib": max(mib for _, mib, _ in runs[name]),
        }
        for name in ways
    }
    reference = runs["before"][0][2]
    for name, result in results.items():
        result["max_diff"] = (runs[name][0][2] - reference).abs().max().item()
    return results


def main(args: argparse.Namespace) -> dict[int, dict[str, dict[str, float]]]:
    print(
        f"device {args.device}{' bf16 autocast' if args.bf16 else ''}, {torch.get_num_threads()} CPU threads, "
        f"CLIP {args.size} (random weights), {args.images}-image calls in batches of {args.batch_size}; "
        f"repeats: {args.latency_repeats} one-image, {args.throughput_repeats} {args.images}-image"
    )
    table, results = [], {}
    for classes in args.classes:
        results[classes] = measured = measure(args, classes)
        now, old, low = measured["now"], measured["before"], measured["floor"]
        for name, row in measured.items():
            table.append([
                str(classes), name, f"{1000 * row['latency_s']:.3g}", f"{row['throughput']:.2f}",
                f"{row['peak_mib']:.0f}", f"{row['max_diff']:.1e}",
            ])  # fmt: skip
        table.append([
            str(classes), "now / floor", f"{now['latency_s'] / low['latency_s']:.2f}x",
            f"{low['throughput'] / now['throughput']:.2f}x", "", "",
        ])  # fmt: skip
        table.append([
            str(classes), "before / now", f"{old['latency_s'] / now['latency_s']:.1f}x",
            f"{now['throughput'] / old['throughput']:.1f}x", "", "",
        ])  # fmt: skip
    print_table(["classes", "way", "1-image call (ms)", "images/s", "peak MiB", "max |logit diff|"], table)
    return results


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--size", default="vit-b16", choices=["vit-b16", "tiny"])
    parser.add_argument("--images", type=int, default=256, help="images per throughput call")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward for (b) and (c)")
    parser.add_argument("--latency_repeats", type=int, default=10)
    parser.add_argument("--throughput_repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast in bfloat16 (all three ways)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())

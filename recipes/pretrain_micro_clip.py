"""Pretrain the project's micro-CLIP on the offline testbed data, evaluate it zero-shot, save an HF directory.

    python recipes/pretrain_micro_clip.py build/micro-clip [--steps 1000 --batch_size 256 --seed 0]

No CLIP weights can be downloaded here, and a random CLIP shows nothing about calibration, so the project
pretrains a small CLIPModel contrastively on the `pretrain` pools of MNIST, animal silhouettes and drawn shapes
(cmp_hf.data.testbed), with captions from a few templates. Several images of one batch share a concept, so the
targets are multi-positive (every image-caption pair of the same concept counts). The tokenizer is OpenAI's CLIP
BPE trimmed to the merges this corpus uses (taken from the open-clip-torch wheel, downloaded with pip if needed),
so CLIPTokenizer runs its real code path. Writes model, tokenizer and processor with save_pretrained, plus
`zero_shot.json`.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer, set_seed

from cmp_hf.metrics import calibration_metrics
from cmp_hf.testing.testbed import (
    ANIMAL_NAMES,
    DIGIT_NAMES,
    SHAPE_COLOURS,
    SHAPE_NAMES,
    animal_arrays,
    mnist_arrays,
    pool_indices,
    shape_arrays,
)

TEMPLATES = {
    "digit": ["a photo of a {}.", "a handwritten {}.", "the number {}.", "a photo of the digit {}."],
    "animal": ["a photo of a {}.", "a silhouette of a {}.", "a drawing of a {}.", "the shape of a {}."],
    "shape": ["a photo of a {}.", "a {}.", "a drawing of a {}.", "a picture of a {}."],
}
OPEN_CLIP = "open-clip-torch==3.3.0"
BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def bpe_merges(cache_dir: str) -> list[tuple[str, str]]:
    """OpenAI's CLIP BPE merges (ranked), from the open-clip-torch wheel (MIT), fetched with pip once."""
    os.makedirs(cache_dir, exist_ok=True)
    wheels = [f for f in os.listdir(cache_dir) if f.startswith("open_clip_torch") and f.endswith(".whl")]
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", OPEN_CLIP, "-d", cache_dir],
                       check=True)  # fmt: skip
        wheels = [f for f in os.listdir(cache_dir) if f.startswith("open_clip_torch") and f.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(cache_dir, wheels[0])) as wheel:
        lines = gzip.decompress(wheel.read(BPE_FILE)).decode("utf-8").split("\n")
    # as open_clip's SimpleTokenizer: skip the header, keep the first 49152 - 256 - 2 merges
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def merges_from_tokenizer(directory: str) -> list[tuple[str, str]]:
    """The ranked merges of a saved CLIP tokenizer (e.g. the shipped micro-CLIP's), for runs without a download:
    trimming them to the corpus gives the same tokenizer as trimming the full list, since they are its subset."""
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        merges = json.load(f)["model"]["merges"]
    return [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]


def trimmed_tokenizer(texts: list[str], merges: list[tuple[str, str]], directory: str) -> CLIPTokenizer:
    """A CLIPTokenizer with the 512 byte-level tokens and only the merges the corpus uses, in their original rank
    order: it tokenizes the corpus exactly as the full 49,408-token vocabulary does."""
    from tokenizers.pre_tokenizers import ByteLevel

    full = CLIPTokenizer(vocab=_full_vocab(merges), merges=list(merges))
    used: set[tuple[str, str]] = set()
    rank = {m: i for i, m in enumerate(merges)}
    for word in {w for text in texts for w in full.backend_tokenizer.pre_tokenizer.pre_tokenize_str(
            full.backend_tokenizer.normalizer.normalize_str(text))}:  # fmt: skip
        symbols = list(word[0][:-1]) + [word[0][-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(rank.get(pair, math.inf), i) for i, pair in enumerate(itertools.pairwise(symbols))]
            best, i = min(pairs)
            if best == math.inf:
                break
            used.add((symbols[i], symbols[i + 1]))
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    kept = [m for m in merges if m in used]
    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(dict.fromkeys(vocab))}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    trimmed = CLIPTokenizer.from_pretrained(directory)
    for text in texts:  # the point of trimming: identical ids up to the vocabulary change
        a = full.convert_ids_to_tokens(full(text)["input_ids"])
        b = trimmed.convert_ids_to_tokens(trimmed(text)["input_ids"])
        if a != b:
            raise RuntimeError(f"trimmed tokenizer differs on {text!r}: {a} vs {b}")
    return trimmed


def _full_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def micro_clip_config(tokenizer: CLIPTokenizer, logit_scale: float) -> CLIPConfig:
    text = dict(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(image_size=32, patch_size=4, hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                  num_attention_heads=4)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64,
                      logit_scale_init_value=math.log(logit_scale))  # fmt: skip


def corpus(seed: int, shapes: int) -> list[tuple[np.ndarray, str, str]]:
    """(image, concept, family) for every pretraining image."""
    items = []
    for family, (images, labels), names in (("digit", mnist_arrays(), DIGIT_NAMES),
                                            ("animal", animal_arrays(), ANIMAL_NAMES)):  # fmt: skip
        for i in pool_indices(len(labels), "pretrain"):
            items.append((images[i], names[labels[i]], family))
    images, shape_ids, colour_ids = shape_arrays(shapes, seed=seed)
    colours = list(SHAPE_COLOURS)
    for image, s, c in zip(images, shape_ids, colour_ids, strict=True):
        items.append((image, f"{colours[c]} {SHAPE_NAMES[s]}", "shape"))
    return items


def zero_shot(model: CLIPModel, processor: CLIPProcessor, images: np.ndarray, labels: np.ndarray,
              names: list[str]) -> dict[str, float]:  # fmt: skip
    with torch.no_grad():
        text = processor.tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
        t = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        pixels = processor.image_processor(images=[_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        v = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        logits = (model.logit_scale.exp() * v @ t.t()).numpy()
    return calibration_metrics(labels, logits=logits)


def _rgb(image: np.ndarray):
    from PIL import Image

    image = Image.fromarray(image)
    return image.convert("RGB")


def main(args: argparse.Namespace) -> dict:
    set_seed(args.seed)
    start = time.time()
    items = corpus(args.seed, args.shapes)
    concepts = sorted({concept for _, concept, _ in items})
    concept_of = {t.format(concept): concept for _, concept, family in items for t in TEMPLATES[family]}
    captions = sorted(concept_of)
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        merges = merges_from_tokenizer(args.bpe_from) if args.bpe_from else bpe_merges(args.cache_dir)
        tokenizer = trimmed_tokenizer(captions, merges, tmp)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = CLIPModel(micro_clip_config(tokenizer, args.logit_scale))
    print(f"{len(items)} images, {len(concepts)} concepts, {len(captions)} captions, vocabulary {len(tokenizer)}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")  # fmt: skip

    pixels = image_processor(images=[_rgb(im) for im, _, _ in items], return_tensors="pt")["pixel_values"]
    concept_of_image = torch.tensor([concepts.index(c) for _, c, _ in items])
    family_of_image = [f for _, _, f in items]
    text = tokenizer(captions, padding=True, return_tensors="pt")
    caption_index = {c: i for i, c in enumerate(captions)}
    concept_of_caption = torch.tensor([concepts.index(concept_of[c]) for c in captions])

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model.train()
    progress = tqdm(range(args.steps), desc="pretraining")
    for step in progress:
        batch = torch.randint(len(items), (args.batch_size,), generator=generator)
        chosen = [caption_index[TEMPLATES[family_of_image[i]][rng.integers(4)].format(items[i][1])] for i in batch]
        ids = torch.tensor(chosen)
        image_features = F.normalize(model.get_image_features(pixel_values=pixels[batch]).pooler_output, dim=-1)
        text_features = F.normalize(
            model.get_text_features(input_ids=text["input_ids"][ids], attention_mask=text["attention_mask"][ids])
            .pooler_output, dim=-1,
        )  # fmt: skip
        logits = model.logit_scale.exp() * image_features @ text_features.t()
        positive = (concept_of_image[batch][:, None] == concept_of_caption[ids][None, :]).float()
        loss_i = -(positive * logits.log_softmax(dim=1)).sum(1) / positive.sum(1)
        loss_t = -(positive * logits.log_softmax(dim=0)).sum(0) / positive.sum(0)
        loss = (loss_i.mean() + loss_t.mean()) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    minutes = (time.time() - start) / 60

    table = {}
    for task, (images, labels), names in (("mnist", mnist_arrays(), DIGIT_NAMES),
                                          ("animals", animal_arrays(), ANIMAL_NAMES)):  # fmt: skip
        test = pool_indices(len(labels), "test")
        table[task] = zero_shot(model, processor, images[test], labels[test], names)
    report = {"minutes": minutes, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
              "logit_scale": model.logit_scale.exp().item(), "zero_shot_test": table}  # fmt: skip
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "zero_shot.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--logit_scale", type=float, default=100.0, help="initial scale, clamped at 100 as CLIP")
    parser.add_argument("--shapes", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default="build/wheels", help="where the open-clip-torch wheel is kept")
    parser.add_argument("--bpe_from", default=None, help="take the BPE merges from this CLIP directory instead")
    main(parser.parse_args())

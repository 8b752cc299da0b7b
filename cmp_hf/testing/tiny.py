"""A tiny, randomly initialised CLIP with a real ``CLIPTokenizer``, for tests and offline smoke runs.

No CLIP weights can be downloaded here, and the pipeline must still run through the real code paths
(``CLIPModel.from_pretrained``, ``CLIPTokenizer`` / ``CLIPProcessor.from_pretrained`` on a directory). The tokenizer
is byte-level BPE like OpenAI's: the 256 byte symbols, their end-of-word forms, merges that make each given word
one token, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two largest ids (so EOS pooling works whichever
way the config asks for it). Any text tokenizes; unknown words fall back to bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

TINY_IMAGE_SIZE = 32


def tiny_tokenizer(words: Iterable[str] = ()) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer whose merges turn each (lower-case, alphabetic) word into one token."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        if len(word) < 2 or not word.isalpha():
            continue
        merged = word[0]
        for i, char in enumerate(word[1:], start=1):
            piece = char + "</w>" if i == len(word) - 1 else char
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(tmp)


def tiny_clip_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, logit_scale: float = 4.6052) -> CLIPConfig:
    """Two layers per tower, 32 px images in 8 px patches, 77 text positions as in CLIP."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=logit_scale)


def tiny_clip(words: Iterable[str] = (), seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A random tiny ``CLIPModel`` (seeded) and its processor (tokenizer + 32 px image processor)."""
    tokenizer = tiny_tokenizer(words)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(tokenizer))
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(directory: str, words: Iterable[str] = (), seed: int = 0) -> str:
    """Write a tiny CLIP as a Hugging Face directory that ``from_pretrained`` loads; returns the directory."""
    model, processor = tiny_clip(words, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# Real CLIP sizes, for benchmarks that need the cost of a real tower with random weights.
SIZES = {
    "vit-b16": dict(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
            patch_size=16,
        ),
        projection_dim=512,
    ),
    # for a smoke test of this script only
    "tiny": dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    ),
}  # fmt: skip


def random_clip_config(size: str, tokenizer) -> CLIPConfig:
    """A CLIPConfig of ``SIZES[size]`` whose text tower fits ``tokenizer`` (vocabulary, BOS/EOS ids)."""
    config = CLIPConfig(**SIZES[size], logit_scale_init_value=4.6052)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.bos_token_id, config.text_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return config

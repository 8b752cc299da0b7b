"""The shared-prefix text encoder gives today's full-forward features and context gradients; whole-string prompts."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

from cmp_hf import CMPConfig, CMPTrainer
from cmp_hf.data.suite import imagenet_classnames
from cmp_hf.losses import kgcoop_penalty
from cmp_hf.modeling import PromptTunedCLIP
from cmp_hf.prompts import PromptConfig, tokenize_prompts
from cmp_hf.prompts.shared_prefix import length_buckets
from cmp_hf.testing.tiny import tiny_clip_config

MICRO_CLIP = Path(__file__).resolve().parents[1] / "model_cards" / "micro-clip"


@pytest.fixture(scope="module")
def bpe():
    """A real CLIP BPE tokenizer (CLIP's pre-tokenizer regex, byte-level BPE with merges)."""
    return AutoTokenizer.from_pretrained(MICRO_CLIP)


@pytest.fixture(scope="module")
def bpe_clip(bpe):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return CLIPModel(tiny_clip_config(bpe)).eval()


def mixed_names(bpe, n_ctx: int) -> list[str]:
    """ImageNet names of many lengths, a one-token name, and one that fills the 77 positions exactly."""
    names = list(imagenet_classnames())
    picked = sorted(names, key=lambda n: len(bpe(n, add_special_tokens=False)["input_ids"]))
    sample = picked[:: len(picked) // 9] + [picked[-1], "kite (bird of prey)"]
    longest = " ".join(["x"] * (77 - n_ctx - 3))  # [SOS] ctx x .. x "." [EOS] = 77 tokens
    return ["a", *dict.fromkeys(sample), longest]


def features_and_grad(model: PromptTunedCLIP, shared: bool, image_features=None, kgcoop: bool = False):
    """Text features and d(loss)/d(context) for a training loss (cross-entropy of CLIP logits of fixed random
    images, + KgCoOp's distance), with the shared prefix on or off."""
    model.learner.shares_prefix = shared
    model.context.grad = None
    if model.learner.weights_name:
        model.learner.zero_grad()
    generator = torch.Generator().manual_seed(1)
    images = image_features
    if images is None:
        images = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    features = model.text_features(image_features)
    images = images.to(features.dtype)
    text = features if features.dim() == 3 else features.expand(len(images), -1, -1)
    logits = 100 * torch.einsum("bd,bcd->bc", images, text)
    labels = torch.randint(0, text.shape[1], (len(images),), generator=generator)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    if kgcoop:
        loss = loss + 8.0 * kgcoop_penalty(features, model.hand_crafted_text_features())
    loss.backward()
    return features.detach(), model.context.grad.clone()


def assert_same_as_full_forward(model, image_features=None, kgcoop=False, tolerance=1e-5):
    """Features within ``tolerance``; context gradients within ``tolerance`` times their largest entry (a context
    of N(0, 0.02) vectors gets gradients of tens through the layer norms, so fp32 rounding alone is ~1e-6 of
    that)."""
    model.learner.shares_prefix = True
    assert model.learner.shared_prefix_plan(model.clip) is not None  # the fast path is the one under test
    fast, fast_grad = features_and_grad(model, True, image_features, kgcoop)
    full, full_grad = features_and_grad(model, False, image_features, kgcoop)
    torch.testing.assert_close(fast, full, atol=tolerance, rtol=0)
    scale = full_grad.abs().max()
    assert scale > 1e-3  # the gradients compared are not all zero
    torch.testing.assert_close(fast_grad, full_grad, atol=tolerance * scale.item(), rtol=0)


@pytest.mark.parametrize(("n_ctx", "ctx_init"), [(4, None), (16, None), (4, "a photo of a"), (16, "a photo of a")])
def test_coop_features_and_context_gradients_equal_the_full_forward(bpe, bpe_clip, n_ctx, ctx_init):
    names = mixed_names(bpe, n_ctx)
    config = PromptConfig(class_names=names, n_ctx=n_ctx, ctx_init=ctx_init)
    if ctx_init is not None:  # the init text sets M; make the long name fit it
        m = len(bpe(ctx_init, add_special_tokens=False)["input_ids"])
        config = PromptConfig(class_names=mixed_names(bpe, m), n_ctx=n_ctx, ctx_init=ctx_init)
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, config)
    plan = model.learner.shared_prefix_plan(model.clip)
    assert model.learner.prompt_input_ids.shape[1] == 77 and len(plan.groups) > 1  # mixed lengths, buckets
    assert_same_as_full_forward(model, kgcoop=n_ctx == 4)


def test_suffixes_are_packed_without_padding(bpe, bpe_clip):
    """The packed tokens are exactly each class's suffix up to EOS; the buckets' padded rows map back onto them."""
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4))
    plan = model.learner.shared_prefix_plan(model.clip)
    (chunk,) = plan.chunks
    ids, n_prefix = model.learner.prompt_input_ids, len(plan.prefix_ids)
    ends = (ids == bpe.eos_token_id).int().argmax(dim=-1) + 1
    sorted_classes = torch.argsort(plan.restore)
    expected = torch.cat([ids[c, n_prefix : ends[c]] for c in sorted_classes.tolist()])
    torch.testing.assert_close(chunk.ids, expected, atol=0, rtol=0)
    assert int((chunk.positions == n_prefix).sum()) == len(ids)  # each class's suffix starts after the prefix
    assert bool((chunk.ids[chunk.pooled] == bpe.eos_token_id).all())
    padded = torch.cat([chunk.ids[bucket.rows] for bucket in chunk.buckets])
    assert len(padded) > len(chunk.ids)  # mixed lengths: the buckets pad, the packed tokens do not
    torch.testing.assert_close(padded[chunk.unpad], chunk.ids, atol=0, rtol=0)


def test_float64_shows_the_difference_is_rounding_only(bpe, bpe_clip):
    clip = CLIPModel(bpe_clip.config).eval()
    clip.load_state_dict(bpe_clip.state_dict())
    config = PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4)
    model = PromptTunedCLIP.from_clip(clip.double(), bpe, config).double()
    assert_same_as_full_forward(model, kgcoop=True, tolerance=1e-12)


def test_cocoop_features_and_gradients_equal_the_full_forward(bpe, bpe_clip):
    config = PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4, learner="cocoop")
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, config)
    image_features = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    assert_same_as_full_forward(model, image_features)
    assert_same_as_full_forward(model)  # the context alone (DAC's use)
    # the meta-network's gradients too
    grads = []
    for shared in (True, False):
        features_and_grad(model, shared, image_features)
        grads.append(model.learner.meta_net[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=0)


def test_legacy_argmax_pooling_and_checkpointed_chunks_are_exact(bpe, bpe_clip):
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4))
    model.activation_checkpointing_enable(text_chunk_classes=3)
    plan = model.learner.shared_prefix_plan(model.clip)
    assert max(end - first for first, end, _ in plan.groups) <= 3
    assert_same_as_full_forward(model)
    model.clip.text_model.eos_token_id = 2
    try:
        assert_same_as_full_forward(model)
    finally:
        model.clip.text_model.eos_token_id = bpe.eos_token_id


def test_bf16_autocast_runs_the_shared_prefix(bpe, bpe_clip):
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4))
    full, _ = features_and_grad(model, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model.text_features()
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - full).abs().max() < 0.05  # bf16 rounding only
    fast.float().sum().backward()
    assert model.context.grad.abs().max() > 0


@pytest.mark.parametrize(
    ("learner", "overrides"),
    [("maple", {}), ("proda", {}), ("coop", {"class_specific_context": True}),
     ("coop", {"class_token_position": "middle"}), ("coop", {"class_token_position": "front"})],
)  # fmt: skip
def test_learners_and_layouts_without_a_shared_prefix_keep_the_full_forward(bpe, bpe_clip, learner, overrides):
    config = PromptConfig(class_names=["tench", "goldfish", "kite (bird of prey)"], n_ctx=4, learner=learner,
                              proda_num_prompts=4, maple_prompt_depth=2, **overrides)  # fmt: skip
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, config)
    assert model.learner.shared_prefix_plan(model.clip) is None
    if learner == "coop":  # the features are the full forward's
        learner_module = model.learner
        expected = learner_module.encode_prompts(
            model.clip, model.context, learner_module.prompt_input_ids, learner_module.prompt_context_index
        )
        torch.testing.assert_close(model.text_features(), expected, atol=0, rtol=0)


def test_an_unrecognised_text_tower_falls_back_with_one_log_line(bpe, bpe_clip, caplog):
    model = PromptTunedCLIP.from_clip(bpe_clip, bpe, PromptConfig(class_names=["tench", "goldfish"], n_ctx=4))
    layer = model.clip.text_model.encoder.layers[0]
    handle = layer.register_forward_hook(lambda module, args, output: output * 2)
    try:
        with caplog.at_level(logging.WARNING):
            first, second = model.text_features(), model.text_features()
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "has hooks" in caplog.records[0].message
        model.learner.shares_prefix = False
        torch.testing.assert_close(first, model.text_features())  # the hook acted: HF's forward ran
        torch.testing.assert_close(first, second)
    finally:
        handle.remove()
    model.learner.shares_prefix = True
    assert model.learner.shared_prefix_plan(model.clip) is not None


def test_attention_dropout_takes_the_full_forward_in_training_only(bpe, caplog):
    """The shared-prefix path has no attention dropout: with ``attention_dropout=0.1`` training must take Hugging
    Face's forward (which drops), evaluation (no dropout) the exact shared prefix."""
    config = tiny_clip_config(bpe)
    config.text_config.attention_dropout = 0.1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = CLIPModel(config)
    model = PromptTunedCLIP.from_clip(clip, bpe, PromptConfig(class_names=mixed_names(bpe, 4), n_ctx=4))
    model.eval()
    assert_same_as_full_forward(model)  # no dropout in eval: the fast path is taken and exact
    model.train()
    model.learner.shares_prefix = True  # (the comparison above left it off)
    with caplog.at_level(logging.WARNING):
        assert model.learner.shared_prefix_plan(model.clip) is None
    assert "dropout in training mode" in caplog.text
    torch.manual_seed(1)
    first = model.text_features()
    torch.manual_seed(2)
    assert (first - model.text_features()).abs().max() > 1e-3  # the full forward taken in training drops


def test_length_buckets_minimise_padding_like_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 15))]
        values = sorted(set(lengths))

        def padded(uppers, lengths=lengths):
            return sum(min(u for u in uppers if u >= n) for n in lengths)

        best = min(
            padded([*chosen, values[-1]])
            for k in range(4)
            for chosen in itertools.combinations(values[:-1], k)
        )  # fmt: skip
        uppers = length_buckets(lengths, 4)
        assert len(uppers) <= 4 and uppers[-1] == values[-1] and padded(uppers) == best


def test_prompts_are_tokenized_as_one_string_like_coop(bpe):
    """CoOp tokenizes "X X .. X <name>." whole; so must the prompt ids, for every ImageNet name."""
    names = list(imagenet_classnames())
    config = PromptConfig(class_names=names, n_ctx=4, allow_duplicate_names=True)
    tokens = tokenize_prompts(config, bpe, max_positions=77)
    x = bpe("X", add_special_tokens=False)["input_ids"]
    assert len(x) == 1
    placeholders = tokens.context_index >= 0
    ids = torch.where(placeholders, x[0], tokens.input_ids)
    separate = 0
    for c, name in enumerate(names):
        whole = bpe("X X X X " + name + ".")["input_ids"]
        assert ids[c, : len(whole)].tolist() == whole, name
        name_then_dot = [
            *bpe(name, add_special_tokens=False)["input_ids"],
            *bpe(".", add_special_tokens=False)["input_ids"],
        ]
        separate += whole[5:-1] != name_then_dot
    assert separate > 0  # names ending in punctuation ("kite (bird of prey)") tokenize differently apart


def test_trainer_run_gives_the_same_prompt_with_the_shared_prefix(tmp_path, tiny_clip_dir, train_set, class_names):
    contexts = []
    for shared, checkpointing in ((True, True), (False, False)):
        processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
        config = PromptConfig(class_names=class_names, n_ctx=4)
        torch.manual_seed(0)
        model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), processor.tokenizer, config)
        model.learner.shares_prefix = shared
        start = model.context.detach().clone()
        args = CMPConfig(
            output_dir=str(tmp_path / str(shared)), use_cpu=True, report_to="none", save_strategy="no",
            per_device_train_batch_size=4, max_steps=4, learning_rate=0.002, seed=7, disable_tqdm=True, n_ctx=4,
            activation_checkpointing=checkpointing, image_feature_cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        trainer = CMPTrainer(model=model, args=args, train_dataset=train_set, processing_class=processor)
        trainer.train()
        assert model.learner.checkpoint_text is checkpointing  # Trainer's flag reached the text encoding
        contexts.append(model.context.detach().clone())
        assert (contexts[-1] - start).abs().max() > 1e-2  # the prompt trained
    assert (contexts[0] - contexts[1]).abs().max() <= 1e-5

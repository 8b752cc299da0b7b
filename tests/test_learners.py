"""MaPLe and ProDA: numerics against CoOp, hand-written forwards and Monte Carlo. Every learner in the registry
(``cmp_hf.learners.LEARNERS``, built with its ``test_options``): save, load, transfer, gradients, training."""

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from cmp_hf import CalibratedCLIP, CMPConfig, CMPTrainer, PromptTunedCLIP
from cmp_hf.constants import ADAPTER_WEIGHTS_NAME
from cmp_hf.data import CLIPImageCollator
from cmp_hf.learners import LEARNERS
from cmp_hf.learners.proda import class_token_positions
from cmp_hf.losses import LossOptions, expected_cross_entropy_bound, margin_variance, training_objective
from cmp_hf.posthoc import PostHocCalibration
from cmp_hf.prompts import PromptConfig
from cmp_hf.testing.synthetic import colour_patches
from cmp_hf.testing.tiny import tiny_clip_config

OPTIONS = dict(cmp_form="log_ratio", cmp_competitors="all", label_smoothing_factor=0.0, focal_gamma=0.0,
               mbls_weight=0.0, mbls_margin=10.0, kgcoop_weight=0.0)  # fmt: skip


def pixels(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def prompt_model(clip, tokenizer, class_names, seed=0, **options) -> PromptTunedCLIP:
    """A prompt whose every learned tensor is far from its init, as after training."""
    torch.manual_seed(seed)
    model = PromptTunedCLIP.from_clip(clip, tokenizer, PromptConfig(class_names=class_names, **options))
    with torch.no_grad():
        model.context.normal_(0, 0.5)
        for param in model.learner.parameters():
            param.normal_(0, 0.5)
    return model.eval()


def no_hooks(module: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


# ---- MaPLe ----------------------------------------------------------------------------------------------------------


def test_maple_depth_one_text_is_coop(wide_clip, tokenizer, class_names):
    maple = prompt_model(wide_clip, tokenizer, class_names, n_ctx=3, learner="maple", maple_prompt_depth=1)
    coop = prompt_model(wide_clip, tokenizer, class_names, n_ctx=3)
    with torch.no_grad():
        coop.context.copy_(maple.context)
    assert len(maple.learner.deep_prompts) == 0 and len(maple.learner.couplings) == 1
    torch.testing.assert_close(maple.text_features(), coop.text_features(), atol=1e-5, rtol=0)


def test_maple_deep_text_prompts_replace_the_context_positions(wide_clip, tokenizer, class_names):
    maple = prompt_model(wide_clip, tokenizer, class_names, n_ctx=3, learner="maple", class_token_position="middle")
    learner, seen = maple.learner, {}
    assert len(learner.deep_prompts) == 2  # depth 9 capped by the 3 layers
    for i, layer in enumerate(wide_clip.text_model.encoder.layers):
        layer.layer_norm1.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0]))
    maple.text_features()
    ctx = learner.prompt_context_index >= 0
    for i in (1, 2):  # layers 1..J-1 read the deep prompt at the context positions
        written = seen[i][ctx].reshape(len(class_names), 3, -1)
        torch.testing.assert_close(written, learner.deep_prompts[i - 1].expand(len(class_names), -1, -1))
    for layer in wide_clip.text_model.encoder.layers:
        layer.layer_norm1._forward_hooks.clear()
    with torch.no_grad():  # the deep prompts change the features: CoOp with the same context differs
        plain = prompt_model(wide_clip, tokenizer, class_names, n_ctx=3, class_token_position="middle")
        plain.context.copy_(maple.context)
        assert (maple.text_features() - plain.text_features()).abs().max() > 1e-3


def manual_vision_forward(clip: CLIPModel, pixel_values: torch.Tensor, prompts: list[torch.Tensor]) -> torch.Tensor:
    """MaPLe's image tower written out from HF's modules: append prompts[0] after the position embeddings, before
    the pre-layernorm; layer i >= 1 gets prompts[i] in place of the last M tokens; CLS pooled."""
    vision, batch, m = clip.vision_model, len(pixel_values), len(prompts[0])
    x = torch.cat([vision.embeddings(pixel_values), prompts[0].expand(batch, -1, -1)], dim=1)
    x = vision.pre_layrnorm(x)
    for i, layer in enumerate(vision.encoder.layers):
        if 1 <= i < len(prompts):
            x = torch.cat([x[:, :-m], prompts[i].expand(batch, -1, -1)], dim=1)
        x = layer(x, None)
    return F.normalize(clip.visual_projection(vision.post_layernorm(x[:, 0])), dim=-1)


def test_maple_vision_prompts_enter_only_through_the_couplings(wide_clip, tokenizer, class_names):
    maple = prompt_model(wide_clip, tokenizer, class_names, n_ctx=2, learner="maple")
    x = pixels()
    with torch.no_grad():
        prompts = maple.learner.vision_prompts(maple.context)
        assert [tuple(p.shape) for p in prompts] == [(2, 48)] * 3
        features = maple.image_features(x)
        torch.testing.assert_close(features, manual_vision_forward(wide_clip, x, prompts), atol=1e-5, rtol=0)
        plain = F.normalize(wide_clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        assert (features - plain).abs().max() > 1e-3
        bias = maple.learner.couplings[2].bias  # a deeper coupling's output reaches the features too (a random
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)))  # shift: LN removes a constant)
        assert (maple.image_features(x) - features).abs().max() > 1e-4


@pytest.mark.parametrize(("text_layers", "vision_layers"), [(2, 4), (4, 2)])
def test_maple_depth_is_capped_by_the_shallower_tower(tokenizer, class_names, text_layers, vision_layers):
    """Towers of different depths (ViT-L/14: 12 text layers, 24 vision): depth 9 is capped at 2, the shallower."""
    config = tiny_clip_config(tokenizer)
    config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers = text_layers, vision_layers
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    maple = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner="maple", maple_prompt_depth=9)
    assert len(maple.learner.deep_prompts) == 1 and len(maple.learner.couplings) == 2
    x = pixels()
    with torch.no_grad():
        prompts = maple.learner.vision_prompts(maple.context)
        torch.testing.assert_close(maple.image_features(x), manual_vision_forward(clip, x, prompts), atol=1e-5, rtol=0)
        assert maple(pixel_values=x).logits.isfinite().all()


def test_maple_hooks_leave_a_plain_clip_forward_untouched(wide_clip, tokenizer, class_names):
    ids = tokenizer(["a photo of a red."], return_tensors="pt")
    x = pixels(2)
    with torch.no_grad():
        text_before = wide_clip.get_text_features(**ids).pooler_output
        image_before = wide_clip.get_image_features(pixel_values=x).pooler_output
        maple = prompt_model(wide_clip, tokenizer, class_names, n_ctx=2, learner="maple")
        maple(pixel_values=x)
        assert no_hooks(wide_clip)
        torch.testing.assert_close(wide_clip.get_text_features(**ids).pooler_output, text_before, rtol=0, atol=0)
        torch.testing.assert_close(wide_clip.get_image_features(pixel_values=x).pooler_output, image_before,
                                   rtol=0, atol=0)  # fmt: skip


def test_maple_gradients_reach_every_learned_tensor(wide_clip, tokenizer, class_names):
    maple = prompt_model(wide_clip, tokenizer, class_names, n_ctx=2, learner="maple")
    F.cross_entropy(maple(pixel_values=pixels(4)).logits, torch.tensor([0, 1, 2, 3])).backward()
    learned = {n: p for n, p in maple.named_parameters() if p.requires_grad}
    assert set(learned) == {
        "peft_model.prompt_encoder.default.embedding.weight", "learner.deep_prompts.0", "learner.deep_prompts.1",
        *(f"learner.couplings.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")),
    }  # fmt: skip
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values())
    assert all(p.grad is None for n, p in maple.named_parameters() if n not in learned)


def test_maple_init_text_longer_than_the_context_stays_as_text(tiny_clip_dir, tokenizer):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    config = PromptConfig(["red"], n_ctx=2, ctx_init="a photo of a", learner="maple")
    maple = PromptTunedCLIP.from_clip(clip, tokenizer, config)
    assert (maple.prompt_config.ctx_init, maple.prompt_config.template) == ("a photo", "of a {}.")
    full = tokenizer(["a photo of a red."])["input_ids"][0]
    assert maple.learner.prompt_input_ids[0, 3:].tolist() == full[3:]  # "of a red." [EOS] are the tokens
    assert maple.learner.prompt_context_index[0].tolist()[:3] == [-1, 0, 1]
    embeddings = clip.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(maple.context, embeddings[full[1:3]], rtol=0, atol=0)  # from "a", "photo"
    coop = PromptTunedCLIP.from_clip(clip, tokenizer, PromptConfig(["red"], n_ctx=2, ctx_init="a photo of a"))
    assert coop.prompt_config.n_ctx == 4  # CoOp's rule is unchanged


# ---- ProDA ----------------------------------------------------------------------------------------------------------


def test_proda_layout_is_the_released_split(tiny_clip_dir, tokenizer, class_names):
    assert class_token_positions(1) == ["end"]
    assert class_token_positions(32).count("front") == 8 and class_token_positions(32).count("middle") == 8
    proda = prompt_model(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, class_names, n_ctx=2, learner="proda",
                         proda_num_prompts=4)  # fmt: skip
    mean, spread = proda.learner.text_distribution(proda.clip, proda.context)
    vectors = [proda.context, *proda.learner.contexts]
    features = []
    for k, position in enumerate(["end", "end", "middle", "front"]):  # each prompt is a CoOp prompt of that layout
        coop = prompt_model(proda.clip, tokenizer, class_names, n_ctx=2, class_token_position=position)
        with torch.no_grad():
            coop.context.copy_(vectors[k])
        features.append(coop.text_features())
    features = torch.stack(features, dim=1)  # (C, K, D)
    torch.testing.assert_close(mean, features.mean(dim=1), atol=1e-6, rtol=0)
    centred = features - features.mean(dim=1, keepdim=True)
    covariance = torch.einsum("ikd,jkd->dij", centred, centred) / 5  # ProDA's estimate: / (K + 1)
    torch.testing.assert_close(torch.einsum("ikd,jkd->dij", spread, spread), covariance, atol=1e-6, rtol=0)


def test_proda_samples_its_contexts_as_released(tiny_clip_dir, tokenizer, class_names):
    """k of the K contexts per training step, cycling through a random order; mean and spread of those k only
    (spread / (k + 1)), gradients only into them; evaluation with all K."""
    proda = prompt_model(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, class_names, n_ctx=2, learner="proda",
                         proda_num_prompts=8)  # fmt: skip
    learner = proda.learner
    with torch.no_grad():
        mean, spread = learner.text_distribution(proda.clip, proda.context)  # eval mode: all K
    features = mean[:, None] + spread * 9**0.5  # (C, K, D): each prompt's unit features
    cycles = []
    for cycle in range(3):
        subsets = []
        for step in range(4 * cycle, 4 * cycle + 4):
            learner.select_prompts(step, 2, seed=5)
            subsets.append(learner.active_prompts.tolist())
        assert sorted(sum(subsets, [])) == list(range(8))  # each cycle uses every context once
        cycles.append(subsets)
    assert cycles[0] != cycles[1]  # a new order each cycle
    learner.select_prompts(5, 2, seed=5)
    assert learner.active_prompts.tolist() == cycles[1][1]  # (seed, step) alone: a resumed run draws the same
    proda.train()
    step_mean, step_spread = learner.text_distribution(proda.clip, proda.context)
    chosen = features[:, learner.active_prompts]
    torch.testing.assert_close(step_mean, chosen.mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(step_spread, (chosen - chosen.mean(dim=1, keepdim=True)) / 3**0.5, atol=1e-6, rtol=0)
    (step_mean.sum() + step_spread.sum()).backward()
    used = {k - 1 for k in learner.active_prompts.tolist() if k > 0}  # context k > 0 is learner.contexts[k - 1]
    for k in range(7):
        assert (learner.contexts.grad[k].abs().sum() > 0) == (k in used)
    assert (proda.context.grad is not None and proda.context.grad.abs().sum() > 0) == (0 in learner.active_prompts)


def test_proda_diversity_is_the_mean_absolute_cosine_of_its_class_free_prompts(tiny_clip_dir, tokenizer, class_names):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    proda = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner="proda", proda_num_prompts=4)
    features = []
    for vectors in [proda.context, *proda.learner.contexts]:  # "[SOS] ctx_k . [EOS]" is CoOp's prompt for "."
        coop = prompt_model(clip, tokenizer, ["."], n_ctx=2, template="{}")
        with torch.no_grad():
            coop.context.copy_(vectors)
        features.append(coop.text_features()[0].detach())
    cosine = [abs(float(u @ v)) for i, u in enumerate(features) for j, v in enumerate(features) if i != j]
    diversity = proda.learner.prompt_diversity(clip, proda.context)
    assert diversity.item() == pytest.approx(sum(cosine) / 12, abs=1e-6)


def test_proda_with_one_prompt_is_coop(tiny_clip_dir, tokenizer, class_names):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    proda = prompt_model(clip, tokenizer, class_names, n_ctx=3, learner="proda", proda_num_prompts=1)
    coop = prompt_model(clip, tokenizer, class_names, n_ctx=3)
    coop.learner.shares_prefix = False  # the same full forward as ProDA's (the shared prefix: test_shared_prefix)
    with torch.no_grad():
        coop.context.copy_(proda.context)
    x, labels = pixels(6), torch.tensor([0, 1, 2, 3, 0, 1])
    out, reference = proda.train()(pixel_values=x), coop(pixel_values=x)
    assert out.text_spread.abs().max() == 0
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=0)
    options = LossOptions(cmp_lambda=1.0, **OPTIONS)
    variance = margin_variance(out.image_features, out.text_spread, labels)
    loss, terms = training_objective(out.logits, labels, options, margin_variance=variance)
    coop_loss, _ = training_objective(reference.logits, labels, options)
    torch.testing.assert_close(terms["ce_bound"], F.cross_entropy(reference.logits, labels), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, coop_loss, atol=1e-5, rtol=0)


def test_the_bound_is_an_upper_bound_of_the_monte_carlo_expected_cross_entropy():
    """Sample class features from the Gaussian the spread describes; the bound must lie above the brute-force mean
    cross-entropy (within sampling error) and its margin variances must match the samples'."""
    generator = torch.Generator().manual_seed(0)
    batch, classes, prompts, dim, samples = 6, 5, 4, 8, 200_000
    x = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    mean = torch.randn(classes, dim, generator=generator, dtype=torch.float64) * 2
    spread = torch.randn(classes, prompts, dim, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = x @ mean.t()
    variance = margin_variance(x, spread, labels).double()
    bound = torch.stack([expected_cross_entropy_bound(logits[b : b + 1], labels[b : b + 1], variance[b : b + 1])
                         for b in range(batch)])  # fmt: skip
    noise = torch.randn(samples, prompts, dim, generator=generator, dtype=torch.float64)
    features = mean + torch.einsum("ckd,skd->scd", spread, noise)  # (S, C, D): Cov_d = spread spread^T
    sampled = torch.einsum("bd,scd->sbc", x, features)
    ce = F.cross_entropy(sampled.reshape(-1, classes), labels.repeat(samples), reduction="none").view(samples, -1)
    expected, error = ce.mean(dim=0), ce.std(dim=0) / samples**0.5
    margins = sampled - sampled.gather(2, labels[None, :, None].expand(samples, -1, 1))
    torch.testing.assert_close(variance, margins.var(dim=0), rtol=0.02, atol=1e-6)
    assert (bound >= expected - 4 * error).all(), (bound, expected)
    assert (bound - expected).max() > 10 * error.max()  # Jensen's gap is real here: the test can tell the two apart


@pytest.mark.parametrize(("overrides", "message"), [
    ({"focal_gamma": 2.0}, "Focal loss and label smoothing cannot train"),
    ({"label_smoothing_factor": 0.1}, "Focal loss and label smoothing cannot train"),
    ({"class_token_position": "middle"}, "ProDA places the class name itself"),
    ({"ctx_init": "a photo"}, "Leave ctx_init unset"),
    ({"class_specific_context": True}, "K contexts shared by all classes"),
])  # fmt: skip
def test_proda_refuses_what_it_cannot_train_with(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CMPConfig(output_dir=str(tmp_path), prompt_learner="proda", use_cpu=True, **overrides)


def test_maple_refuses_a_class_specific_context(tmp_path):
    with pytest.raises(ValueError, match="MaPLe couples one shared context"):
        CMPConfig(output_dir=str(tmp_path), prompt_learner="maple", class_specific_context=True, use_cpu=True)


# ---- every registered learner: save, load, transfer, gradients ------------------------------------------------------


@pytest.fixture(scope="module")
def other_clip(tokenizer):
    """Another base model: text width 48, so that every learner's own weights have other shapes."""
    torch.manual_seed(1)
    return CLIPModel(tiny_clip_config(tokenizer, hidden_size=48)).eval()


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_save_load_gives_identical_logits(tmp_path, tiny_clip_dir, tokenizer, class_names, learner):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner=learner, **LEARNERS[learner].test_options)
    model.prompt_config.base_model_name_or_path = tiny_clip_dir
    model.calibration = PostHocCalibration(temperature=1.7, dac_k=2)
    model.save_pretrained(tmp_path)
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(CalibratedCLIP.from_pretrained(tmp_path).logits(x), expected, rtol=0, atol=0)
        novel = loaded.for_classes(["pink", "cyan"])  # DAC's class scales from the learner's text features
        assert novel.calibration.class_scales.shape == (2,) and novel(pixel_values=x).logits.isfinite().all()


@pytest.mark.parametrize("learner", sorted(name for name, learner in LEARNERS.items() if learner.weights_name))
def test_the_learners_own_weights_file_is_checked(tmp_path, tiny_clip_dir, tokenizer, other_clip, class_names,
                                                  learner):  # fmt: skip
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    options = LEARNERS[learner].test_options
    model = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner=learner, **options)
    model.prompt_config.base_model_name_or_path = tiny_clip_dir
    model.save_pretrained(tmp_path)
    assert (tmp_path / model.learner.weights_name).exists()
    other = prompt_model(other_clip, tokenizer, class_names, n_ctx=2, learner=learner, **options)
    with pytest.raises(ValueError, match="come from another"):
        other.load_learner_weights(tmp_path)
    (tmp_path / model.learner.weights_name).unlink()
    with pytest.raises(FileNotFoundError, match=f"holds a {learner} prompt but has no {model.learner.weights_name}"):
        PromptTunedCLIP.from_pretrained(tmp_path)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_transfer_to_other_classes_carries_the_learner(tiny_clip_dir, tokenizer, class_names, learner):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    options = LEARNERS[learner].test_options
    model = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner=learner, **options)
    other = model.for_classes(["pink", "cyan"])
    fresh = prompt_model(clip, tokenizer, ["pink", "cyan"], seed=1, n_ctx=2, learner=learner, **options)
    with torch.no_grad():
        fresh.context.copy_(model.context)
        fresh.learner.load_extra_state_dict(model.learner.extra_state_dict())
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(pixel_values=x).logits, fresh(pixel_values=x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_gradients_reach_every_learned_tensor_and_only_those(tiny_clip_dir, tokenizer, class_names, learner):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = prompt_model(clip, tokenizer, class_names, n_ctx=2, learner=learner, **LEARNERS[learner].test_options)
    F.cross_entropy(model.train()(pixel_values=pixels(4)).logits, torch.tensor([0, 1, 2, 3])).backward()
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "peft_model.prompt_encoder.default.embedding.weight" in learned
    assert set(learned) - {"peft_model.prompt_encoder.default.embedding.weight"} == {
        f"learner.{n}" for n, _ in model.learner.named_parameters()
    }  # the context and the learner's own weights train, CLIP stays frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in learned)


# ---- in the trainer -------------------------------------------------------------------------------------------------


def make_config(tmp_path, **overrides) -> CMPConfig:
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                  per_device_train_batch_size=4, per_device_eval_batch_size=4, n_ctx=2, learning_rate=0.05, seed=7,
                  disable_tqdm=True)  # fmt: skip
    values.update(LEARNERS[overrides.get("prompt_learner", "coop")].test_options)
    values.update(overrides)
    return CMPConfig(**values)


def learned(model: PromptTunedCLIP) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_every_learner_trains_evaluates_and_saves_in_the_trainer(tmp_path, tiny_clip_dir, train_set, test_set,
                                                                 learner):  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=2, prompt_learner=learner),
                         train_dataset=train_set, eval_dataset={"test": test_set})  # fmt: skip
    context = trainer.model.context.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.context, context)
    # the optimiser holds the context and the learner's own weights (their gradients: the test above; CoCoOp's
    # one-unit meta-network on the tiny CLIP may sit in ReLU's flat part, so not every tensor need move here)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert len(optimised) == 1 + len(list(trainer.model.learner.parameters()))
    assert "eval_test_ece_pct" in trainer.evaluate()
    trainer.save_model()
    card, title = (tmp_path / "out" / "README.md").read_text(), LEARNERS[learner].title
    assert f"A calibrated {title} prompt" in card and f"| prompt learner | {title} (`{learner}`) |" in card


def test_maple_trains_on_images_and_says_why(tmp_path, tiny_clip_dir, train_set, caplog):
    with caplog.at_level(logging.WARNING, logger="cmp_hf.data.pipeline"):
        trainer = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path, max_steps=2, prompt_learner="maple"),
                             train_dataset=train_set)  # fmt: skip
    assert isinstance(trainer.data_collator, CLIPImageCollator) and trainer.input_pipeline.feature_cache is None
    assert "the maple learner prompts the image tower" in caplog.text


def test_proda_trains_on_the_bound_with_cmp(tmp_path, tiny_clip_dir, train_set):
    config = make_config(tmp_path, max_steps=2, prompt_learner="proda", logging_steps=1, kgcoop_weight=2.0,
                         mbls_weight=0.1, mbls_margin=0.5)  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    assert trainer.input_pipeline.feature_cache is not None  # ProDA's image features are the frozen tower's
    before = learned(trainer.model)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "ce_bound" in log]
    assert logs and all(log["ce_bound"] >= log["ce"] - 1e-6 for log in logs)  # a bound of E[CE], at least CE(mean)
    total = [log["ce_bound"] + log["cmp"] + 0.1 * log["mbls"] + 2.0 * log["kgcoop"] for log in logs]
    assert [log["loss"] for log in logs] == pytest.approx(total, abs=1e-4)  # bound + CMP + the baselines' terms
    assert all(not torch.equal(before[n], p) for n, p in learned(trainer.model).items())


def test_proda_released_recipe_in_the_trainer(tmp_path, tiny_clip_dir, train_set):
    config = make_config(tmp_path, max_steps=2, prompt_learner="proda", logging_steps=1, proda_prompts_per_step=2,
                         proda_diversity_weight=0.1)  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "diversity" in log]
    total = [log["ce_bound"] + log["cmp"] + 0.1 * log["diversity"] for log in logs]
    assert len(logs) == 2 and [log["loss"] for log in logs] == pytest.approx(total, abs=1e-4)
    assert len(trainer.model.learner.active_prompts) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"proda_prompts_per_step": 3}, "must divide proda_num_prompts"),
     ({"proda_num_prompts": 1, "proda_diversity_weight": 0.1}, "needs K >= 2"),
     ({"prompt_learner": "coop", "proda_diversity_weight": 0.1}, "are ProDA's")],
)  # fmt: skip
def test_proda_sampling_options_are_checked(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{"prompt_learner": "proda", **overrides})


def test_maple_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_clip_dir):
    data = colour_patches(["red", "green", "blue", "yellow"], per_class=4, seed=3)  # 16 rows: 2 steps of 8

    def final(name, **overrides):
        config = make_config(tmp_path / name, max_steps=2, prompt_learner="maple", **overrides)
        trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=data)
        trainer.train()
        return torch.cat([p.flatten() for p in learned(trainer.model).values()])

    start = final("start", learning_rate=0.0)
    full = final("full", per_device_train_batch_size=8)
    accumulated = final("ga", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    moved, gap = (full - start).abs().max().item(), (full - accumulated).abs().max().item()
    print(f"MaPLe GA equivalence: update {moved:.3e}, |batch 8 - 2 x batch 4| = {gap:.3e}")
    assert moved > 1e-3
    assert gap <= 1e-5 * moved  # unclipped (CMPConfig's default max_grad_norm is 0)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_resume_from_checkpoint_restores_the_learner(tmp_path, tiny_clip_dir, train_set, learner):
    full = CMPTrainer(model=tiny_clip_dir, args=make_config(tmp_path / "a", max_steps=4, prompt_learner=learner),
                      train_dataset=train_set)  # fmt: skip
    full.train()
    config = make_config(tmp_path / "b", max_steps=4, prompt_learner=learner, save_strategy="steps", save_steps=2)
    CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    saved = {ADAPTER_WEIGHTS_NAME, *filter(None, [full.model.learner.weights_name])}  # the learner's own file too
    assert saved <= {path.name for path in checkpoint.iterdir()}
    resumed = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = learned(full.model), learned(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)

"""PromptSRC: its prompts against MaPLe's checked forward, its self-regularisation and GPA against hand
computations, save/load, gradients, options, and a CMP training run."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, TrainerCallback, TrainerControl, TrainerState

from cmp_hf import CalibratedCLIP, CMPConfig, CMPTrainer, PromptTunedCLIP
from cmp_hf.learners import PromptSRCLearner
from cmp_hf.learners.promptsrc import IMAGENET_TEMPLATES, GaussianPromptAggregation, gpa_weights
from cmp_hf.losses import LossOptions, training_objective
from cmp_hf.prompts import PromptConfig
from cmp_hf.scripts.config_file import read_config

SMALL = {"prompt_depth_text": 3, "prompt_depth_vision": 3, "n_ctx_vision": 2}
RECIPE = Path(__file__).resolve().parents[1] / "recipes/configs/suite/learners/promptsrc.yaml"


@pytest.fixture(scope="module")
def clip(wide_clip):
    """Three layers per tower and a vision width (48) unlike the text width (32) (conftest's ``wide_clip``)."""
    return wide_clip


def pixels(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def promptsrc(clip, tokenizer, class_names, seed=0, options=SMALL, **fields) -> PromptTunedCLIP:
    """A PromptSRC prompt whose every learned tensor is far from its init, as after training."""
    torch.manual_seed(seed)
    config = PromptConfig(class_names=class_names, n_ctx=2, learner="promptsrc", learner_options=dict(options),
                          **fields)  # fmt: skip
    model = PromptTunedCLIP.from_clip(clip, tokenizer, config)
    with torch.no_grad():
        model.context.normal_(0, 0.5)
        for param in model.learner.parameters():
            param.normal_(0, 0.5)
    return model.eval()


def test_forward_shapes_and_independent_vision_prompts(clip, tokenizer, class_names):
    model = promptsrc(clip, tokenizer, class_names, options={**SMALL, "prompt_depth_vision": 2, "n_ctx_vision": 3})
    learner = model.learner
    assert [tuple(p.shape) for p in learner.deep_prompts] == [(2, 32)] * 2  # text depth 3: layers 1 and 2
    assert [tuple(p.shape) for p in learner.visual_prompts] == [(3, 48)] * 2  # vision depth 2: layers 0 and 1
    x = pixels()
    with torch.no_grad():
        out = model(pixel_values=x)
        assert (
            out.logits.shape == (5, 4) and out.text_features.shape == (4, 16) and out.image_features.shape == (5, 16)
        )
        before = out.image_features
        model.context.add_(1.0)  # the vision prompts do not depend on the text context (unlike MaPLe's)
        torch.testing.assert_close(model.image_features(x), before, rtol=0, atol=0)
        plain = F.normalize(clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        assert (before - plain).abs().max() > 1e-3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in clip.modules())  # a plain CLIP stays plain


def test_prompts_are_maples_with_uncoupled_vision_prompts(clip, tokenizer, class_names):
    """With MaPLe's couplings set to weight 0 and bias = PromptSRC's vision prompts, MaPLe (whose towers are
    checked against hand-written forwards in test_learners) computes PromptSRC's logits."""
    model = promptsrc(clip, tokenizer, class_names)
    maple = PromptTunedCLIP.from_clip(clip, tokenizer, PromptConfig(class_names=class_names, n_ctx=2, learner="maple",
                                                                    maple_prompt_depth=3)).eval()  # fmt: skip
    with torch.no_grad():
        maple.context.copy_(model.context)
        for theirs, ours in zip(maple.learner.deep_prompts, model.learner.deep_prompts, strict=True):
            theirs.copy_(ours)
        for prompt in model.learner.visual_prompts:  # a coupling's bias is one vector: PromptSRC's rows made equal
            prompt.copy_(prompt[0].expand_as(prompt))
        for coupling, prompt in zip(maple.learner.couplings, model.learner.visual_prompts, strict=True):
            coupling.weight.zero_()
            coupling.bias.copy_(prompt[0])
        x = pixels()
        torch.testing.assert_close(model(pixel_values=x).logits, maple(pixel_values=x).logits, rtol=0, atol=1e-5)


def brute_force_terms(clip, tokenizer, class_names, model, x):
    """The released losses, written out from frozen CLIP's own feature functions, template by template."""
    per_template = []
    for template in IMAGENET_TEMPLATES:
        tokens = tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt")
        per_template.append(clip.get_text_features(**tokens).pooler_output)
    frozen_text = torch.stack(per_template).mean(dim=0)
    frozen_text = frozen_text / frozen_text.norm(dim=-1, keepdim=True)
    frozen_image = clip.get_image_features(pixel_values=x).pooler_output
    frozen_image = frozen_image / frozen_image.norm(dim=-1, keepdim=True)
    out = model(pixel_values=x)
    zero_shot = clip.logit_scale.exp() * frozen_image @ frozen_text.t()
    p, log_p, log_q = zero_shot.softmax(dim=1), zero_shot.log_softmax(dim=1), out.logits.log_softmax(dim=1)
    return out, {
        "scl_text": (out.text_features - frozen_text).abs().mean(),
        "scl_image": (out.image_features - frozen_image).abs().mean(),
        "scl_logits": (p * (log_p - log_q)).sum() / out.logits.numel(),
    }


def test_regularization_is_the_released_self_regularisation(clip, tokenizer, class_names):
    model = promptsrc(clip, tokenizer, class_names).train()
    x = pixels()
    with torch.no_grad():
        out, expected = brute_force_terms(clip, tokenizer, class_names, model, x)
        terms = model.learner.regularization(clip, model.context, {"pixel_values": x}, out, None)
    assert list(terms) == list(expected)
    assert [term.weight for term in terms.values()] == [25.0, 10.0, 1.0]  # the released weights
    for name, value in expected.items():
        assert value > 1e-4
        torch.testing.assert_close(terms[name].value, value, rtol=1e-5, atol=1e-6)
    model.eval()
    assert model.learner.regularization(clip, model.context, {"pixel_values": x}, out, None) == {}  # training only


def test_objective_adds_the_weighted_terms_and_cmp(clip, tokenizer, class_names):
    model = promptsrc(clip, tokenizer, class_names, options={**SMALL, "text_loss_weight": 3.0}).train()
    x, labels = pixels(), torch.tensor([0, 1, 2, 3, 0])
    out = model(pixel_values=x)
    learner_terms = model.learner.regularization(clip, model.context, {"pixel_values": x}, out, None)
    options = LossOptions(cmp_lambda=0.5, cmp_form="log_ratio", cmp_competitors="all", label_smoothing_factor=0.0,
                          focal_gamma=0.0, mbls_weight=0.0, mbls_margin=10.0, kgcoop_weight=0.0)  # fmt: skip
    loss, terms = training_objective(out.logits, labels, options, learner_terms=learner_terms)
    by_hand = terms["ce"] + 0.5 * terms["cmp"] + 3.0 * terms["scl_text"] + 10.0 * terms["scl_image"]
    torch.testing.assert_close(loss, by_hand + terms["scl_logits"])


def test_gradient_reaches_both_towers_prompts(clip, tokenizer, class_names):
    model = promptsrc(clip, tokenizer, class_names).train()
    x = pixels()
    out = model(pixel_values=x)
    terms = model.learner.regularization(clip, model.context, {"pixel_values": x}, out, None)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3, 0])) + sum(t.weight * t.value for t in terms.values())
    loss.backward()
    learned = {"context": model.context, **dict(model.learner.named_parameters())}
    assert {name for name in learned if "visual" in name} and {name for name in learned if "deep" in name}
    for name, param in learned.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in clip.parameters())  # CLIP stays frozen


def test_gpa_weights_are_the_normalised_gaussian():
    weights = gpa_weights(15.0, 1.0, 20)
    density = torch.distributions.Normal(15.0, 1.0).log_prob(torch.arange(1, 21, dtype=torch.float64)).exp()
    torch.testing.assert_close(torch.tensor(weights, dtype=torch.float64), density / density.sum())
    assert max(range(20), key=weights.__getitem__) == 14 and math.isclose(sum(weights), 1.0)


def test_gpa_installs_the_weighted_average_of_the_epochs():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    frozen = model.bias.detach().clone()
    callback, state, control = GaussianPromptAggregation(2.0, 1.5), TrainerState(num_train_epochs=4), TrainerControl()
    callback.on_train_begin(None, state, control)
    snapshots = []
    for epoch in range(1, 5):
        with torch.no_grad():
            model.weight.normal_()
        snapshots.append(model.weight.detach().clone())
        state.epoch = epoch * (1 + 1e-12)  # Trainer's epoch counter, a float
        callback.on_epoch_end(None, state, control, model=model)
        if epoch < 4:  # nothing installed before the last epoch
            torch.testing.assert_close(model.weight, snapshots[-1], rtol=0, atol=0)
    weights = [math.exp(-0.5 * ((e - 2.0) / 1.5) ** 2) for e in range(1, 5)]
    expected = sum(w * s for w, s in zip(weights, snapshots, strict=True)) / sum(weights)
    torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.bias, frozen, rtol=0, atol=0)  # frozen weights untouched


def test_save_load_and_transfer(tmp_path, tiny_clip_dir, tokenizer, class_names):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = promptsrc(clip, tokenizer, class_names, options={"prompt_depth_vision": 1, "gpa_mean": 3})
    model.prompt_config.base_model_name_or_path = tiny_clip_dir
    model.save_pretrained(tmp_path)
    assert (tmp_path / "promptsrc_prompts.safetensors").exists()
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    assert loaded.prompt_config.learner_options == {"prompt_depth_vision": 1, "gpa_mean": 3}
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(CalibratedCLIP.from_pretrained(tmp_path).logits(x), expected, rtol=0, atol=0)
        novel = loaded.for_classes(["pink", "cyan"]).train()
        out = novel(pixel_values=x)
        assert out.logits.shape == (5, 2) and novel.learner.frozen_text_features(clip).shape == (2, 16)
    other = promptsrc(clip, tokenizer, class_names)  # depth 3 in both towers: other tensors
    with pytest.raises(ValueError, match="saved PromptSRC prompts .* come from another"):
        other.load_learner_weights(tmp_path)


@pytest.mark.parametrize(("options", "message"), [
    ({"gpa_men": 15.0}, r"\['gpa_men'\] are not options of PromptSRC"),
    ({"gpa_mean": "15"}, "gpa_mean of PromptSRC must be a float"),
    ({"n_ctx_vision": 2.5}, "n_ctx_vision of PromptSRC must be a int"),
    ({"prompt_depth_text": 0}, "must be >= 1"),
    ({"gpa_std": 0.0}, "gpa_std > 0"),
])  # fmt: skip
def test_options_are_checked_before_any_model(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        CMPConfig(output_dir=str(tmp_path), prompt_learner="promptsrc", learner_options=options)


def test_options_from_the_command_line_and_other_learners(tmp_path):
    config = CMPConfig(output_dir=str(tmp_path), prompt_learner="promptsrc", learner_options='{"gpa_mean": 6}')
    assert config.prompt_config(["a"]).learner_options == {"gpa_mean": 6}
    with pytest.raises(ValueError, match="must be a JSON object"):
        CMPConfig(output_dir=str(tmp_path), prompt_learner="promptsrc", learner_options="gpa_mean=6")
    with pytest.raises(ValueError, match=r"not options of CoOp \(its options: none\)"):
        CMPConfig(output_dir=str(tmp_path), learner_options={"gpa_mean": 6.0})


def test_recipe_is_the_released_one():
    recipe = read_config(str(RECIPE))
    config = CMPConfig(output_dir="unused", **recipe)
    prompt = config.prompt_config(["a"])
    assert (config.learning_rate, config.per_device_train_batch_size, config.num_train_epochs) == (0.0025, 4, 20)
    assert prompt.n_ctx == 4 and prompt.ctx_init == "a photo of a"
    resolved = {name: PromptSRCLearner.option(prompt, name) for name in PromptSRCLearner.options}
    assert resolved == {"prompt_depth_text": 9, "prompt_depth_vision": 9, "n_ctx_vision": 4, "text_loss_weight": 25,
                        "image_loss_weight": 10, "gpa_mean": 15, "gpa_std": 1}  # fmt: skip


def test_trains_with_cmp_and_ends_on_the_aggregate(tmp_path, tiny_clip_dir, train_set):
    snapshots = []

    class Snapshots(TrainerCallback):  # runs before the learner's GPA callback (user callbacks come first)
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    config = CMPConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no",
                       per_device_train_batch_size=4, n_ctx=2, learning_rate=0.02, seed=7, disable_tqdm=True,
                       num_train_epochs=4, logging_steps=1, prompt_learner="promptsrc", cmp_lambda=1.0,
                       learner_options={**SMALL, "prompt_depth_text": 2, "prompt_depth_vision": 2,
                                        "gpa_mean": 3.0, "gpa_std": 1.0})  # fmt: skip
    trainer = CMPTrainer(model=tiny_clip_dir, args=config, train_dataset=train_set, callbacks=[Snapshots()])
    trainer.train()
    logs = [log for log in trainer.state.log_history if "scl_text" in log]
    assert len(logs) == 16  # 16 images / batch 4 x 4 epochs
    for log in logs:  # the logged loss is CE + CMP + the weighted self-regularisation
        total = log["ce"] + log["cmp"] + 25 * log["scl_text"] + 10 * log["scl_image"] + log["scl_logits"]
        assert log["loss"] == pytest.approx(total, abs=1e-4)
    first, last = (sum(log["loss"] for log in part) / 4 for part in (logs[:4], logs[-4:]))
    assert last < first
    weights = gpa_weights(3.0, 1.0, 4)
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            expected = sum(w * snap[name] for w, snap in zip(weights, snapshots, strict=True))
            torch.testing.assert_close(param.detach(), expected)

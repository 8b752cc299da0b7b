import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

from cmp_hf.learners import learner_class
from cmp_hf.modeling import PromptTunedCLIP, PromptTunedCLIPOutput
from cmp_hf.prompts import PromptConfig


def trained_like(clip_dir: str, class_names: list[str], **options) -> PromptTunedCLIP:
    """A prompt whose context is far from its init, as after training."""
    config = PromptConfig(class_names=class_names, n_ctx=3, **options)
    model = PromptTunedCLIP.from_clip(
        CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir), config
    )  # fmt: skip
    with torch.no_grad():
        model.context.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def model(tiny_clip_dir, class_names):
    return trained_like(tiny_clip_dir, class_names, class_token_position="middle")


def pixels(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_only_the_context_is_trainable(model):
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["peft_model.prompt_encoder.default.embedding.weight"]
    assert not model.clip.logit_scale.requires_grad


def test_gradient_reaches_the_context_only(model):
    logits = model(pixel_values=pixels()).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])).backward()
    assert model.context.grad is not None and model.context.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if "prompt_encoder" not in name)


def test_logits_are_scaled_cosines(model):
    out = model(pixel_values=pixels())
    cos = out.image_features @ out.text_features.t()
    torch.testing.assert_close(out.logits, model.clip.logit_scale.exp() * cos)
    assert out.logits.shape == (5, 4)
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(4))


def test_cached_image_features_give_the_same_logits(model):
    x = pixels()
    torch.testing.assert_close(
        model(image_features=model.image_features(x)).logits, model(pixel_values=x).logits, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="exactly one of pixel_values or image_features"):
        model()


def test_fixed_text_features_runs_the_text_encoder_once(model):
    calls = []
    handle = model.clip.text_model.register_forward_hook(lambda *args: calls.append(1))
    expected = model(pixel_values=pixels()).logits
    calls.clear()
    with model.fixed_text_features():
        for _ in range(3):
            torch.testing.assert_close(model(pixel_values=pixels()).logits, expected)
    handle.remove()
    assert len(calls) == 1
    model(pixel_values=pixels())  # outside the block, features are recomputed (they depend on the context)
    assert model._fixed_text_features is None


def test_save_writes_a_standard_adapter(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "prompt_config.json"} <= set(os.listdir(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".bin", ".pt", ".pkl"))]
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "PROMPT_TUNING" and adapter_config["num_virtual_tokens"] == 3
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(weights["prompt_embeddings"], model.context.detach())
    prompt = json.loads((tmp_path / "prompt_config.json").read_text())
    assert prompt["class_names"] == model.class_names and prompt["class_token_position"] == "middle"


def test_save_load_gives_identical_logits(model, tmp_path, tiny_clip_dir):
    model.save_pretrained(tmp_path)
    loaded = PromptTunedCLIP.from_pretrained(tmp_path)  # base CLIP found through prompt_config.json
    assert loaded.prompt_config == model.prompt_config
    x = pixels()
    torch.testing.assert_close(loaded.eval()(pixel_values=x).logits, model(pixel_values=x).logits, rtol=0, atol=0)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "peft_model.prompt_encoder.default.embedding.weight"
    ]


# plain peft, as a user without cmp_hf calls it: peft 0.21 reads a property transformers 5.24 deprecates
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_plain_peft_restores_the_prompt_vectors(model, tmp_path, tiny_clip_dir):
    model.save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), tmp_path)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, model.context)


def test_load_without_prompt_config_names_the_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "prompt_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no prompt_config.json"):
        PromptTunedCLIP.from_pretrained(tmp_path)


def test_load_with_mismatched_shapes_names_the_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    prompt = json.loads((tmp_path / "prompt_config.json").read_text())
    prompt["n_ctx"] = 5
    (tmp_path / "prompt_config.json").write_text(json.dumps(prompt))
    with pytest.raises(ValueError, match="do not match the digest recorded in prompt_digest.json"):
        PromptTunedCLIP.from_pretrained(tmp_path)  # an edited config is caught by the digest first
    with pytest.raises(ValueError, match="adapter_config.json describes prompt vectors"):
        PromptTunedCLIP.from_pretrained(tmp_path, verify_digest=False)  # and without it, by the shapes


def test_load_without_base_model_asks_for_one(model, tmp_path, tiny_clip_dir):
    model.prompt_config.base_model_name_or_path = None
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="names no base model"):
        PromptTunedCLIP.from_pretrained(tmp_path)
    loaded = PromptTunedCLIP.from_pretrained(
        tmp_path, clip=CLIPModel.from_pretrained(tiny_clip_dir), tokenizer=CLIPTokenizer.from_pretrained(tiny_clip_dir)
    )
    torch.testing.assert_close(loaded.context, model.context, rtol=0, atol=0)


def test_context_transfers_to_other_classes(model, tiny_clip_dir):
    other = model.for_classes(["pink", "cyan"])
    assert other.class_names == ["pink", "cyan"] and other.clip is model.clip
    torch.testing.assert_close(other.context, model.context, rtol=0, atol=0)
    fresh = PromptTunedCLIP.from_clip(
        CLIPModel.from_pretrained(tiny_clip_dir), model.tokenizer,
        PromptConfig(class_names=["pink", "cyan"], n_ctx=3, class_token_position="middle"),
    )  # fmt: skip
    with torch.no_grad():
        fresh.context.copy_(model.context)
    x = pixels()
    torch.testing.assert_close(other.eval()(pixel_values=x).logits, fresh.eval()(pixel_values=x).logits)
    # the original prompt is unaffected by the second adapter on the same CLIP
    before = model(pixel_values=x).logits
    other(pixel_values=x)
    torch.testing.assert_close(model(pixel_values=x).logits, before, rtol=0, atol=0)


def test_class_specific_context_does_not_transfer(tiny_clip_dir):
    config = PromptConfig(class_names=["red", "blue"], n_ctx=2, class_specific_context=True)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    csc = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config)
    with pytest.raises(ValueError, match="class-specific context"):
        csc.for_classes(["green"])


@pytest.fixture
def cocoop(tiny_clip_dir, class_names):
    torch.manual_seed(0)  # the random draws below make the test deterministic
    model = trained_like(tiny_clip_dir, class_names, learner="cocoop")
    with torch.no_grad():
        for param in model.learner.meta_net.parameters():
            param.normal_(0, 2.0)
        model.learner.meta_net[0].bias.fill_(
            2.0
        )  # the tiny model's meta-net has one hidden unit (16 // 16): keep it on
    return model.eval()


def test_cocoop_prompts_depend_on_the_image(cocoop):
    features = cocoop.image_features(pixels(2))
    text = cocoop.text_features(features)
    assert text.shape == (2, 4, 16)
    assert (text[0] - text[1]).abs().max() > 1e-3
    # each image's prompts equal the plain prompts with the context moved by that image's meta-net bias
    shifted = cocoop.context + cocoop.learner.meta_net(features[1])
    learner = cocoop.learner
    expected = learner.encode_prompts(cocoop.clip, shifted, learner.prompt_input_ids, learner.prompt_context_index)
    torch.testing.assert_close(text[1], expected, atol=1e-6, rtol=0)


def test_cocoop_meta_net_and_context_receive_gradients(cocoop):
    logits = cocoop(pixel_values=pixels(3)).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert cocoop.context.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cocoop.learner.meta_net.parameters())
    trainable = {n for n, p in cocoop.named_parameters() if p.requires_grad}
    meta_net = {f"learner.meta_net.{layer}.{kind}" for layer in (0, 2) for kind in ("weight", "bias")}
    assert trainable == {"peft_model.prompt_encoder.default.embedding.weight", *meta_net}


def test_cocoop_with_a_silent_meta_net_is_coop(cocoop, tiny_clip_dir, class_names):
    with torch.no_grad():
        cocoop.learner.meta_net[2].weight.zero_()
        cocoop.learner.meta_net[2].bias.zero_()
    coop = PromptTunedCLIP.from_clip(
        cocoop.clip, cocoop.tokenizer, PromptConfig(class_names=class_names, n_ctx=3)
    ).eval()  # fmt: skip
    with torch.no_grad():
        coop.context.copy_(cocoop.context)
    x = pixels()
    # logits are 100 x cosines, and a batch of contexts rounds differently in fp32 than one: relative 1e-5
    torch.testing.assert_close(cocoop(pixel_values=x).logits, coop(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_cocoop_save_load_and_transfer(cocoop, tmp_path):
    cocoop.save_pretrained(tmp_path)
    assert (tmp_path / "meta_net.safetensors").exists()
    loaded = PromptTunedCLIP.from_pretrained(tmp_path).eval()
    x = pixels()
    torch.testing.assert_close(loaded(pixel_values=x).logits, cocoop(pixel_values=x).logits, rtol=0, atol=0)
    other = cocoop.for_classes(["pink", "cyan"])
    torch.testing.assert_close(other.learner.meta_net[0].weight, cocoop.learner.meta_net[0].weight, rtol=0, atol=0)
    (tmp_path / "meta_net.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds a cocoop prompt but has no meta_net.safetensors"):
        PromptTunedCLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="class_specific_context must be off"):
        learner_class(PromptConfig(class_names=["a"], learner="cocoop", class_specific_context=True))


FIXTURES = Path(__file__).parent / "fixtures" / "saved_by_v0_1"


@pytest.mark.parametrize("learner", ["coop", "cocoop"])
def test_prompts_saved_by_v0_1_load_with_identical_logits(learner):
    """Prompts written by cmp_hf 0.1.0 (before the learner interface) on a tiny CLIP, with temperature 1.5 and
    DAC k=2, and the logits that version computed for them and for a transfer to three other classes. Equal up to
    float32 rounding: 0.1.0 divided the logit scale by T, the calibration now divides the logits."""
    clip_dir = str(FIXTURES / "clip")
    expected = load_file(str(FIXTURES / "expected_logits.safetensors"))
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    model = PromptTunedCLIP.from_pretrained(FIXTURES / learner, clip=clip, tokenizer=tokenizer).eval()
    assert (model.learner.name, model.calibration.temperature, model.calibration.dac_k) == (learner, 1.5, 2)
    features = expected["image_features"]
    with torch.no_grad():
        logits = model(image_features=features).logits
        transferred = model.for_classes(["purple", "white", "red"])(image_features=features).logits
    pairs = ((logits, expected[f"{learner}_logits"]), (transferred, expected[f"{learner}_transfer_logits"]))
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
        assert torch.equal(ours.argmax(1), theirs.argmax(1))


@pytest.mark.parametrize("per_image_text", [False, True], ids=["class-text", "per-image-text"])
def test_first_rows_cut_what_is_per_image_and_keep_what_is_per_class(per_image_text):
    """What a padded eval batch's loss is computed from: CoCoOp's text features are per image, CoOp's per class."""
    batch, classes, dim = 5, 3, 4
    text = torch.randn(batch, classes, dim) if per_image_text else torch.randn(classes, dim)
    spread = torch.randn(classes, 2, dim)
    outputs = PromptTunedCLIPOutput(
        logits=torch.randn(batch, classes), image_features=torch.randn(batch, dim), text_features=text,
        text_spread=spread,
    )  # fmt: skip
    first = outputs.first_rows(2)
    torch.testing.assert_close(first.logits, outputs.logits[:2])
    torch.testing.assert_close(first.image_features, outputs.image_features[:2])
    torch.testing.assert_close(first.text_features, text[:2] if per_image_text else text)
    assert first.text_spread is spread

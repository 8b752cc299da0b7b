import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from cmp_hf.modeling import PromptTunedCLIP
from cmp_hf.prompts import PromptConfig, replaced_embeddings, tokenize_prompts


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_layout(tokenizer, position):
    config = PromptConfig(class_names=["red", "light_blue"], n_ctx=4, class_token_position=position)
    tokens = tokenize_prompts(config, tokenizer, max_positions=77)
    bos, eos, dot = tokenizer.bos_token_id, tokenizer.eos_token_id, ids(tokenizer, ".")
    for c, name in enumerate(["red", "light blue"]):  # underscores read as spaces
        name_ids = ids(tokenizer, name)
        length = 1 + 4 + len(name_ids) + len(dot) + 1
        row, index = tokens.input_ids[c, :length].tolist(), tokens.context_index[c, :length].tolist()
        assert row[0] == bos and row[-1] == eos and row[-1 - len(dot) : -1] == dot
        ctx_positions = [i for i, k in enumerate(index) if k >= 0]
        name_start = {"end": 5, "middle": 3, "front": 1}[position]
        assert row[name_start : name_start + len(name_ids)] == name_ids
        expected_ctx = {
            "end": [1, 2, 3, 4],
            "middle": [1, 2, 3 + len(name_ids), 4 + len(name_ids)],
            "front": [1 + len(name_ids) + i for i in range(4)],
        }[position]
        assert ctx_positions == expected_ctx
        assert [index[i] for i in ctx_positions] == [0, 1, 2, 3]  # shared context
        assert tokens.attention_mask[c].tolist() == [1] * length + [0] * (tokens.input_ids.shape[1] - length)
        assert (tokens.input_ids[c, :length] == eos).sum() == 1  # placeholders are never EOS


def test_class_specific_context_indexes_one_block_per_class(tokenizer):
    config = PromptConfig(class_names=["red", "green", "blue"], n_ctx=2, class_specific_context=True)
    tokens = tokenize_prompts(config, tokenizer, max_positions=77)
    for c in range(3):
        assert sorted(k for k in tokens.context_index[c].tolist() if k >= 0) == [2 * c, 2 * c + 1]
    assert config.num_context_vectors == 6


def test_template_wraps_the_class_name(tokenizer):
    config = PromptConfig(class_names=["red"], n_ctx=2, template="a {} photo.")
    row = tokenize_prompts(config, tokenizer, max_positions=77).input_ids[0].tolist()
    assert row[3:-1] == ids(tokenizer, "a red") + ids(tokenizer, " photo.")


def test_prompts_are_padded_only_to_the_longest(tokenizer):
    config = PromptConfig(class_names=["red", "green yellow blue"], n_ctx=3)
    tokens = tokenize_prompts(config, tokenizer, max_positions=77)
    assert tokens.input_ids.shape[1] == 1 + 3 + len(ids(tokenizer, "green yellow blue")) + 1 + 1


def test_too_long_class_name_names_the_class(tokenizer):
    config = PromptConfig(class_names=["red", "zzzzzzzzzzzz qqqqqqqqqq"], n_ctx=16)
    with pytest.raises(ValueError, match="'zzzzzzzzzzzz qqqqqqqqqq' needs 41 tokens .* at most 30"):
        tokenize_prompts(config, tokenizer, max_positions=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_names": []}, "class_names is empty"),
        ({"class_names": ["red", "red"]}, "duplicate: 'red' at positions 0 and 1"),
        ({"class_names": ["red", " "]}, "empty or non-string entries at positions \\[1\\]"),
        ({"class_names": ["red"], "n_ctx": 0}, "n_ctx must be >= 1"),
        ({"class_names": ["red"], "class_token_position": "left"}, "class_token_position"),
        ({"class_names": ["red"], "template": "a photo"}, "exactly once"),
        ({"class_names": ["red"], "ctx_init": "  "}, "ctx_init is empty"),
    ],
)
def test_bad_prompt_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**kwargs)


def test_ctx_init_sets_length_and_vectors(tiny_clip_dir, tokenizer):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    config = PromptConfig(class_names=["red", "blue"], ctx_init="a photo of a", class_specific_context=True)
    model = PromptTunedCLIP.from_clip(clip, tokenizer, config)
    assert model.prompt_config.n_ctx == 4
    init_ids = torch.tensor(ids(tokenizer, "a photo of a"))
    expected = clip.text_model.embeddings.token_embedding.weight[init_ids]
    assert torch.equal(model.context.detach(), torch.cat([expected, expected]).detach())


def test_random_init_has_coop_scale(tiny_clip_dir, tokenizer):
    torch.manual_seed(0)
    model = PromptTunedCLIP.from_clip(
        CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, PromptConfig(class_names=["red"], n_ctx=64)
    )
    assert model.context.std().item() == pytest.approx(0.02, rel=0.1)


def reference_text_features(model: PromptTunedCLIP, length: int = 77, legacy_pooling: bool = False) -> torch.Tensor:
    """CoOp's way: every prompt padded with zeros to 77 tokens, no attention mask, pooled at EOS."""
    learner = model.learner
    ids77 = torch.zeros(learner.prompt_input_ids.shape[0], length, dtype=torch.long)
    index77 = torch.full_like(ids77, -1)
    short = learner.prompt_input_ids.shape[1]
    real = learner.prompt_attention_mask.bool()
    ids77[:, :short] = torch.where(real, learner.prompt_input_ids, 0)
    index77[:, :short] = learner.prompt_context_index
    clip = model.clip
    clip.text_model.eos_token_id = 2 if legacy_pooling else model.tokenizer.eos_token_id
    try:
        with replaced_embeddings(clip.text_model.embeddings.token_embedding, model.context, index77):
            pooled = clip.text_model(input_ids=ids77).pooler_output
    finally:
        clip.text_model.eos_token_id = model.tokenizer.eos_token_id
    return F.normalize(clip.text_projection(pooled), dim=-1)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("legacy_pooling", [False, True])
def test_truncated_prompts_match_77_token_prompts(tiny_clip_dir, tokenizer, position, legacy_pooling):
    config = PromptConfig(
        class_names=["red", "green blue", "yellow"], n_ctx=5, class_token_position=position
    )  # fmt: skip
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config)
    with torch.no_grad():
        model.context.normal_(0, 1)
    if legacy_pooling:
        model.clip.text_model.eos_token_id = 2
    short = model.text_features()
    model.clip.text_model.eos_token_id = tokenizer.eos_token_id
    assert model.learner.prompt_input_ids.shape[1] < 20
    torch.testing.assert_close(short, reference_text_features(model, legacy_pooling=legacy_pooling), atol=1e-5, rtol=0)


def test_hook_is_inert_outside_the_prompt_forward(tiny_clip_dir, tokenizer):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    text = tokenizer(["a photo of a red", "blue"], padding=True, return_tensors="pt")
    before = clip.get_text_features(**text).pooler_output
    model = PromptTunedCLIP.from_clip(clip, tokenizer, PromptConfig(class_names=["red"], n_ctx=2))
    model.text_features()
    torch.testing.assert_close(clip.get_text_features(**text).pooler_output, before, rtol=0, atol=0)
    assert not clip.text_model.embeddings.token_embedding._forward_hooks  # no prompt leaves a hook behind
    model.for_classes(["blue"]).text_features()
    assert not clip.text_model.embeddings.token_embedding._forward_hooks


def test_fixed_length_padding(tiny_clip_dir, tokenizer):
    config = PromptConfig(class_names=["red", "green"], n_ctx=4)
    model = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config, pad_prompts_to=77)
    assert model.learner.prompt_input_ids.shape == (2, 77)
    short = PromptTunedCLIP.from_clip(CLIPModel.from_pretrained(tiny_clip_dir), tokenizer, config)
    with torch.no_grad():
        short.context.copy_(model.context)
    torch.testing.assert_close(model.text_features(), short.text_features(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pad_to=5 must lie between the longest prompt"):
        tokenize_prompts(config, tokenizer, max_positions=77, pad_to=5)


def test_old_config_name_still_imports():
    """Code written before the rename (``CoOpPromptConfig``) keeps working: it is the same class."""
    import cmp_hf
    from cmp_hf.prompts import CoOpPromptConfig

    assert CoOpPromptConfig is cmp_hf.CoOpPromptConfig is cmp_hf.PromptConfig

from transformers import CLIPModel, CLIPProcessor

from cmp_hf.testing.tiny import save_tiny_clip, tiny_tokenizer


def test_tokenizer_merges_words_and_keeps_specials_last():
    tokenizer = tiny_tokenizer(["photo", "red"])
    assert len(tokenizer(["photo"], add_special_tokens=False)["input_ids"][0]) == 1
    assert len(tokenizer(["unseen"], add_special_tokens=False)["input_ids"][0]) == 6  # byte fallback
    ids = tokenizer("A Red photo.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer("a Red")["input_ids"] == tokenizer("a red")["input_ids"]  # CLIP lower-cases


def test_saved_tiny_clip_loads_with_from_pretrained(tmp_path):
    save_tiny_clip(str(tmp_path), words=["red"], seed=1)
    model = CLIPModel.from_pretrained(tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path)
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.image_processor.crop_size["height"] == model.config.vision_config.image_size

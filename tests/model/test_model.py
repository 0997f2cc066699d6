"""Behaviour of the composed model: generation with/without cache, save/load, Auto classes, errors."""

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmkit.errors import ImageTokenMismatchError
from vlmkit.model.tokens import image_token_spec, num_image_tokens


def _prompt_inputs(processor, n_images=1, question="What colour is the circle?"):
    images = [Image.new("RGB", (40 + 7 * i, 30), (200, 30 * i, 10)) for i in range(n_images)]
    messages = [{"role": "user", "content": "<image>\n" * n_images + question}]
    crops = [processor.image_processor.num_crops(im.size) for im in images]
    ids = processor.encode_text(messages, crops, add_generation_prompt=True)["input_ids"][None]
    pixel_values, _ = processor.pixel_values(images)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values}


@pytest.mark.parametrize("n_images", [1, 2])
def test_generation_with_and_without_kv_cache_gives_identical_tokens(tiny, n_images):
    model = tiny.model.eval()
    inputs = _prompt_inputs(tiny.processor, n_images)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 12
    assert torch.equal(cached, uncached)


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model = tiny.model.eval()
    model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")), "weights must be saved as safetensors only"
    loaded = type(model).from_pretrained(tmp_path).eval()
    inputs = _prompt_inputs(tiny.processor)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_auto_classes_load_a_saved_model(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert config.model_type == "vlmkit"
    assert type(model).__name__ == "VLMForConditionalGeneration"
    assert type(processor).__name__ == "VLMProcessor"
    assert processor.image_token_spec == tiny.processor.image_token_spec
    assert processor.tokenizer.get_vocab() == tiny.processor.tokenizer.get_vocab()
    # The standard transformers call: prompt text with markers plus images.
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat?"}], tokenize=False,
                                                   add_generation_prompt=True)  # fmt: skip
    batch = processor(text=text, images=Image.new("RGB", (32, 32)))
    with torch.no_grad():
        expected = tiny.model.eval()(**batch).logits
        assert torch.equal(model(**batch).logits, expected)


def test_processor_and_model_agree_on_the_image_token_count(tiny):
    spec = image_token_spec(tiny.model.config)
    assert spec == tiny.processor.image_token_spec
    inputs = _prompt_inputs(tiny.processor)
    n_placeholders = int((inputs["input_ids"] == tiny.model.config.image_token_id).sum())
    assert n_placeholders == num_image_tokens(spec) == tiny.model.get_image_features(inputs["pixel_values"]).shape[0]


def test_placeholder_count_mismatch_raises_a_clear_error(tiny):
    inputs = _prompt_inputs(tiny.processor)
    image_id = tiny.model.config.image_token_id
    ids = inputs["input_ids"]
    first = int((ids[0] == image_id).nonzero()[0])
    truncated = torch.cat([ids[:, :first + 3], ids[:, first + 5:]], dim=1)  # two placeholders fewer
    with pytest.raises(ImageTokenMismatchError, match="placeholder tokens but its 1 image crop"):
        tiny.model(input_ids=truncated, pixel_values=inputs["pixel_values"])
    with pytest.raises(ImageTokenMismatchError, match="no pixel_values"):
        tiny.model(input_ids=inputs["input_ids"])


def test_unused_encoder_parts_are_frozen(tiny):
    frozen = [n for n, p in tiny.model.named_parameters() if not p.requires_grad]
    assert frozen and all("post_layernorm" in n or ".head." in n for n in frozen)

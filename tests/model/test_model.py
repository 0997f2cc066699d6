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
    ids = processor.encode_text(messages, processor.plans(images), add_generation_prompt=True)["input_ids"][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} | processor.image_inputs(images)


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


def test_training_scores_only_supervised_positions_with_the_same_loss_and_gradients(tiny, train_records):
    from vlmkit.data.dataset import Collator, ConversationDataset

    dataset = ConversationDataset(train_records[:4], tiny.processor, max_length=1024)
    batch = Collator(tiny.processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    model = tiny.model
    results = {}
    for training in (True, False):
        model.train(training)
        model.zero_grad()
        out = model(**batch, num_items_in_batch=torch.tensor(supervised))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[training] = out, grads
    (trained, trained_grads), (full, full_grads) = results[True], results[False]
    assert trained.logits.shape == (supervised, full.logits.shape[-1])  # one row per supervised position
    assert full.logits.shape[:2] == batch["input_ids"].shape
    assert torch.allclose(trained.loss, full.loss, atol=1e-6)
    assert trained_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        assert torch.allclose(trained_grads[name], grad, atol=1e-6), name


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
                                                   add_generation_prompt=True)
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


@pytest.mark.parametrize("vision_config", [None, {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                                                  "depths": [1, 1], "groups_width": 8, "layer_type": "y"}])
def test_composed_language_model_stays_causal(train_records, vision_config):
    """Regression: a composite config made without attn_implementation once left the LM with
    none, and it silently attended to later tokens (training loss fell to ~0, eval was chance)."""
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts
    from tests.conftest import tiny_model_config  # noqa: I001 -- the shared tiny config

    extra = {"vision_config": vision_config, "image_size": 32} if vision_config else {}
    model = build(tiny_model_config(**extra), training_texts=lambda: _texts(train_records)).model.eval()
    ids = torch.randint(10, 300, (1, 12))
    changed = ids.clone()
    changed[0, 8] = 5
    with torch.no_grad():
        before, after = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert torch.equal(before[0, :8], after[0, :8]), "earlier positions must not see later tokens"
    assert not torch.equal(before[0, 8:], after[0, 8:])


def test_init_from_a_saved_cnn_model_gives_identical_logits(train_records, tmp_path):
    """`model.init_from` (the align -> SFT hand-over) must load every tower type, CNNs included."""
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts
    from tests.conftest import tiny_model_config  # noqa: I001

    regnet = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
              "groups_width": 8, "layer_type": "y"}
    built = build(tiny_model_config(vision_config=regnet, image_size=32), training_texts=lambda: _texts(train_records))
    built.model.eval().save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    again = build(tiny_model_config(init_from=str(tmp_path)))
    inputs = _prompt_inputs(again.processor)
    with torch.no_grad():
        assert torch.equal(built.model(**inputs).logits, again.model.eval()(**inputs).logits)

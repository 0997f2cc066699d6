"""The default composition on the real checkpoints: DINOv2-small + SmolLM2-135M-Instruct.

Pins what composing must leave alone (the LM's logits, vocabulary, chat template and special
tokens) and what it adds (one `<image>` row, assistant-only labels under the LM's own template,
the feature cache, a probed prefix count for an unlisted ViT family). Images are 56 px (4x4
DINOv2 patches) so that every test takes a few seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import tiny_model_config  # noqa: I001 -- pytest has imported it under this name

from vlmkit.config import ModelConfig
from vlmkit.data.dataset import Collator
from vlmkit.errors import ConfigError
from vlmkit.model import vision
from vlmkit.model.build import build
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.feature_cache import FeatureCache
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.model.tokens import IGNORE_INDEX
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.tokenizer_training import LAYOUT_TOKENS

LM, DINO = "HuggingFaceTB/SmolLM2-135M-Instruct", "facebook/dinov2-small"
LM_VOCAB = 49152
SYSTEM = {"role": "system", "content": "You answer in one sentence."}
REPLIES = ("It is red.", "Blue, I think.")
CHAT = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": REPLIES[0]},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": REPLIES[1]}]
TEXT_CHAT = [{"role": "user", "content": "Name a primary colour."},
             {"role": "assistant", "content": "Red is a primary colour."},
             {"role": "user", "content": "And another?"}]


def composition(**overrides) -> ModelConfig:
    return ModelConfig(**{"vision": DINO, "lm": LM, "projector": "mlp", "vision_feature_layer": -2, "image_size": 56,
                          **overrides})


def shape_image(colour, size=64) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return image


@pytest.fixture(scope="module")
def built(pretrained_checkpoints):
    torch.manual_seed(0)
    result = build(composition())
    result.model.eval()
    return result


@pytest.fixture(scope="module")
def base(pretrained_checkpoints):
    """SmolLM2 alone, as transformers loads it: model (eval) and tokenizer."""
    directory = pretrained_checkpoints[LM]
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_text_only_input_gives_the_bare_lms_logits(built, base):
    lm, tokenizer = base
    ids = tokenizer.apply_chat_template(TEXT_CHAT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        composed, alone = built.model(input_ids=ids).logits, lm(input_ids=ids).logits
    assert composed.shape[-1] == LM_VOCAB + 1
    assert (composed[..., :LM_VOCAB] - alone).abs().max().item() < 1e-5


def test_vocabulary_gains_the_image_token_and_nothing_else(built, base):
    _, tokenizer = base
    ours = built.processor.tokenizer
    assert set(ours.get_vocab()) - set(tokenizer.get_vocab()) == {"<image>"}
    assert len(ours) == built.model.get_input_embeddings().num_embeddings == LM_VOCAB + 1
    assert built.model.config.image_token_id == ours.convert_tokens_to_ids("<image>") == LM_VOCAB
    assert built.model.generation_config.suppress_tokens == [LM_VOCAB]  # never generated


def test_sliced_layout_adds_its_boundary_tokens(base):
    _, tokenizer = base
    sliced = build(composition(slicing="minicpm"))
    ours = sliced.processor.tokenizer
    assert set(ours.get_vocab()) - set(tokenizer.get_vocab()) == {"<image>", *LAYOUT_TOKENS}
    assert len(ours) == sliced.model.get_input_embeddings().num_embeddings == LM_VOCAB + 1 + len(LAYOUT_TOKENS)


def _assert_renders_as_the_base(processor, tokenizer):
    ours = processor.tokenizer
    assert processor.chat_template == ours.chat_template == tokenizer.chat_template
    for name in ("eos_token", "pad_token", "bos_token"):
        assert getattr(ours, name) == getattr(tokenizer, name), name
        assert getattr(ours, name + "_id") == getattr(tokenizer, name + "_id"), name
    assert ours.eos_token == "<|im_end|>"
    for conversation in (TEXT_CHAT, [SYSTEM, *TEXT_CHAT]):
        for prompt in (False, True):
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt) == text
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            encoded = processor.encode_text(conversation, [], add_generation_prompt=prompt)
            assert encoded["input_ids"].tolist() == expected


def test_tokenizer_keeps_the_lms_template_and_special_tokens(built, base, tmp_path):
    _, tokenizer = base
    _assert_renders_as_the_base(built.processor, tokenizer)
    default_system = built.processor.tokenizer.decode(built.processor.encode_text(TEXT_CHAT, [])["input_ids"])
    assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    built.processor.save_pretrained(tmp_path)
    _assert_renders_as_the_base(VLMProcessor.from_pretrained(tmp_path), tokenizer)


def _supervised_runs(encoded) -> list[list[int]]:
    """The supervised label ids, as runs of consecutive positions."""
    runs, previous = [], False
    for label in encoded["labels"].tolist():
        supervised = label != IGNORE_INDEX
        if supervised and not previous:
            runs.append([])
        if supervised:
            runs[-1].append(label)
        previous = supervised
    return runs


@pytest.mark.parametrize("system", [False, True])
def test_only_the_assistant_replies_and_their_end_of_turn_are_supervised(built, system):
    processor = built.processor
    encoded = processor.encode_conversation([SYSTEM, *CHAT] if system else CHAT, [shape_image((220, 20, 20))])
    ids, labels = encoded["input_ids"], encoded["labels"]
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    runs = [processor.tokenizer.decode(run) for run in _supervised_runs(encoded)]
    assert runs == [reply + "<|im_end|>" for reply in REPLIES]
    assert int((ids == processor.image_token_id).sum()) == processor.tokens_per_crop == 16  # 4x4 patches, CLS dropped
    assert built.model.tokens_per_crop == processor.tokens_per_crop


def _prompt(processor, image):
    encoded = processor.encode_conversation([{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
                                            [image], add_generation_prompt=True)
    ids = encoded["input_ids"][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": encoded["pixel_values"]}


def test_cached_greedy_generation_equals_step_by_step_argmax(built):
    model, processor = built.model, built.processor
    inputs = _prompt(processor, shape_image((20, 20, 220)))
    steps = 5
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                   use_cache=True)[0, inputs["input_ids"].shape[1]:]
        ids = inputs["input_ids"]
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[0, -1]
            assert torch.isfinite(logits).all()
            logits[model.config.image_token_id] = -float("inf")  # as the generation config suppresses it
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert generated.tolist() == ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_feature_cache_gives_the_same_loss_without_running_the_encoder_again(built, monkeypatch):
    model, processor = built.model, built.processor
    images = [shape_image((220, 20, 20)), shape_image((20, 20, 220))]
    batch = Collator(processor.tokenizer.pad_token_id)([processor.encode_conversation(CHAT, [image])
                                                        for image in images])
    calls = []
    forward = model.vision_tower.forward
    monkeypatch.setattr(model.vision_tower, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    model.vision_tower.requires_grad_(False)  # frozen, as the cache requires: stays in eval mode under train()
    model.train()
    try:
        with torch.no_grad():
            plain = model(**batch).loss
            model.feature_cache = cache = FeatureCache(2**30)
            first = model(**batch).loss
            assert (cache.hits, cache.misses, len(calls)) == (0, 2, 2)
            second = model(**batch).loss
            assert (cache.hits, cache.misses, len(calls)) == (2, 2, 2)
    finally:
        model.feature_cache = None
        model.vision_tower.requires_grad_(True)
        model.eval()
    assert torch.isfinite(plain)
    assert plain.item() == first.item() == second.item()


# A vision transformer family vlmkit has no entry for: DINOv3 with two registers (CLS + 2 before the patches).
TINY_DINOV3 = {"model_type": "dinov3_vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "num_register_tokens": 2}


def test_an_unlisted_vit_family_is_probed_and_the_count_saved(train_records, tmp_path):
    from vlmkit.train.run import _texts

    assert TINY_DINOV3["model_type"] not in vision.VIT_PREFIX_TOKENS
    torch.manual_seed(0)
    result = build(tiny_model_config(vision_config=dict(TINY_DINOV3), vision_feature_select_strategy="full"),
                   training_texts=lambda: _texts(train_records))
    assert getattr(result.model.config.vision_config, vision.PREFIX_ATTRIBUTE) == 3
    assert result.processor.tokens_per_crop == 3 + 16  # "full" keeps the prefix tokens: 4x4 patches + 3
    result.model.eval().save_pretrained(tmp_path)
    result.processor.save_pretrained(tmp_path)
    config = VLMConfig.from_pretrained(tmp_path)
    assert getattr(config.vision_config, vision.PREFIX_ATTRIBUTE) == 3
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = VLMProcessor.from_pretrained(tmp_path)
    assert processor.tokens_per_crop == loaded.tokens_per_crop == 19
    inputs = _prompt(processor, shape_image((220, 20, 20), size=40))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, result.model(**inputs).logits)


@pytest.mark.parametrize("field", ["lm", "vision"])
def test_an_unknown_checkpoint_id_names_the_fetch_command(field):
    with pytest.raises(ConfigError, match=rf"model\.{field} = 'someone/unknown-model' .*`vlmkit models fetch`"):
        build(tiny_model_config(**{field: "someone/unknown-model"}), training_texts=lambda: ["a b c"])

"""Slicing end to end: processor and model agree on every crop's tokens, padding changes nothing,
and generation with the KV cache matches generation without it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import tiny_model_config
from vlmkit.errors import ConfigError
from vlmkit.model.build import build
from vlmkit.train.run import _texts

PROJECTORS = {"mlp": {}, "resampler": {"num_queries": 6}, "pixel_shuffle": {"factor": 2}, "qformer": {"num_queries": 5}}
SLICING = ["minicpm", "anyres", None]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module", params=[(p, s) for p in PROJECTORS for s in SLICING], ids=lambda v: f"{v[0]}-{v[1]}")
def built(request, train_records):
    projector, slicing = request.param
    torch.manual_seed(0)
    cfg = tiny_model_config(projector=projector, projector_args=PROJECTORS[projector], slicing=slicing, max_slices=4)
    result = build(cfg, training_texts=lambda: _texts(train_records))
    return result.model.eval(), result.processor


def _count(processor, ids) -> int:
    return int((ids == processor.image_token_id).sum())


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(8, 150), st.integers(8, 150)), min_size=1, max_size=3))
def test_processor_and_model_agree_on_token_counts(built, sizes):
    model, processor = built
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    plans = processor.plans(images)
    inputs = processor.image_inputs(images)
    # The plan, known from the header alone, predicts the crops exactly.
    crops = inputs["pixel_values"].shape[0]
    assert crops == sum(len(plan.crop_sizes) for plan in plans)
    actual = inputs["crop_sizes"].tolist() if "crop_sizes" in inputs else [list(inputs["pixel_values"].shape[-2:])] * crops
    assert actual == [list(size) for plan in plans for size in plan.crop_sizes]
    text = processor.expand(["<image>" * len(images)], plans)[0]
    ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        features = model.get_image_features(**inputs)
    assert features.shape[0] == _count(processor, ids)


def test_a_crops_tokens_do_not_depend_on_the_other_images_in_the_batch(built):
    model, processor = built
    small, large = _image(40, 24, 1), _image(140, 70, 2)
    with torch.no_grad():
        alone = model.get_image_features(**processor.image_inputs([small]))
        together = model.get_image_features(**processor.image_inputs([small, large]))
    assert torch.allclose(together[: alone.shape[0]], alone, atol=1e-5)


def test_sliced_generation_with_and_without_kv_cache_gives_identical_tokens(built):
    model, processor = built
    images = [_image(120, 50, 3), _image(30, 90, 4)]
    messages = [{"role": "user", "content": "<image>\n<image>\nWhat colour is the circle?"}]
    ids = processor.encode_text(messages, processor.plans(images), add_generation_prompt=True)["input_ids"][None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} | processor.image_inputs(images)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_minicpm_layout_wraps_the_whole_view_and_each_slice(train_records):
    cfg = tiny_model_config(projector="resampler", projector_args={"num_queries": 4}, slicing="minicpm", max_slices=9)
    processor = build(cfg, training_texts=lambda: _texts(train_records)).processor
    plan = processor.image_processor.plan((96, 96))  # 9x the 32-pixel input: a 3x3 grid
    assert plan.grid == (3, 3) and len(plan.crop_sizes) == 10
    text = processor.image_text(plan)
    assert text.count("<image>") == 4 * 10 and text.count("<slice>") == 9 and text.count("<img>") == 1
    fewer = processor.image_processor.plan((96, 96), max_slices=4)  # a request may lower the budget
    assert len(fewer.crop_sizes) <= 5


def test_a_request_may_lower_the_slice_budget_but_not_raise_it(train_records):
    from vlmkit.serve.engine import Engine
    from vlmkit.config import GenerationSettings
    from vlmkit.serve.generation import stream_reply

    result = build(tiny_model_config(slicing="minicpm", max_slices=4), training_texts=lambda: _texts(train_records))
    model, processor = result.model.eval(), result.processor
    image, messages = _image(128, 128), [{"role": "user", "content": "<image>\nWhat is it?"}]
    engine = Engine(model, processor)
    full, fewer, more = (engine.prompt_tokens(messages, [image], k) for k in (None, 1, 99))
    assert fewer < full == more  # 1 slice: the whole view alone; 99 is capped at the model's 4
    settings = GenerationSettings(max_new_tokens=3)
    settings.update("max_slices", "1")
    reply = "".join(stream_reply(model, processor, messages, [image], settings))  # features match the fewer tokens
    assert isinstance(reply, str)
    with pytest.raises(ConfigError, match="max_slices"):
        settings.update("max_slices", "0")


def test_a_vit_whose_input_is_no_multiple_of_its_patch_drops_the_leftover_pixels(train_records):
    """SigLIP-so400m-patch14-384 style: 384 px at patch 14 is 27 patches, 6 pixels left over."""
    from tests.conftest import TEST_VISION

    cfg = tiny_model_config(vision_config={**TEST_VISION, "image_size": 36})  # 36 px at patch 8: 4 patches
    result = build(cfg, training_texts=lambda: _texts(train_records))
    model, processor = result.model.eval(), result.processor
    assert processor.tokens_per_crop == model.tokens_per_crop == 16
    inputs = processor.image_inputs([_image(50, 40)])
    with torch.no_grad():
        assert model.get_image_features(**inputs).shape[0] == 16

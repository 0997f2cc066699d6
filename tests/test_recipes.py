"""Every recipe under configs/recipes trains 2 steps at tiny scale on the built-in data, keeping its design."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.config import load_config
from vlmkit.errors import ConfigError
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.tokens import image_token_spec
from vlmkit.processing.image_processing import VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor
from vlmkit.recipes import RECIPES, recipe_path

VLM_RECIPES = ["minimind-v", "minimind-v-siglip2", "basic-vlm", "minigpt4qwen", "minicpm-v", "llava"]


def test_every_shipped_recipe_is_covered():
    shipped = {p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml")}
    assert shipped == {*VLM_RECIPES, "minicpm-visual-embedding"}


@pytest.mark.parametrize("name", VLM_RECIPES)
def test_recipe_trains_two_steps_at_tiny_scale(name, synth_dir, tmp_path):
    out = tmp_path / name
    assert main(["train", f"recipes/{name}", "--tiny", "--train-data", str(synth_dir / "train.jsonl"),
                 "--max-steps", "2", "--output-dir", str(out), "--set", "train.logging_steps=1"]) == 0  # fmt: skip
    recipe = load_config(f"recipes/{name}")
    saved = json.loads(((out / "base") if (out / "base").is_dir() else out).joinpath("config.json").read_text())
    # The design survives shrinking: encoder and LM families, projector, slicing.
    assert saved["projector_type"] == recipe.model.projector
    assert saved["vision_config"]["model_type"] == recipe.model.vision_config["model_type"]
    assert saved["text_config"]["model_type"] == recipe.model.text_config["model_type"]
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_processor"].get("slicing") == recipe.model.slicing
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2


def test_retriever_recipe_trains_two_steps_at_tiny_scale(tmp_path):
    from vlmkit.data.synth_docs import synth_docs

    docs_dir, out = tmp_path / "docs", tmp_path / "mve"
    synth_docs(docs_dir, n_train=12, n_test=4, queries_per_page=2, size=32)
    assert main(["retriever", "train", "recipes/minicpm-visual-embedding", "--tiny", "--train-data",
                str(docs_dir / "train_pairs.jsonl"), "--docs", str(docs_dir / "train_docs.h5"), "--max-steps", "2",
                "--output-dir", str(out)]) == 0  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["pooling"] == "weighted_mean" and saved["projector_type"] == "resampler"


def test_minicpm_v_recipe_gives_64_tokens_per_crop_for_at_most_ten_crops(tiny):
    """A 1344x1344 image: 9 slices + the whole view, 64 x 10 image tokens plus the boundary tokens."""
    model = load_config("recipes/minicpm-v").model
    config = VLMConfig(vision_config=model.vision_config, text_config=model.text_config,
                       projector_type=model.projector, projector_args=model.projector_args)  # fmt: skip
    assert model.crop_size == 448  # MiniCPM-V's slice size (its 384 px tower interpolates positions)
    images = VLMImageProcessor(size=model.crop_size, slicing=model.slicing, max_slices=model.max_slices, multiple=14)
    processor = VLMProcessor(images, tiny.processor.tokenizer, image_token_spec=image_token_spec(config))
    for side in (1344, 1800, 900):
        plan = images.plan((side, side))
        assert len(plan.crop_sizes) <= 10
        text = processor.image_text(plan)
        assert text.count("<image>") == 64 * len(plan.crop_sizes)
        assert text.count("<slice>") == text.count("</slice>") == len(plan.crop_sizes) - 1
    assert images.plan((1344, 1344)).grid == (3, 3)
    crops = images.crops(Image.new("RGB", (1344, 1344)))
    assert [tuple(c.shape[-2:]) for c in crops] == [(448, 448)] * 10


def test_an_unknown_recipe_name_lists_the_recipes():
    with pytest.raises(ConfigError, match="minicpm-v"):
        recipe_path("recipes/nope")

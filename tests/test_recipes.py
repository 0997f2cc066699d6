"""Every recipe under configs/recipes trains 2 steps at tiny scale on the built-in data, keeping its design;
every shipped config, and every config path the docs write, resolves by name from any directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.config import load_config
from vlmkit.errors import ConfigError
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.tokens import image_token_spec
from vlmkit.processing.image_processing import VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor
from vlmkit.config import TrainConfig
from vlmkit.recipes import CONFIGS, RECIPES, recipe_path, shipped_config, shipped_names
from vlmkit.train import distributed

VLM_RECIPES = ["minimind-v", "minimind-v-siglip2", "basic-vlm", "minigpt4qwen", "minicpm-v", "llava"]


def test_every_shipped_recipe_is_covered():
    shipped = {p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml")}
    assert shipped == {*VLM_RECIPES, "minicpm-visual-embedding"}


@pytest.mark.parametrize("name", VLM_RECIPES)
def test_recipe_trains_two_steps_at_tiny_scale(name, synth_dir, tmp_path):
    out = tmp_path / name
    assert main(["train", f"recipes/{name}", "--tiny", "--train-data", str(synth_dir / "train.jsonl"),
                 "--max-steps", "2", "--output-dir", str(out), "--set", "train.logging_steps=1"]) == 0
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
                "--output-dir", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["pooling"] == "weighted_mean" and saved["projector_type"] == "resampler"


def test_minicpm_v_recipe_gives_64_tokens_per_crop_for_at_most_ten_crops(tiny):
    """A 1344x1344 image: 9 slices + the whole view, 64 x 10 image tokens plus the boundary tokens."""
    model = load_config("recipes/minicpm-v").model
    config = VLMConfig(vision_config=model.vision_config, text_config=model.text_config,
                       projector_type=model.projector, projector_args=model.projector_args)
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


DOCS = Path(__file__).resolve().parents[1] / "docs"
SHIPPED = sorted([p.name for p in CONFIGS.iterdir() if p.name.endswith((".yaml", ".json"))]
                 + [f"recipes/{p.name}" for p in RECIPES.iterdir() if p.name.endswith(".yaml")])
# The docs, and the shipped YAML files, whose comments show the command that uses them.
WRITINGS = sorted(DOCS.glob("*.md")) + [Path(str(CONFIGS / f)) for f in SHIPPED if f.endswith(".yaml")]


@pytest.mark.parametrize("file", SHIPPED)
def test_every_shipped_config_resolves_by_name_from_anywhere(file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs here, as for an installed package or a run outside the clone
    suffix = Path(file).suffix
    stem = file.removesuffix(suffix)
    names = [stem, file, f"configs/{stem}", f"configs/{file}", f"vlmkit/configs/{file}", f"src/vlmkit/configs/{file}"]
    if stem.startswith("recipes/") and not (CONFIGS / f"{stem.removeprefix('recipes/')}{suffix}").is_file():
        names.append(stem.removeprefix("recipes/"))  # a recipe's bare name, unless a top-level config has it
    for name in names:
        assert Path(shipped_config(name, suffix)) == Path(str(CONFIGS / file)), name
    assert stem in shipped_names(suffix)


def test_a_file_on_disk_comes_before_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("lora.yaml").write_text("train: {max_steps: 3}\n")
    assert shipped_config("lora.yaml") == "lora.yaml"
    assert Path(shipped_config("lora")) == Path(str(CONFIGS / "lora.yaml"))  # a bare name is never a file


@pytest.mark.parametrize("name", ["nope", "recipes/nope", "configs/nope.yaml", "elsewhere/lora.yaml", "../lora"])
def test_an_unknown_name_errors_with_the_shipped_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"{re.escape(name)} not found") as error:
        load_config(name)
    assert all(shown in str(error.value) for shown in shipped_names(".yaml"))
    assert main(["train", name]) == 2  # the command says so too, in one line


def test_a_deepspeed_config_resolves_by_name_where_the_trainer_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("deepspeed-zero2", "vlmkit/configs/deepspeed-zero2.json", "configs/deepspeed-zero2"):
        train = TrainConfig(deepspeed=name)
        try:
            distributed.check(train)
        except ConfigError as err:  # after resolving: this machine may lack the deepspeed package
            assert "deepspeed package" in str(err)
        assert Path(train.deepspeed) == Path(str(CONFIGS / "deepspeed-zero2.json"))
    with pytest.raises(ConfigError, match="train.deepspeed: config file deepspeed-zero9 not found") as error:
        distributed.check(TrainConfig(deepspeed="deepspeed-zero9"))
    assert all(shown in str(error.value) for shown in shipped_names(".json"))


def config_paths_written_in(text: str) -> list[tuple[str, str]]:
    """(name, suffix) of every config a text names: config paths, `vlmkit train X`, `train.deepspeed=X`."""
    found = [(m[0], "." + m[1]) for m in re.findall(r"((?:src/)?(?:vlmkit/)?configs/[a-z0-9/._-]+\.(yaml|json))", text)]
    found += [(m, ".yaml") for m in re.findall(r"vlmkit (?:train|dpo|retriever train) +([a-z0-9][a-z0-9/._-]*)", text)]
    found += [(m, ".json") for m in re.findall(r"train\.deepspeed=([a-z0-9][a-z0-9/._-]*)", text)]
    return found


@pytest.mark.parametrize("doc", WRITINGS, ids=lambda p: p.name)
def test_every_config_path_the_docs_write_works_as_written(doc, tmp_path, monkeypatch):
    text = doc.read_text()
    monkeypatch.chdir(tmp_path)  # the docs' paths must work from a clone's root, another folder, or an install
    for name, suffix in config_paths_written_in(text):
        assert Path(shipped_config(name, suffix)).is_file(), f"{doc.name}: {name}"

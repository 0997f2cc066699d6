"""Config loading: the shipped tiny recipe equals the defaults; overrides are typed and checked."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from vlmkit.config import RunConfig, load_config
from vlmkit.recipes import recipe_path
from vlmkit.errors import ConfigError


def test_scratch_recipe_spells_out_every_default_key_by_key():
    # The file as written, not merged over the defaults: a key missing from it is a failure too.
    written = yaml.safe_load(Path(recipe_path("scratch")).read_text())
    assert written == dataclasses.asdict(RunConfig())


@pytest.mark.parametrize("name", ["demo-align", "demo-sft"])
def test_demo_recipes_load(name):
    cfg = load_config(name)
    assert cfg.data.train and cfg.train.max_steps > 0


@pytest.mark.parametrize("name", ["vision", "align", "sft"])
def test_shapes_example_configs_load(name):
    from examples.shapes.vision_tags import load_tag_config

    path = Path(__file__).parents[1] / "examples" / "shapes" / f"{name}.yaml"
    cfg = (load_tag_config if name == "vision" else load_config)(path)
    assert cfg.data.train and cfg.train.max_steps > 0


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr.lm=1e-4", "train.batch_size=4", "train.warmup=10", "model.projector=linear"])
    assert cfg.train.lr.lm == 1e-4 and cfg.train.batch_size == 4 and cfg.train.warmup == 10.0
    assert cfg.model.projector == "linear"


@pytest.mark.parametrize(
    "override, message",
    [("train.batch_size=four", "train.batch_size"), ("train.nonsense=1", "unknown key"),
     ("train.stage=pretrain", "train.stage"), ("novalue", "section.key=value")],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_sub_config_of_another_model_type_replaces_the_default():
    cfg = load_config(None, ["model.text_config={model_type: qwen2, hidden_size: 64}"])
    assert cfg.model.text_config == {"model_type": "qwen2", "hidden_size": 64}
    same_type = load_config(None, ["model.text_config.hidden_size=64"])
    assert same_type.model.text_config["num_hidden_layers"] == RunConfig().model.text_config["num_hidden_layers"]


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("command", [["train"], ["dpo"], ["retriever", "train"]])
def test_every_set_flag_is_kept(command):
    # `--set a=1 --set b=2` once kept only b=2: the first overrides were dropped without a word.
    from vlmkit.cli import build_parser

    args = build_parser().parse_args([*command, "--set", "train.seed=3", "train.lr.lm=0.5", "--set", "train.bf16=true"])
    assert args.set == ["train.seed=3", "train.lr.lm=0.5", "train.bf16=true"]
    cfg = load_config(None, args.set)
    assert (cfg.train.seed, cfg.train.lr.lm, cfg.train.bf16) == (3, 0.5, True)


def test_no_set_flag_means_no_overrides():
    from vlmkit.cli import build_parser

    assert build_parser().parse_args(["train"]).set == []

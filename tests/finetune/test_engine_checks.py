"""Distributed settings that cannot work fail before anything is built, naming the file and field."""

import importlib.util
import json
from importlib import resources

import pytest

from tests.finetune.helpers import make_config, run
from vlmkit.config import TrainConfig, load_config
from vlmkit.errors import ConfigError
from vlmkit.train.distributed import deepspeed_mismatches

CONFIGS = resources.files("vlmkit") / "configs"


def test_shipped_recipes_load():
    assert load_config(CONFIGS / "ddp.yaml").train.batch_size == 8
    fsdp = load_config(CONFIGS / "fsdp.yaml").train
    assert fsdp.fsdp == "full_shard auto_wrap" and fsdp.fsdp_config["version"] == 2
    lora = load_config(CONFIGS / "lora.yaml")
    assert lora.lora.enabled and lora.train.lr.lm == 2e-4 and lora.lora.modules_to_save == ["projector"]


@pytest.mark.parametrize("name", ["deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "deepspeed-zero3-offload"])
def test_shipped_deepspeed_configs_agree_with_any_command_line(name):
    ds = json.loads((CONFIGS / f"{name}.json").read_text())
    assert ds["zero_optimization"]["stage"] == int(name[len("deepspeed-zero")])
    assert deepspeed_mismatches(ds, TrainConfig(batch_size=3, grad_accum=5, bf16=True), world_size=7) == []


def test_contradictions_are_listed_field_by_field():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto", "train_batch_size": 16,
          "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}}
    problems = deepspeed_mismatches(ds, TrainConfig(batch_size=2, grad_accum=2), world_size=2)
    assert len(problems) == 4
    assert problems[0] == "train_micro_batch_size_per_gpu is 4 but train.batch_size gives 2"
    assert any("train_batch_size is 16" in p and "gives 8" in p for p in problems)
    assert any(p.startswith("bf16.enabled is True") for p in problems)
    assert any("optimizer section" in p for p in problems)


def test_a_contradicting_deepspeed_file_stops_the_run_before_the_model_is_built(synth_dir, tmp_path, trainers):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}))
    cfg = make_config(synth_dir / "train.jsonl", tmp_path / "run", [f"train.deepspeed={ds}"])
    expected = "train_micro_batch_size_per_gpu is 8 but train.batch_size gives 2"
    if importlib.util.find_spec("deepspeed") is None:
        expected = "needs the deepspeed package"
    with pytest.raises(ConfigError, match=expected):
        run(cfg)
    assert trainers == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [(["train.deepspeed=missing.json"], "missing.json not found"),
     (["train.deepspeed=x.json", "train.fsdp=full_shard"], "choose one engine")],
)
def test_impossible_engine_settings(synth_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(synth_dir / "train.jsonl", tmp_path / "run", overrides))

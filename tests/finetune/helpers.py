"""Shared helpers for the fine-tuning tests: a small run config and a quiet `run`."""

from __future__ import annotations

import importlib

from tests.conftest import tiny_model_config
from vlmkit.config import RunConfig, load_config

run_module = importlib.import_module("vlmkit.train.run")


def make_config(train_file, out, overrides=()) -> RunConfig:
    """The tiny test model on `train_file`, quiet and small, then `overrides` (dotted key=value)."""
    cfg = load_config(None, ["train.report_to=[]", "train.warmup=0", "train.logging_steps=1", "train.batch_size=2",
                             "train.save_steps=1000", *overrides])
    cfg.data.train = str(train_file)
    cfg.train.output_dir = str(out)
    cfg.model = tiny_model_config(init_from=cfg.model.init_from)
    return cfg


def run(cfg: RunConfig):
    return run_module.run(cfg, log=lambda *args: None)

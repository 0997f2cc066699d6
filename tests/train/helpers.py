"""Shared by the training tests: a small run config on the tiny model, a silent log, and the
`vlmkit.train.run` module (the tests swap its Trainer class)."""

import importlib

from transformers import TrainerCallback

from tests.conftest import tiny_model_config
from vlmkit.config import load_config

run_module = importlib.import_module("vlmkit.train.run")


def make_config(synth_dir, out, **train):
    cfg = load_config(None, ["train.report_to=[]", "train.warmup=0", "train.logging_steps=1", "train.batch_size=2"])
    cfg.data.train = str(synth_dir / "train.jsonl")
    cfg.train.output_dir = str(out)
    cfg.model = tiny_model_config()
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def quiet(*args, **kwargs):
    pass


class Interrupted(Exception):
    pass


class InterruptAfter(TrainerCallback):
    """Simulates a crash: raises when the step after `step` begins (its checkpoint is written by then)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted after step {self.step}")

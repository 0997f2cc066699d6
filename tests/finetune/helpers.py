"""Shared helpers for the fine-tuning tests: a small run config and a quiet `run`; for the
multi-process ones, a config file and `vlmkit` (or torchrun) in a subprocess."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_TEXT, TEST_VISION, tiny_model_config
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


TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def write_config(path: Path, train, **train_settings) -> Path:
    config = {
        "model": {"vision_config": TEST_VISION, "text_config": TEST_TEXT, "vocab_size": 400},
        "data": {"train": train},
        "train": {"warmup": 0, "logging_steps": 1, "report_to": [], **train_settings},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def vlmkit(args: list[str], processes: int | None = None, timeout: int = 300) -> str:
    """`vlmkit ARGS`, or `torchrun --nproc_per_node N -m vlmkit ARGS`; fails the test with the output on error."""
    if processes:
        launcher = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", "-m", "vlmkit"]
    else:
        launcher = [sys.executable, "-m", "vlmkit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A session of its own, so a hang can be ended with every worker torchrun started.
    process = subprocess.Popen(launcher + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(args[:2])} did not finish in {timeout}s (a hang between processes?)")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

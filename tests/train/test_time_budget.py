"""`train.time_budget`: a schedule that follows the clock, and a stop when the budget is spent."""

import json

import pytest

from tests.train.helpers import make_config, quiet
from vlmkit.errors import ConfigError
from vlmkit.train import stage as stage_module
from vlmkit.train import time_budget
from vlmkit.train.progress import ProgressBar
from vlmkit.train.run import run
from vlmkit.train.time_budget import TimeBudget


class FakeClock:
    def __init__(self, step: float = 0.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_learning_rate_warms_up_then_decays_over_the_budgets_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time_budget, "clock", clock)
    budget = TimeBudget(100.0, warmup=0.1)
    budget.start()
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 150: 0.0}  # seconds -> multiplier
    for seconds, multiplier in expected.items():
        clock.now = seconds
        assert budget.lr_multiplier(12345) == pytest.approx(multiplier, abs=1e-9)  # the step plays no part


def test_training_stops_when_the_budget_is_spent(synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "clock", FakeClock(step=0.5))  # time moves on every look at the clock
    shown = []

    class RecordingBar(ProgressBar):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown.append(dict(logs or {}))
            return super().on_log(args, state, control, logs=logs, **kwargs)

    monkeypatch.setattr(stage_module, "ProgressBar", RecordingBar)
    out = tmp_path / "budget"
    run(make_config(synth_dir, out, max_steps=500, time_budget=20.0, warmup=0.1, save_steps=1000), log=quiet)
    summary = json.loads((out / "train_summary.json").read_text())
    assert 5 <= summary["steps"] < 500  # stopped by the budget, far before the step cap
    assert (out / "model.safetensors").is_file()
    # The bar shows the time left (its step total is only the cap), counting down to nothing.
    left = [logs["time_left_s"] for logs in shown if "time_left_s" in logs]
    assert len(left) >= 3 and left == sorted(left, reverse=True) and left[-1] < 1.0


def test_time_budget_refuses_what_it_cannot_do(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="cannot resume exactly"):
        run(make_config(synth_dir, tmp_path / "a", max_steps=5, time_budget=5.0, resume=True), log=quiet)
    with pytest.raises(ConfigError, match="ratio of the budget"):
        run(make_config(synth_dir, tmp_path / "b", max_steps=5, time_budget=5.0, warmup=10), log=quiet)
    with pytest.raises(ConfigError, match="scheduler 'linear' would be ignored"):
        run(make_config(synth_dir, tmp_path / "c", max_steps=5, time_budget=5.0, scheduler="linear"), log=quiet)
    with pytest.raises(ConfigError, match=r"train.lm_start \(0.5\) is a share of the steps"):
        run(make_config(synth_dir, tmp_path / "d", max_steps=5, time_budget=5.0, lm_start=0.5), log=quiet)

"""`train.time_budget`: train until a wall-clock deadline, the learning rate decaying over time.

A CPU shared with other machines can run the same step 2.5 times slower at one moment than
at another, even within one run (examples/shapes/README.md), so a step count chosen in advance either wastes a fast machine or overruns a slow one. With a
time budget the warmup and the cosine decay follow the fraction of the budget spent, and
training stops when it is spent; `train.max_steps` stays a cap. Hand-written: transformers'
schedulers are functions of the step count only.
"""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback

from vlmkit.config import TrainConfig
from vlmkit.errors import ConfigError

clock = time.perf_counter  # module-level, so that tests can drive the schedule with a fake clock


def check(t: TrainConfig) -> None:
    """Refuse the settings a time budget cannot honour (called before anything is built)."""
    if not t.time_budget:
        return
    if t.resume:
        raise ConfigError("train.time_budget cannot resume exactly (its schedule follows the clock); "
                          "resume a run with train.max_steps instead")
    if t.deepspeed:
        raise ConfigError("train.time_budget needs the Trainer's own scheduler; DeepSpeed brings its own")
    if t.scheduler != "cosine":
        raise ConfigError(f"train.time_budget decays the learning rate on a cosine over time; train.scheduler "
                          f"{t.scheduler!r} would be ignored: set it to cosine")
    if t.warmup >= 1:
        raise ConfigError(f"train.time_budget takes train.warmup as a ratio of the budget (below 1), "
                          f"not {t.warmup} steps")
    if t.lm_start:
        raise ConfigError(f"train.lm_start ({t.lm_start}) is a share of the steps, which a time budget does not "
                          "know in advance: set train.lm_start=0, or train with train.max_steps or epochs")


class TimeBudget:
    """Warmup over the first `warmup` of the budget (a ratio), then a cosine decay to 0 at its end."""

    def __init__(self, seconds: float, warmup: float):
        self.seconds, self.warmup = seconds, warmup
        self.started: float | None = None

    def start(self) -> None:
        self.started = clock()

    def spent(self) -> float:
        """The fraction of the budget used so far (the clock starts on first use)."""
        if self.started is None:
            self.start()
        return (clock() - self.started) / self.seconds

    def lr_multiplier(self, _step: int) -> float:
        spent = min(self.spent(), 1.0)
        if spent < self.warmup:
            return spent / self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * (spent - self.warmup) / (1.0 - self.warmup)))


class TimeBudgetCallback(TrainerCallback):
    """Starts the budget's clock when training starts and stops training once the budget is spent."""

    def __init__(self, budget: TimeBudget):
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget.spent() >= 1.0:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The step count's bar total is only a cap here, so its ETA means nothing: log the time left.
        if logs is not None:
            logs["time_left_s"] = max(0.0, (1.0 - self.budget.spent()) * self.budget.seconds)

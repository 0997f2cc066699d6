"""`train.time_budget`: train until a wall-clock deadline, the learning rate decaying over time.

A CPU shared with other machines can run the same step 2.5 times slower at one moment than
at another, even within one run (docs/design.md), so a step count chosen in advance either
wastes a fast machine or overruns a slow one. With a time budget the warmup and the cosine
decay follow the fraction of the budget spent, and training stops when it is spent;
`train.max_steps` stays a cap. Hand-written: transformers' schedulers are functions of the
step count only.
"""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback

clock = time.perf_counter  # module-level, so that tests can drive the schedule with a fake clock


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

"""The training progress bar: loss, learning rate and token throughput from the Trainer's logs."""

import time
from types import SimpleNamespace

from vlmkit.train.progress import ProgressBar


def test_throughput_is_shown_and_the_final_summary_log_does_not_zero_it():
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0, num_input_tokens_seen=0)
    bar = ProgressBar()
    bar.on_train_begin(None, state, None)
    time.sleep(0.01)
    state.global_step, state.num_input_tokens_seen = 5, 5000
    bar.on_log(None, state, None, logs={"loss": 1.25, "learning_rate": 1e-3})
    shown = bar.bar.postfix
    assert "loss=1.2500" in shown and "lr=1.00e-03" in shown
    rate = float(shown.split("tok/s=")[1].replace(",", ""))
    assert 0 < rate <= 5000 / 0.01

    # The Trainer's last log (train_runtime, ...) comes with no new tokens.
    bar.on_log(None, state, None, logs={"train_runtime": 1.0})
    assert f"tok/s={rate:,.0f}" in bar.bar.postfix
    bar.on_train_end(None, state, None)
    assert bar.bar is None

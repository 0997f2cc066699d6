"""A training progress bar with loss, learning rate, tokens/s, MFU and ETA (tqdm), as a Trainer callback."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from vlmkit.train import mfu


class ProgressBar(TrainerCallback):
    """Replaces the Trainer's bar: one line that keeps the latest loss and throughput in view."""

    def __init__(self, peak_flops: float = 0.0):
        self.bar = None
        self.last_time = self.last_tokens = self.last_flos = None
        self.postfix = {}
        self.peak_flops = peak_flops  # of one process; 0: measured when training starts (train/mfu.py)
        self.peak_measured = not peak_flops
        self.retimes_left = 2  # a machine still loaded could otherwise stall every log on a probe
        self.peak_dtype = torch.float32

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
            if self.peak_measured:
                self.peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
                self.peak_flops = mfu.measured_peak(self.peak_dtype, args.device)
        self.last_time, self.last_tokens, self.last_flos = time.perf_counter(), state.num_input_tokens_seen, \
            state.total_flos
        self.postfix = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        postfix = self.postfix  # updated in place: a log that lacks a figure keeps its last value
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if "time_left_s" in logs:  # a time-budgeted run (vlmkit/train/time_budget.py)
            postfix["time left"] = f"{logs['time_left_s']:.0f}s"
        if tokens and tokens > self.last_tokens and now > self.last_time:
            # The Trainer sums the counts over all processes, so these are the whole job's rates.
            postfix["tok/s"] = f"{(tokens - self.last_tokens) / (now - self.last_time):,.0f}"
            if state.total_flos > self.last_flos and self.peak_flops:
                flops = (state.total_flos - self.last_flos) / (now - self.last_time)
                self.check_peak(flops / args.world_size, args)
                postfix["MFU"] = f"{flops / (self.peak_flops * args.world_size):.1%}"
            # After a probe, not before: its second must not count against the next interval.
            self.last_time, self.last_tokens, self.last_flos = time.perf_counter(), tokens, state.total_flos
        self.bar.set_postfix(postfix, refresh=True)

    def check_peak(self, achieved: float, args) -> None:
        """Each process (on average) outran the peak measured at the start: that matmul was timed
        while other work shared the machine (or its memory was still being mapped), so time it
        again, at most twice a run, and keep the better figure. Without this a loaded start-up
        shows an MFU above 100% for the whole run."""
        if self.peak_measured and self.retimes_left and achieved > self.peak_flops:
            self.retimes_left -= 1
            self.peak_flops = max(self.peak_flops, mfu.measured_peak(self.peak_dtype, args.device))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

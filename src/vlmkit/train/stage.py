"""The sequence every training command shares: set up, train, save, summarise.

`vlmkit train`, `vlmkit dpo` and `vlmkit retriever train` (and the shapes example's tag stage)
differ in the data, the model and the Trainer they build, and in what they measure around
training; the steps before and after are these three functions, so a run of any of them
prints its resolved config, resumes, reports progress and writes its folder the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from transformers import ProgressCallback, Trainer, TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import TrainOutput

from vlmkit.config import to_yaml
from vlmkit.errors import ConfigError
from vlmkit.files import write_text_atomic
from vlmkit.train import distributed, muon, precision, time_budget
from vlmkit.train.progress import ProgressBar
from vlmkit.train.trainer import CONFIG_FILE, SUMMARY_FILE, last_checkpoint


def begin(cfg, command: str, log=print) -> tuple[Path, str | None]:
    """Seed, print the resolved config, check the train settings (each where it is used), before
    anything is built; the output folder and the checkpoint to resume from (None: from the start)."""
    out = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)
    log(f"{command}: configuration\n{to_yaml(cfg)}")
    distributed.check(cfg.train)
    time_budget.check(cfg.train)
    precision.check(cfg.train.bf16)
    muon.check(cfg.train)
    checkpoint = last_checkpoint(out, log) if cfg.train.resume and out.is_dir() else None
    if cfg.train.resume and checkpoint is None:
        log(f"no checkpoint in {out}; starting from the beginning")
    return out, checkpoint


def fit(trainer: Trainer, checkpoint: str | None, log=print, peak_flops: float = 0.0) -> tuple[TrainOutput, float]:
    """Train with vlmkit's progress bar (tokens/s and MFU against `peak_flops`, else a matmul timed
    at the start: train/mfu.py); the Trainer's result, with the run's `mfu`, and the seconds it took.

    Resuming a run that had already reached its last step trains nothing: transformers' loop
    would take one step more before it looks at the count, and change the finished weights.
    The checkpoint's weights are loaded instead, for `finish` to save."""
    trainer.remove_callback(ProgressCallback)
    bar = ProgressBar(peak_flops)
    trainer.add_callback(bar)
    resumed_flos = 0.0
    if checkpoint is not None:
        state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
        resumed_flos = state.total_flos  # the Trainer carries it on; this session's MFU leaves it out
        # The run's last step: max_steps, else the checkpoint's own count while the epochs asked are unchanged.
        target = trainer.args.max_steps if trainer.args.max_steps > 0 else (
            state.max_steps if state.num_train_epochs == trainer.args.num_train_epochs else None)
        if target is not None and state.global_step >= target:
            if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
                raise ConfigError(f"{checkpoint} is the last step ({state.global_step}) of a finished run; raise "
                                  "train.max_steps to train on, or start a new train.output_dir")
            log(f"{checkpoint} is the last step ({state.global_step}) of a finished run; nothing left to train")
            trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loading, as a resume does
            trainer.state = state
            return TrainOutput(state.global_step, 0.0, {}), 0.0
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    flos = result.metrics.get("total_flos", 0.0) - resumed_flos
    if bar.peak_flops and flos > 0:  # this session's MFU, for train_summary.json
        result.metrics["mfu"] = flos / seconds / (bar.peak_flops * trainer.args.world_size)
    return result, seconds


def finish(trainer: Trainer, cfg, out: Path, seconds: float, summary: dict, log=print, *,
           save: Callable[[Trainer], None] | None = None, skipped: list = (), what: str = "model",
           config_file: str = CONFIG_FILE) -> dict:
    """Save the model (`save`, else the Trainer's own: safetensors, config, processor), then on the
    main process the resolved config and `train_summary.json`: seconds, steps and precision, then
    `summary`. Returns the summary written."""
    (save or (lambda t: t.save_model(str(out))))(trainer)
    if trainer.is_world_process_zero():
        # The Trainer pickles its arguments beside the weights; a model folder vlmkit ships holds no
        # pickle (the resolved config, as YAML, says the same). Checkpoints keep theirs, to resume.
        (out / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    summary = {"train_seconds": seconds, "steps": trainer.state.global_step, "bf16": trainer.args.bf16, **summary}
    if trainer.is_world_process_zero():
        write_text_atomic(out / config_file, to_yaml(cfg))
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))
        if skipped:
            log(f"skipped {len(skipped)} bad record(s) (--skip-bad); the first: {skipped[0]}")
        log(f"saved {what} to {out} ({summary['steps']} steps in {seconds:.0f}s)")
    return summary

"""`vlmkit dpo`: preference tuning, read top to bottom -- set up, build, score, train, save.

It is `vlmkit train` with preference records instead of conversations: the same config
(stage `dpo`, with its own default learning rates), the same engines (DDP, FSDP, DeepSpeed,
LoRA) and the same saved model directory. Before training, the starting model scores every
pair once; those are the reference log-probs. With `data.eval`, the held-out preference
accuracy (chosen reply more likely than the rejected one) is measured before and after and
written to `train_summary.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import ProgressCallback, set_seed

from vlmkit.config import RunConfig, to_yaml
from vlmkit.data.preferences import read_preferences
from vlmkit.data.records import read_record_files
from vlmkit.errors import ConfigError
from vlmkit.train import distributed, lora
from vlmkit.train.dpo import (
    DPOTrainer,
    PairCollator,
    PreferenceDataset,
    add_reference,
    preference_accuracy,
    score_pairs,
)
from vlmkit.train.progress import ProgressBar
from vlmkit.train.run import prepare_model
from vlmkit.train.trainer import CONFIG_FILE, SUMMARY_FILE, last_checkpoint, training_arguments


def run_dpo(cfg: RunConfig, log=print) -> Path:
    """Train with DPO as configured; returns the directory of the saved model."""
    if not cfg.data.train:
        raise ConfigError("no preference data: give --train-data or data.train (see `vlmkit data preferences`)")
    out = Path(cfg.train.output_dir)
    set_seed(cfg.train.seed)
    log(f"vlmkit dpo: configuration\n{to_yaml(cfg)}")
    distributed.check(cfg.train)

    # Every record is checked before the model is built.
    records, bad_lines = read_record_files(cfg.data.train, cfg.data.skip_bad, reader=read_preferences)
    eval_records = read_preferences(cfg.data.eval, skip_bad=cfg.data.skip_bad)[0] if cfg.data.eval else None
    checkpoint = last_checkpoint(out, log) if cfg.train.resume and out.is_dir() else None
    model, processor, rates = prepare_model(cfg, records, checkpoint, log)
    log(f"DPO beta {cfg.dpo.beta}")

    kwargs = {"max_length": cfg.data.max_length, "skip_bad": cfg.data.skip_bad, "max_pixels": cfg.data.max_pixels}
    train_set = PreferenceDataset(records, processor, **kwargs)
    train_set.skipped = bad_lines + train_set.skipped
    eval_set = PreferenceDataset(eval_records, processor, **kwargs) if eval_records else None
    collator = PairCollator(processor.tokenizer.pad_token_id)
    trainer = DPOTrainer(model=model, args=training_arguments(cfg, rates, has_eval=False), train_dataset=train_set,
                         data_collator=collator, processing_class=processor, learning_rates=rates,
                         time_budget=cfg.train.time_budget, beta=cfg.dpo.beta)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())

    # The starting model's scores are the reference (the Trainer has put the model on its device by now).
    reference = score_pairs(trainer.model, train_set, collator, cfg.train.batch_size)
    add_reference(train_set, reference)
    metrics = {"train_preference_accuracy_before": preference_accuracy(reference)}
    if eval_set is not None:
        metrics["eval_preference_accuracy_before"] = preference_accuracy(score_pairs(trainer.model, eval_set, collator))

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start
    metrics.update(result.metrics)
    after = score_pairs(trainer.model, train_set, collator)
    metrics["train_preference_accuracy_after"] = preference_accuracy(after)
    metrics["train_reward_accuracy_after"] = preference_accuracy(after - reference)  # DPO's implicit reward
    if eval_set is not None:
        metrics["eval_preference_accuracy_after"] = preference_accuracy(score_pairs(trainer.model, eval_set, collator))

    if cfg.lora.enabled:
        lora.save(trainer, cfg.lora, out)
    else:
        trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / CONFIG_FILE).write_text(to_yaml(cfg))
        summary = {"train_seconds": train_seconds, "steps": trainer.state.global_step, "bf16": trainer.args.bf16,
                   "n_pairs": len(train_set),
                   "skipped_records": len(train_set.skipped), "metrics": metrics}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        accuracy = {k: round(v, 3) for k, v in metrics.items() if "preference_accuracy" in k}
        log(f"saved model to {out} ({summary['steps']} steps in {train_seconds:.0f}s); preference accuracy {accuracy}")
    return out

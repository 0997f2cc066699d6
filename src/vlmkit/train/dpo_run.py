"""`vlmkit dpo`: preference tuning, read top to bottom -- set up, build, score, train, save.

It is `vlmkit train` with preference records instead of conversations: the same config
(stage `dpo`, with its own default learning rates), the same engines (DDP, FSDP, DeepSpeed,
LoRA) and the same saved model directory. Before training, the starting model scores every
pair once; those are the reference log-probs. With `data.eval`, the held-out preference
accuracy (chosen reply more likely than the rejected one) is measured before and after and
written to `train_summary.json`.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.config import RunConfig
from vlmkit.data.preferences import read_preferences
from vlmkit.data.records import read_record_files
from vlmkit.errors import ConfigError
from vlmkit.train import lora, stage
from vlmkit.train.dpo import (
    DPOTrainer,
    PairCollator,
    PreferenceDataset,
    add_reference,
    preference_accuracy,
    score_pairs,
)
from vlmkit.train.run import prepare_model
from vlmkit.train.trainer import training_arguments


def run_dpo(cfg: RunConfig, log=print) -> Path:
    """Train with DPO as configured; returns the directory of the saved model."""
    if not cfg.data.train:
        raise ConfigError("no preference data: give --train-data or data.train (see `vlmkit data preferences`)")
    out, checkpoint = stage.begin(cfg, "vlmkit dpo", log)
    # Every record is checked before the model is built.
    records, bad_lines = read_record_files(cfg.data.train, cfg.data.skip_bad, reader=read_preferences)
    eval_records = read_preferences(cfg.data.eval, skip_bad=cfg.data.skip_bad)[0] if cfg.data.eval else None
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

    # The starting model's scores are the reference (the Trainer has put the model on its device by now).
    reference = score_pairs(trainer.model, train_set, collator, cfg.train.batch_size)
    add_reference(train_set, reference)
    metrics = {"train_preference_accuracy_before": preference_accuracy(reference)}
    if eval_set is not None:
        metrics["eval_preference_accuracy_before"] = preference_accuracy(score_pairs(trainer.model, eval_set, collator))

    result, seconds = stage.fit(trainer, checkpoint, log, cfg.train.peak_flops)
    metrics.update(result.metrics)
    after = score_pairs(trainer.model, train_set, collator)
    metrics["train_preference_accuracy_after"] = preference_accuracy(after)
    metrics["train_reward_accuracy_after"] = preference_accuracy(after - reference)  # DPO's implicit reward
    if eval_set is not None:
        metrics["eval_preference_accuracy_after"] = preference_accuracy(score_pairs(trainer.model, eval_set, collator))

    summary = {"n_pairs": len(train_set), "skipped_records": len(train_set.skipped), "metrics": metrics}
    stage.finish(trainer, cfg, out, seconds, summary, log, skipped=train_set.skipped,
                 save=(lambda t: lora.save(t, cfg.lora, out)) if cfg.lora.enabled else None)
    if trainer.is_world_process_zero():
        log(f"preference accuracy { {k: round(v, 3) for k, v in metrics.items() if 'preference_accuracy' in k} }")
    return out

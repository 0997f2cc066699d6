"""`vlmkit dpo`: preference tuning, read top to bottom -- set up, build, train, score, save.

It is `vlmkit train` with preference records instead of conversations: the same config
(stage `dpo`, with its own default learning rates, and the `dpo` section), the same engines
(DDP, FSDP, DeepSpeed, LoRA) and the same saved model directory; the training itself is
TRL's DPOTrainer (train/dpo.py). The pairs TRL trains on, and the reference log-probs it
precomputes, are kept in `DATA_DIR` of the output directory, where `--resume` finds them.
The preference accuracy (chosen reply more likely than the rejected one) of the training
pairs, and of `data.eval`'s, is measured before and after and written to `train_summary.json`.
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
    PreferenceDataset,
    build_trainer,
    precomputed_reference,
    preference_accuracy,
    score_pairs,
)
from vlmkit.train.run import prepare_model

DATA_DIR = "dpo_data"


def run_dpo(cfg: RunConfig, log=print) -> Path:
    """Train with DPO as configured; returns the directory of the saved model."""
    if not cfg.data.train:
        raise ConfigError("no preference data: give --train-data or data.train (see `vlmkit data preferences`)")
    out, checkpoint = stage.begin(cfg, "vlmkit dpo", log)
    # Every record is checked before the model is built.
    records, bad_lines = read_record_files(cfg.data.train, cfg.data.skip_bad, reader=read_preferences)
    eval_records = read_preferences(cfg.data.eval, skip_bad=cfg.data.skip_bad)[0] if cfg.data.eval else None
    model, processor, rates = prepare_model(cfg, records, checkpoint, log)
    log(f"DPO beta {cfg.dpo.beta}, loss {cfg.dpo.loss_type}")

    kwargs = {"max_length": cfg.data.max_length, "skip_bad": cfg.data.skip_bad, "max_pixels": cfg.data.max_pixels}
    train_set = PreferenceDataset(records, processor, **kwargs)
    train_set.skipped = bad_lines + train_set.skipped
    eval_set = PreferenceDataset(eval_records, processor, **kwargs) if eval_records else None
    trainer = build_trainer(cfg, model, processor, rates, train_set, out / DATA_DIR)

    reference = precomputed_reference(trainer.train_dataset)
    if reference is None:  # the reference runs beside training: score the starting model, which it copies
        reference = score_pairs(trainer.model, train_set, cfg.train.batch_size)
    metrics = {"train_preference_accuracy_before": preference_accuracy(reference)}
    if eval_set is not None:
        metrics["eval_preference_accuracy_before"] = preference_accuracy(score_pairs(trainer.model, eval_set))

    result, seconds = stage.fit(trainer, checkpoint, log, cfg.train.peak_flops)
    metrics.update(result.metrics)
    after = score_pairs(trainer.model, train_set)
    metrics["train_preference_accuracy_after"] = preference_accuracy(after)
    metrics["train_reward_accuracy_after"] = preference_accuracy(after - reference)  # DPO's implicit reward
    if eval_set is not None:
        metrics["eval_preference_accuracy_after"] = preference_accuracy(score_pairs(trainer.model, eval_set))

    def save(trainer: DPOTrainer) -> None:
        trainer.drop_reference_adapter()
        lora.save(trainer, cfg.lora, out)

    summary = {"n_pairs": len(train_set), "skipped_records": len(train_set.skipped), "metrics": metrics}
    stage.finish(trainer, cfg, out, seconds, summary, log, skipped=train_set.skipped,
                 save=save if cfg.lora.enabled else None)
    if trainer.is_world_process_zero():
        log(f"preference accuracy { {k: round(v, 3) for k, v in metrics.items() if 'preference_accuracy' in k} }")
    return out

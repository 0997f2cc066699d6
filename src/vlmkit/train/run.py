"""`vlmkit train`: one training stage, read top to bottom -- set up, build, train, save.

The model directory it writes (config, safetensors weights, processor, the run's config)
loads with `vlmkit eval/chat` and with transformers' Auto classes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from vlmkit.config import RunConfig
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.packing import PackedCollator
from vlmkit.data.records import read_record_files
from vlmkit.processing.markers import IMAGE_MARKER, VIDEO_MARKER
from vlmkit.errors import ConfigError
from vlmkit.model.build import build
from vlmkit.model import projector_scale
from vlmkit.processing.image_processing import concat_image_inputs
from vlmkit.train import lora, stage
from vlmkit.train.trainer import VLMTrainer, freeze_and_cache, training_arguments

CALIBRATION_RECORDS = 16  # the first records with images: enough for a mean norm, seconds of encoding


def _texts(records) -> list[str]:
    """What a from-scratch tokenizer learns from: every turn, and its role (the chat template
    writes "user" and "assistant" in every turn, so they deserve a token each)."""
    strip = lambda text: text.replace(IMAGE_MARKER, "").replace(VIDEO_MARKER, "")
    return [text for r in records for turn in r.conversations for text in (turn["role"], strip(turn["content"]))]


def _tokenizer_texts(cfg: RunConfig, records) -> list[str]:
    extra = read_record_files(cfg.data.tokenizer_data, cfg.data.skip_bad)[0] if cfg.data.tokenizer_data else []
    return _texts(records) + _texts(extra)


def prepare_model(cfg: RunConfig, records, checkpoint: str | None, log=print):
    """Build the model and processor, wrap them with LoRA if asked, and freeze by learning rate.

    Resuming reuses the checkpoint's tokenizer, so the vocabulary cannot change under the weights.
    """
    projector_scale.check_mode(cfg.train.projector_init)
    if not 0.0 <= cfg.train.lm_start < 1.0:
        raise ConfigError(f"train.lm_start is a share of the steps, from 0 up to (not including) 1; got {cfg.train.lm_start}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint) if checkpoint and not cfg.model.lm else None
    built = build(cfg.model, training_texts=lambda: _tokenizer_texts(cfg, records), tokenizer=tokenizer)
    model, processor = built.model, built.processor
    rates = cfg.train.learning_rates(built.random_modules)
    # A new projector between a pretrained tower and a pretrained LM; a resumed run loads its weights.
    if checkpoint is None and built.random_modules == {"projector"} and cfg.train.projector_init == "word_norm":
        calibrate_projector(model, records, processor, cfg, log)
    if cfg.lora.enabled:
        lora.check(cfg.lora, rates, cfg.model)
        model = lora.wrap(model, processor, cfg.lora, cfg.model, Path(cfg.train.output_dir))
    freeze_and_cache(model, model.get_base_model() if hasattr(model, "get_base_model") else model, rates,
                     cfg.train, log)
    return model, processor, rates


def calibrate_projector(model, records, processor, cfg: RunConfig, log=print) -> None:
    """Scale the new projector's output to the LM's word embeddings on the first training images
    (vlmkit/model/projector_scale.py)."""
    with_images = [record for record in records if record.images][:CALIBRATION_RECORDS]
    if not with_images:
        return
    sample = ConversationDataset(with_images, processor, cfg.data.max_length, skip_bad=cfg.data.skip_bad,
                                 max_pixels=cfg.data.max_pixels)
    if not len(sample):
        return
    inputs = concat_image_inputs([sample[i] for i in range(len(sample))])
    before, after = projector_scale.match_word_embedding_norm(model, inputs)
    log(f"projector output scaled to the LM's word embeddings: token norm {before:.3g} -> {after:.3g}")


def run(cfg: RunConfig, log=print) -> Path:
    """Train one stage as configured; returns the directory of the saved model."""
    if not cfg.data.train:
        raise ConfigError("no training data: give --train-data or data.train")
    if cfg.train.stage == "dpo":
        raise ConfigError("train.stage=dpo trains on preference records: run `vlmkit dpo` (vlmkit.train.dpo_run)")
    out, checkpoint = stage.begin(cfg, "vlmkit train", log)
    records, bad_lines = read_record_files(cfg.data.train, cfg.data.skip_bad)
    model, processor, rates = prepare_model(cfg, records, checkpoint, log)

    kwargs = {"max_length": cfg.data.max_length, "skip_bad": cfg.data.skip_bad, "max_pixels": cfg.data.max_pixels,
              "video": cfg.data.video}
    train_set = ConversationDataset(records, processor, **kwargs)
    train_set.skipped = bad_lines + train_set.skipped
    eval_set = ConversationDataset.from_jsonl(cfg.data.eval, processor, **kwargs) if cfg.data.eval else None

    pad = processor.tokenizer.pad_token_id
    collator = PackedCollator(pad, cfg.train.packing_length) if cfg.train.packing else Collator(pad)
    trainer = VLMTrainer(
        model=model,
        args=training_arguments(cfg, rates, eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=processor,
        learning_rates=rates,
        time_budget=cfg.train.time_budget,
        optimizer_name=cfg.train.optimizer,
        lm_start=cfg.train.lm_start,
    )
    result, seconds = stage.fit(trainer, checkpoint, log, cfg.train.peak_flops)
    metrics = dict(result.metrics)
    if eval_set is not None:
        metrics.update(trainer.evaluate())

    skipped = train_set.skipped + (eval_set.skipped if eval_set else [])
    summary = {"n_params": sum(p.numel() for p in model.parameters()), "n_train": len(train_set),
               "skipped_records": len(skipped), "metrics": metrics}
    stage.finish(trainer, cfg, out, seconds, summary, log, skipped=skipped,
                 save=(lambda t: lora.save(t, cfg.lora, out)) if cfg.lora.enabled else None)
    return out

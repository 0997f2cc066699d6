"""`VLMTrainer`: transformers' Trainer with one learning rate per module (vision, projector, LM),
and the Trainer's arguments from a run configuration.

Everything else -- DDP/FSDP/DeepSpeed, gradient accumulation with the loss normalised by the
supervised tokens of the whole window (`num_items_in_batch`), mixed precision, checkpoints
that resume exactly -- is the Trainer's own, except that a checkpoint is written into a staging
folder and renamed to `checkpoint-N` only when complete, and that resuming (`last_checkpoint`)
skips a `checkpoint-N` that is not complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlmkit.config import LearningRates, RunConfig, TrainConfig
from vlmkit.errors import ConfigError
from vlmkit.model.feature_cache import FeatureCache
from vlmkit.train import distributed, mfu, muon, precision
from vlmkit.train.time_budget import TimeBudget, TimeBudgetCallback

# What every training stage writes beside its model.
CONFIG_FILE = "vlmkit_run.yaml"
SUMMARY_FILE = "train_summary.json"

# Config name -> attribute of VLMForConditionalGeneration (also found under PEFT's wrappers).
MODULES = {"vision": "vision_tower", "projector": "projector", "lm": "language_model"}

# `checkpoint-N` is written as STAGING + `checkpoint-N/checkpoint-N`, then moved up. The Trainer's
# own checkpoint lookups match names that start with `checkpoint-`, so they never see a staging folder.
STAGING = "tmp-"


def training_arguments(cfg: RunConfig, rates: LearningRates, has_eval: bool,
                       arguments: type[TrainingArguments] = TrainingArguments, **extra) -> TrainingArguments:
    """The Trainer's arguments from the run's config; `arguments` may be a subclass (TRL's DPOConfig)
    given its own fields in `extra`."""
    t = cfg.train
    eval_every = t.eval_steps if t.eval_steps > 0 else None
    return arguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=max(vars(rates).values()),  # nominal: each module's group carries its own rate
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup,
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy=("steps" if eval_every else "no") if has_eval else "no",
        eval_steps=eval_every,
        bf16=precision.bf16_enabled(t.bf16),
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        report_to=t.report_to,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all" if t.packing else "non_padding",  # packed: no mask to count by
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=t.torch_compile,
        use_cpu=distributed.use_cpu(t),
        # A text-only batch leaves the vision tower and projector without gradients on its process; DDP
        # must be told, or it waits for them (the Trainer's default stops telling it under checkpointing).
        ddp_find_unused_parameters=True,
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config or None,
        deepspeed=t.deepspeed,
        **extra,
    )


def module_of(parameter_name: str) -> str | None:
    """Which of vision/projector/lm a parameter belongs to, from its (possibly wrapped) name."""
    padded = "." + parameter_name + "."
    for key, attribute in MODULES.items():
        if f".{attribute}." in padded:
            return key
    return None


def apply_learning_rates(model: nn.Module, rates: LearningRates) -> dict[str, int]:
    """Freeze the modules whose rate is 0; return the trainable parameter count of each module."""
    lrs = dataclasses.asdict(rates)
    counts = dict.fromkeys(MODULES, 0)
    for name, param in model.named_parameters():
        key = module_of(name)
        if key is not None and lrs[key] == 0:
            param.requires_grad_(False)
        if key is not None and param.requires_grad:
            counts[key] += param.numel()
    if not any(counts.values()):
        raise ConfigError(f"every module is frozen (learning rates {lrs}); nothing would train")
    return counts


def freeze_and_cache(model: nn.Module, vlm, rates: LearningRates, t: TrainConfig, log=print) -> dict[str, int]:
    """`apply_learning_rates`, logged, then the feature cache of a frozen encoder (`vlm`: the model
    whose `feature_cache` is read, e.g. under a PEFT or retriever wrapper); returns the trainable counts."""
    trainable = apply_learning_rates(model, rates)
    log(f"learning rates {vars(rates)}; trainable parameters {trainable}")
    cache_frozen_vision(vlm, trainable, t, log)
    return trainable


def cache_frozen_vision(vlm, trainable: dict[str, int], t: TrainConfig, log=print) -> None:
    """While the vision encoder is frozen, compute each image's features once (model/feature_cache.py).

    The saving is per step as well as per epoch: GradCache runs every forward twice, and the
    replay then takes the page features from the cache. Not with sharded parameters: a rank
    whose images are all cached would skip the encoder's all-gathers that the others wait on.
    """
    if trainable["vision"] or t.vision_feature_cache_gb <= 0:
        return
    if distributed.shards_parameters(t):
        log("vision features are not cached: FSDP or ZeRO-3 shards the frozen encoder, and every rank must run it")
        return
    vlm.feature_cache = FeatureCache(int(t.vision_feature_cache_gb * 2**30))
    log(f"vision encoder frozen: its features of each image are computed once and cached (up to "
        f"{t.vision_feature_cache_gb:g} GB of CPU memory, train.vision_feature_cache_gb)")


def delay_lm(scheduler: LambdaLR, start: int, warmup: int) -> None:
    """Hold the LM's learning rate at 0 for the first `start` steps, then warm it up over `warmup`
    steps into the run's schedule: the new projector learns to speak to the frozen LM first.

    LLaVA's two stages in one run. Trained together from the first step, SmolLM2's adapters
    learned each question's likeliest answer and the loss stayed at that prior, while the
    projector alone learned to make the frozen LM read the image (docs/design.md).
    """
    warmup = max(warmup, 1)
    for index, group in enumerate(scheduler.optimizer.param_groups):
        if group.get("name", "").startswith("lm"):
            shared = scheduler.lr_lambdas[index]
            scheduler.lr_lambdas[index] = lambda step, shared=shared: (
                0.0 if step < start else shared(step) * min(1.0, (step - start + 1) / warmup))
            group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)


def lm_lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers on `model`'s LM (not the vision encoder's, nor `modules_to_save` copies)."""
    from peft.tuners.lora import LoraLayer

    return [module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and module_of(name) == "lm"]


def idle_adapters(model: nn.Module, idle: bool) -> bool:
    """Switch the LoRA adapters on `model`'s LM off (`idle`) or on; returns whether it did.

    While the LM's learning rate is 0 (`train.lm_start`), fresh adapters keep their zero update
    (lora_B = 0): running them changes no output and costs time, about a tenth of a step of the
    default recipe on a CPU (1,260 small matmuls a step at r 16 on SmolLM2). Switched off, they
    get no gradient, which AdamW skips and gradient clipping no longer counts (on, their unused
    gradients shrank the projector's clipped step); switched on, they start with fresh moments.
    Left on: adapters whose B is not zero (loaded ones: they change the output), and a model with
    nothing else to train (the backward pass would have no gradient to compute).
    """
    layers = lm_lora_layers(model)
    if idle:
        adapters = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
        others = any(p.requires_grad and id(p) not in adapters for p in model.parameters())
        loaded = any(p.any() for layer in layers for name, p in layer.named_parameters() if "lora_B" in name)
        if not layers or not others or loaded:
            return False
    for layer in layers:
        layer.enable_adapters(not idle)
    return bool(layers)


class VLMTrainer(Trainer):
    """Trainer whose optimizer has decay/no-decay groups per module, each at its own peak rate;
    with `time_budget` (seconds) its schedule follows the clock and it stops when time is up."""

    def __init__(self, *args, learning_rates: LearningRates, time_budget: float = 0.0, optimizer_name: str = "adamw",
                 lm_start: float = 0.0, **kwargs):
        self.learning_rates = learning_rates
        self.lm_start = lm_start
        self.optimizer_name = optimizer_name
        self.lm_start_step = 0  # the first step at which the LM learns (set with the schedule)
        self._adapters_idle = False  # LoRA adapters switched off until lm_start_step (idle_adapters)
        self._adapters_may_idle = True
        self._staging_dir = None  # set while a checkpoint is being written
        super().__init__(*args, **kwargs)
        self.time_budget = None
        if time_budget > 0:  # settings checked by time_budget.check, through stage.begin
            self.time_budget = TimeBudget(time_budget, self.args.warmup_steps)
            self.add_callback(TimeBudgetCallback(self.time_budget))

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # whatever ended the run, the model leaves with its adapters on
            if self._adapters_idle:
                self._adapters_idle = not idle_adapters(self.model, False)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Before lm_start_step, fresh adapters only cost time (idle_adapters). Not under DDP, FSDP
        # or DeepSpeed, even in one process: they expect the same parameters to get gradients on
        # every step, and ZeRO-3's parameters are empty outside a gather.
        idle = (self.state.global_step < self.lm_start_step and self._adapters_may_idle and self.args.world_size == 1
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled)
        if idle != self._adapters_idle:
            switched = idle_adapters(model, idle)
            self._adapters_idle = idle and switched
            self._adapters_may_idle = switched or not idle  # asked once: the answer does not change mid-delay
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs: dict) -> int:
        """A step's training FLOPs as MFU counts them (train/mfu.py); transformers' default would
        charge every parameter, the vision tower's included, to every text token."""
        if "input_ids" not in inputs:  # a retriever's query/page batches: not counted
            return 0
        if getattr(self, "_flops_per_token", None) is None:
            self._flops_per_token = mfu.flops_per_token(self.model)
        return self._flops_per_token * inputs["input_ids"].numel()

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied LM head is saved once, as the embeddings, and comes back through the tie: its key
        # missing from a checkpoint is no news (transformers warned about it on every resume).
        seen, tied = set(), set()  # parameter ids met so far; names of the second and later uses
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed to `checkpoint-N` only
        when every process has written its part: a kill mid-write leaves a staging folder (removed
        by the next save), never a `checkpoint-N` that `--resume` would take and fail on."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING + name)
        if self.args.should_save:
            for leftover in Path(run_dir).glob(f"{STAGING}{PREFIX_CHECKPOINT_DIR}-*"):  # of saves killed midway
                shutil.rmtree(leftover)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging  # the Trainer writes staging/checkpoint-N (and rotates nothing there)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):  # e.g. an incomplete one that resuming skipped
                os.replace(final, os.path.join(staging, "replaced"))
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging)
            # (vlmkit sets no metric_for_best_model, so there is no best checkpoint to keep apart)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # every process leaves the save with the checkpoint in place

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_budget is None or self.lr_scheduler is not None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if self.lm_start:
                self.lm_start_step = int(self.lm_start * num_training_steps)
                delay_lm(scheduler, self.lm_start_step, self.args.get_warmup_steps(num_training_steps))
            return scheduler
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, self.time_budget.lr_multiplier)
        return self.lr_scheduler

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        lrs = dataclasses.asdict(self.learning_rates)
        groups: dict[tuple, dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = module_of(name) or "lm"  # anything outside the three (e.g. an embedding head) trains with the LM
            weight_decay = self.args.weight_decay if name in decay else 0.0
            group = groups.setdefault((key, weight_decay), {"params": [], "lr": lrs[key], "weight_decay": weight_decay,
                                                            "name": f"{key}{'' if weight_decay else '_no_decay'}"})
            group["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        if self.optimizer_name == "muon":
            names = {id(param): name for name, param in model.named_parameters()}
            self.optimizer = muon.build(list(groups.values()), names, optimizer_kwargs)
        else:
            self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer


def last_checkpoint(output_dir: str | Path, log=print) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` to resume from, or None.

    An incomplete one (a kill while an older vlmkit wrote it in place, or a machine that lost power
    before its files reached the disk) is skipped with a warning naming it and what is wrong.
    """
    steps = {}
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            steps[path] = int(match[1])
    for path in sorted(steps, key=steps.get, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log(f"warning: skipping the incomplete checkpoint {path} ({problem}); trying the one before it")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, or None. The Trainer writes its
    state file last, so a folder with a readable one and no empty file is complete."""
    try:
        json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["global_step"]
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE_NAME} is unreadable"
    empty = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file() and not f.stat().st_size)
    if empty:
        return f"empty file(s): {', '.join(empty)}"
    return None

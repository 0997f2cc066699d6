"""`VLMTrainer`: transformers' Trainer with one learning rate per module (vision, projector, LM),
and the Trainer's arguments from a run configuration.

Everything else -- DDP/FSDP/DeepSpeed, gradient accumulation with the loss normalised by the
supervised tokens of the whole window (`num_items_in_batch`), mixed precision, checkpoints
that resume exactly -- is the Trainer's own.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments

from vlmkit.config import LearningRates, RunConfig
from vlmkit.errors import ConfigError
from vlmkit.train import distributed, muon, precision
from vlmkit.train.time_budget import TimeBudget, TimeBudgetCallback

# What every training stage writes beside its model.
CONFIG_FILE = "vlmkit_run.yaml"
SUMMARY_FILE = "train_summary.json"

# Config name -> attribute of VLMForConditionalGeneration (also found under PEFT's wrappers).
MODULES = {"vision": "vision_tower", "projector": "projector", "lm": "language_model"}


def training_arguments(cfg: RunConfig, rates: LearningRates, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    eval_every = t.eval_steps if t.eval_steps > 0 else None
    return TrainingArguments(
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


class VLMTrainer(Trainer):
    """Trainer whose optimizer has decay/no-decay groups per module, each at its own peak rate;
    with `time_budget` (seconds) its schedule follows the clock and it stops when time is up."""

    def __init__(self, *args, learning_rates: LearningRates, time_budget: float = 0.0, optimizer_name: str = "adamw",
                 **kwargs):
        self.learning_rates = learning_rates
        self.optimizer_name = optimizer_name
        super().__init__(*args, **kwargs)
        self.time_budget = None
        if time_budget > 0:  # settings checked by time_budget.check, through distributed.check
            self.time_budget = TimeBudget(time_budget, self.args.warmup_steps)
            self.add_callback(TimeBudgetCallback(self.time_budget))

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_budget is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
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

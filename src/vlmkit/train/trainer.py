"""`VLMTrainer`: transformers' Trainer with one learning rate per module (vision, projector, LM).

Everything else -- DDP/FSDP/DeepSpeed, gradient accumulation with the loss normalised by the
supervised tokens of the whole window (`num_items_in_batch`), mixed precision, checkpoints
that resume exactly -- is the Trainer's own.
"""

from __future__ import annotations

import dataclasses

from torch import nn
from transformers import Trainer

from vlmkit.config import LearningRates
from vlmkit.errors import ConfigError

# Config name -> attribute of VLMForConditionalGeneration (also found under PEFT's wrappers).
MODULES = {"vision": "vision_tower", "projector": "projector", "lm": "language_model"}


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
    """Trainer whose optimizer has decay/no-decay groups per module, each at its own peak rate."""

    def __init__(self, *args, learning_rates: LearningRates, **kwargs):
        self.learning_rates = learning_rates
        super().__init__(*args, **kwargs)

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
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

"""`train.optimizer: muon`: torch's Muon for the LM's hidden weight matrices, AdamW for the rest.

Muon orthogonalises each matrix's momentum before the step (Jordan et al., 2024), and is meant
for the hidden layers' 2-D weights only: embeddings, the LM head, norms, biases and convolutions
stay with AdamW. torch ships `torch.optim.Muon` but no way to run it beside AdamW as the one
optimizer the Trainer (and its LR scheduler, checkpoints and accelerate's wrapper) expects, and
transformers 5 names Muon without shipping it; `MuonWithAdamW` is that adapter.

torch's Muon also orthogonalises one matrix at a time (its `foreach` option raises
NotImplementedError); small matrices one by one keep two cores poorly busy. `GroupedMuon`
stacks the matrices of one shape and runs the same Newton-Schulz iteration on the stack (a
transformer's layers share a handful of shapes): training a 3-layer LM of width 160, the
optimizer step fell from 12% to 7% of the time sampled (docs/finetuning.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from vlmkit.config import TrainConfig
from vlmkit.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")

# Moonshot's scaling ("Muon is Scalable for LLM Training"): the update's RMS matches AdamW's, so
# a module's AdamW learning rate and weight decay carry over to its Muon matrices.
ADJUST_LR = "match_rms_adamw"


def check(t: TrainConfig) -> None:
    """Raise ConfigError for an unknown optimizer, or Muon under an engine that flattens matrices."""
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer {t.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if t.optimizer == "muon" and (t.deepspeed or t.fsdp):
        # ZeRO and FSDP hand the optimizer flattened shards, in which a weight matrix no longer exists.
        raise ConfigError("train.optimizer=muon needs whole weight matrices: use it with one process or DDP, "
                          "not with train.deepspeed or train.fsdp")


def takes_muon(name: str, param: nn.Parameter) -> bool:
    """A hidden 2-D weight of the language model: not the embeddings, not the head."""
    return (param.ndim == 2 and ".language_model." in f".{name}" and "embed" not in name
            and "lm_head" not in name)


def newton_schulz(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """torch's `_zeropower_via_newtonschulz` over a stack of (n, rows, cols) matrices at once."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = x.size(1) > x.size(2)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _closure_loss(closure):
    """Run an optimizer's closure as torch's optimizers do: with gradients on, inside `no_grad` steps."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The rate torch's Muon applies to a matrix of this shape (its private `_adjust_lr`)."""
    rows, cols = shape
    if adjust_lr_fn == ADJUST_LR:
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


class GroupedMuon(torch.optim.Muon):
    """torch's Muon (same settings, state and checkpoints) with one Newton-Schulz run per stack of
    same-shaped matrices. It leans on torch's `_init_group` (state and momentum buffers) and its
    `_foreach` kernels; tests/train/test_muon.py pins every update to torch's own step."""

    # A stack's float32 and bf16 copies are held at once; past this many elements it is split,
    # so a large model's peak memory stays near torch's one-matrix-at-a-time loop.
    MAX_STACK_ELEMENTS = 1 << 24

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            lr, momentum = float(group["lr"]), group["momentum"]  # torch allows a 1-element tensor
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = [g.lerp(m, momentum) for g, m in zip(grads, buffers)] if group["nesterov"] else buffers
            stacks: dict[tuple, list[int]] = {}
            for i, param in enumerate(params):
                stacks.setdefault((param.shape, param.device, param.dtype), []).append(i)
            for (shape, _, _), indices in stacks.items():
                per_stack = max(1, self.MAX_STACK_ELEMENTS // shape.numel())
                for start in range(0, len(indices), per_stack):
                    chunk = indices[start : start + per_stack]
                    stack = torch.stack([updates[i] for i in chunk])
                    ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                    same = [params[i] for i in chunk]
                    torch._foreach_mul_(same, 1 - lr * group["weight_decay"])
                    rate = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                    torch._foreach_add_(same, list(ortho.to(same[0].dtype).unbind(0)), alpha=-rate)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over a Muon and an AdamW; `param_groups` are theirs (the same dicts), so a
    scheduler's learning rates reach both, and the state dict holds both."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], muon_kwargs: dict, adamw_kwargs: dict):
        self.parts = []
        if muon_groups:
            self.parts.append(GroupedMuon(muon_groups, adjust_lr_fn=ADJUST_LR, **muon_kwargs))
        if adamw_groups:
            self.parts.append(torch.optim.AdamW(adamw_groups, **adamw_kwargs))
        # Not Optimizer.__init__: the groups and state live in the two parts.
        self.defaults = {}
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())

    @property
    def param_groups(self):
        # Read from the parts each time: their load_state_dict (accelerate calls it when it wraps
        # the optimizer) replaces their group dicts, and a list kept here would go stale.
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self):
        return {param: value for part in self.parts for param, value in part.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict):
        for part, saved in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(saved)


def build(groups: list[dict], names: dict[int, str], adamw_kwargs: dict, momentum: float = 0.95) -> MuonWithAdamW:
    """Split each parameter group into its Muon matrices and the rest, keeping rate and decay."""
    muon_groups, adamw_groups = [], []
    for group in groups:
        muon = [p for p in group["params"] if takes_muon(names[id(p)], p)]
        rest = [p for p in group["params"] if not takes_muon(names[id(p)], p)]
        settings = {key: value for key, value in group.items() if key != "params"}
        if muon:
            muon_groups.append({**settings, "params": muon, "name": settings["name"] + "_muon"})
        if rest:
            adamw_groups.append({**settings, "params": rest})
    return MuonWithAdamW(muon_groups, adamw_groups, {"momentum": momentum}, adamw_kwargs)

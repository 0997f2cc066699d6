"""Checks on the distributed settings (DDP, FSDP, DeepSpeed), made before anything is built.

The engines themselves are the Trainer's: `torchrun --nproc_per_node N -m vlmkit train ...`
gives DDP; `train.fsdp` and `train.deepspeed` hand the model to FSDP or DeepSpeed. What is
checked here are the mistakes those engines would only report after the model is built, or
in terms of their own option names: a DeepSpeed file that is missing, not JSON, or says
something other than the command line does.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from vlmkit.config import TrainConfig
from vlmkit.errors import ConfigError
from vlmkit.recipes import shipped_config
from vlmkit.train import precision


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def multi_process_cpu() -> bool:
    """Several processes and no GPU: the Trainer must be told to use the CPU, or accelerate sees no
    distributed setup and each process trains alone (gloo is then the backend)."""
    import torch

    return _world_size() > 1 and not torch.cuda.is_available()


def use_cpu(t: TrainConfig) -> bool:
    """The Trainer's `use_cpu`: for several CPU processes, and for bf16 with no GPU, which the Trainer
    otherwise refuses ("doesn't support bf16/gpu") although autocast runs it on the CPU."""
    import torch

    accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    return multi_process_cpu() or (precision.bf16_enabled(t.bf16) and not accelerator)


def _value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def shards_parameters(t: TrainConfig) -> bool:
    """Whether FSDP or DeepSpeed ZeRO-3 shards the parameters. Then each forward of a module gathers
    its shards from every rank, so no rank may skip a module that another runs."""
    if t.fsdp:
        return True
    if not t.deepspeed:
        return False
    ds = json.loads(Path(shipped_config(t.deepspeed, ".json")).read_text())
    return _value(ds, "zero_optimization.stage") == 3


def deepspeed_mismatches(ds: dict, t: TrainConfig, world_size: int) -> list[str]:
    """Fields of a DeepSpeed config that contradict the run's settings ("auto" always agrees)."""
    expected = {
        "train_micro_batch_size_per_gpu": (t.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "train.grad_accum"),
        "train_batch_size": (t.batch_size * t.grad_accum * world_size, "train.batch_size * grad_accum * processes"),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
        "bf16.enabled": (precision.bf16_enabled(t.bf16), "train.bf16"),
        "fp16.enabled": (False, "vlmkit's float32/bf16 training"),
    }
    problems = []
    for key, (want, source) in expected.items():
        have = _value(ds, key)
        if have is not None and have != "auto" and have != want:
            problems.append(f"{key} is {have!r} but {source} gives {want!r}")
    if "optimizer" in ds:
        problems.append("it has an optimizer section; vlmkit builds the optimizer itself (one learning rate per "
                        "module), so remove it")
    return problems


def check(t: TrainConfig) -> None:
    """Raise ConfigError for distributed settings that cannot work together or contradict each other.

    A `train.deepspeed` that names a shipped config (`deepspeed-zero2`, `vlmkit/configs/deepspeed-zero2.json`)
    is replaced by that file's path here, before the Trainer reads it."""
    if t.deepspeed and t.fsdp:
        raise ConfigError("train.deepspeed and train.fsdp are both set; choose one engine")
    if not t.deepspeed:
        return
    try:
        t.deepspeed = shipped_config(t.deepspeed, ".json")
    except ConfigError as err:
        raise ConfigError(f"train.deepspeed: {err}") from None
    path = Path(t.deepspeed)
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.deepspeed needs the deepspeed package: pip install 'vlmkit[finetune]'")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    problems = deepspeed_mismatches(ds, t, _world_size())
    if problems:
        raise ConfigError(f"{path} contradicts the command line: " + "; ".join(problems)
                          + ' (use "auto" to take the command line\'s value)')

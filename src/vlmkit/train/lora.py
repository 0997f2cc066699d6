"""LoRA and QLoRA through PEFT: wrap the model before training, save adapters or a merged model, load either.

Adapters go on the LM's linear layers (and, with `lora.vision`, the vision encoder's);
`lora.modules_to_save` (the projector by default) trains in full. Every trainable parameter
keeps its module's learning rate (`train.lr.*`), because `module_of` reads PEFT's wrapped
names. An adapter directory names the base model it belongs to: `model.init_from`, or the
`base/` folder written beside it when the base was built here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from vlmkit.config import LearningRates, LoraSettings, ModelConfig
from vlmkit.errors import ConfigError
from vlmkit.files import write_text_atomic

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"
PARTS = {"lm": "language_model", "vision": "vision_tower"}


def _linear_names(model: nn.Module, part: str) -> set[str]:
    """Last name components of the nn.Linear layers inside `part` (what target_modules may list)."""
    module = getattr(model, part)
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _target_pattern(model: nn.Module, cfg: LoraSettings) -> str:
    """A regex for PEFT (full match on module names) that confines each name list to its own part, so
    the LM's `q_proj` never catches the vision encoder's."""
    wanted = {"lm": cfg.target_modules} | ({"vision": cfg.vision_target_modules} if cfg.vision else {})
    alternatives = []
    for key, names in wanted.items():
        if not names:
            raise ConfigError(f"lora.{'vision_' if key == 'vision' else ''}target_modules is empty")
        available = _linear_names(model, PARTS[key])
        missing = sorted(set(names) - available)
        if missing:
            field = "vision_target_modules" if key == "vision" else "target_modules"
            raise ConfigError(f"lora.{field}: {', '.join(missing)} match no linear layer of model.{PARTS[key]}; "
                              f"its linear layers are named {', '.join(sorted(available))}")
        alternatives.append(rf"{PARTS[key]}\..*\.({'|'.join(sorted(set(names)))})")
    return "|".join(f"(?:{a})" for a in alternatives)


def check(cfg: LoraSettings, rates: LearningRates, model_cfg: ModelConfig) -> None:
    """Settings that would train nothing, or could not work here, fail before anything is built."""
    if cfg.save not in ("adapter", "merged"):
        raise ConfigError(f"lora.save {cfg.save!r} must be 'adapter' or 'merged'")
    if rates.lm == 0:
        raise ConfigError("lora.enabled puts adapters on the LM, but train.lr.lm is 0; give it a rate (e.g. 2e-4)")
    if cfg.vision and rates.vision == 0:
        raise ConfigError("lora.vision is on but train.lr.vision is 0, so its adapters would never train")
    if "projector" in cfg.modules_to_save and rates.projector == 0:
        raise ConfigError("lora.modules_to_save lists projector but train.lr.projector is 0")
    if cfg.quantize is not None:
        _check_quantize(cfg, model_cfg)


def _check_quantize(cfg: LoraSettings, model_cfg: ModelConfig) -> None:
    import importlib.util

    import torch

    if cfg.quantize != "4bit":
        raise ConfigError(f"lora.quantize {cfg.quantize!r} must be null or '4bit' (QLoRA)")
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.quantize=4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package "
                          "(pip install bitsandbytes); here, use plain LoRA (lora.quantize=null)")
    if not model_cfg.init_from:
        raise ConfigError("lora.quantize=4bit loads a saved model in 4 bits; give model.init_from")


def _quantized_base(model_cfg: ModelConfig) -> nn.Module:
    """The saved model at `init_from` with 4-bit linear layers in the LM (vision encoder and projector kept)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from vlmkit.model.modeling import VLMForConditionalGeneration

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16,
                                      llm_int8_skip_modules=["vision_tower", "projector", "lm_head"])
    model = VLMForConditionalGeneration.from_pretrained(model_cfg.init_from, quantization_config=quantization)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def wrap(model: nn.Module, processor, cfg: LoraSettings, model_cfg: ModelConfig, output_dir: str | Path):
    """The PEFT model to train. Writes the base model to `output_dir/base` (main process only) when
    adapters alone will be saved and the base is not already a saved model."""
    from peft import LoraConfig, get_peft_model

    if cfg.quantize:
        model = _quantized_base(model_cfg)
    base = None
    if model_cfg.init_from:
        base = str(Path(model_cfg.init_from).resolve())
    elif cfg.save == "adapter":
        base = str((Path(output_dir) / BASE_DIR).resolve())  # absolute while training: PEFT reads it when saving
        if int(os.environ.get("RANK", "0")) == 0 and not (Path(base) / "config.json").is_file():
            model.save_pretrained(base)
            processor.save_pretrained(base)
    peft_config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=_target_pattern(model, cfg),
                             modules_to_save=list(cfg.modules_to_save) or None)
    peft_model = get_peft_model(model, peft_config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def save(trainer, cfg: LoraSettings, output_dir: str | Path) -> None:
    """Adapters alone (the Trainer's save of a PEFT model), or the adapters merged into one plain model."""
    if cfg.save == "adapter":
        trainer.save_model(str(output_dir))
        config_file, beside = Path(output_dir) / ADAPTER_CONFIG, str((Path(output_dir) / BASE_DIR).resolve())
        config = json.loads(config_file.read_text()) if trainer.is_world_process_zero() else {}
        if config.get("base_model_name_or_path") == beside:  # named relatively, so the pair can move together
            write_text_atomic(config_file, json.dumps({**config, "base_model_name_or_path": BASE_DIR}, indent=2))
        return
    if trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(str(output_dir))
        trainer.processing_class.save_pretrained(str(output_dir))


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def load(directory: str | Path, merge: bool = False):
    """Model and processor from a saved model, merged or adapter-only; `merge` folds adapters in."""
    from peft import PeftModel

    from vlmkit.model.modeling import VLMForConditionalGeneration
    from vlmkit.processing.processor import VLMProcessor

    directory = Path(directory)
    processor = VLMProcessor.from_pretrained(directory)
    if not is_adapter(directory):
        return VLMForConditionalGeneration.from_pretrained(directory), processor
    base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{directory / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    base_dir = Path(base) if Path(base).is_absolute() else directory / base
    if not (base_dir / "config.json").is_file():
        raise ConfigError(f"the adapters in {directory} belong to the base model {base_dir}, which is not there")
    model = PeftModel.from_pretrained(VLMForConditionalGeneration.from_pretrained(base_dir), directory)
    return (model.merge_and_unload() if merge else model), processor

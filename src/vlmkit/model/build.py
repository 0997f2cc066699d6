"""Compose a model and its processor from a `ModelConfig`.

Three sources, mixable: a saved vlmkit model (`init_from`), checkpoints of a vision encoder
and a causal LM (`vision`, `lm`), or their configs with random weights. Nothing is
downloaded and remote code is never trusted: a checkpoint is a local directory, a GGUF file
(`lm` only, dequantised on load), or the hub-style id of one that `vlmkit models fetch` put in
vlmkit's cache (`vlmkit/model/pretrained.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vlmkit.config import ModelConfig
from vlmkit.errors import ConfigError
from vlmkit.model import pretrained, vision
from vlmkit.model.configuration import VLMConfig
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.model.tokens import grid_multiple, image_token_spec
from vlmkit.processing.image_processing import CLIP_MEAN, CLIP_STD, VLMImageProcessor
from vlmkit.processing.processor import VLMProcessor
from vlmkit.processing.tokenizer_training import IMAGE_TOKEN, adapt_pretrained_tokenizer, train_tokenizer

# float64 is for exactness checks (equivalence tests), not for training.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SigLIP's normalisation, also used from scratch


@dataclass
class Built:
    model: VLMForConditionalGeneration
    processor: VLMProcessor
    random_modules: frozenset[str]  # of "vision", "projector", "lm": those starting from random weights


def _local_dir(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(f"model.{what} = {path!r} is not a local checkpoint directory with a config.json "
                          "(vlmkit never downloads weights; point it at a saved checkpoint)")
    return p


def checkpoint_dir(name: str, what: str) -> Path:
    """The local directory of `model.<what>`: a directory as given, or a fetched checkpoint's id."""
    directory = pretrained.resolve(name)
    if directory is None or not (directory / "config.json").is_file():
        known = ", ".join(pretrained.CHECKPOINTS)
        raise ConfigError(f"model.{what} = {name!r} is neither a local checkpoint directory with a config.json nor "
                          f"a fetched checkpoint; vlmkit never downloads from a model hub. `vlmkit models fetch` "
                          f"provides {known}; any other model must be saved to a local directory first")
    return directory


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_vision_tower(path: str, cfg: ModelConfig):
    """A vision tower from a vision-only or a full (text+vision, as CLIP's) checkpoint."""
    directory = checkpoint_dir(path, "vision")
    config = AutoConfig.from_pretrained(directory)
    config = getattr(config, "vision_config", config)  # full CLIP/SigLIP checkpoints hold a vision_config
    vision.check_supported(config)
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False  # vlmkit takes patch features; the pooling head would go unused
    model_class = MODEL_MAPPING[type(config)]
    tower = model_class.from_pretrained(directory, config=config, dtype=_dtype(cfg.dtype), **_attention(cfg, config))
    vision.probe_prefix_tokens(tower)
    return tower


def _config_from_dict(values: dict, field: str):
    if "model_type" not in values:
        raise ConfigError(f"model.{field} needs a model_type (e.g. llama, qwen2, clip_vision_model, regnet)")
    try:
        return AutoConfig.for_model(**values)
    except (ValueError, TypeError) as err:  # transformers validates configs as it builds them
        raise ConfigError(f"model.{field} is not a valid {values['model_type']} config: {err}") from None


def _attention(cfg: ModelConfig, vision_config) -> dict:
    """The attention implementation to ask for; convolutional encoders have no attention to choose."""
    return {} if vision.is_cnn(vision_config) else {"attn_implementation": cfg.attn_implementation}


def tower_image_processor(cfg: ModelConfig, config, multiple: int | None = None) -> VLMImageProcessor:
    """The image processor for the tower of `config` (a VLMConfig, or anything with its `vision_config`
    and `image_size`): a saved tower's own normalisation, else CLIP's for CLIP, else SigLIP's."""
    vision_config = config.vision_config
    mean, std = HALF_MEAN_STD
    if cfg.vision:
        saved = checkpoint_dir(cfg.vision, "vision") / "preprocessor_config.json"
        if saved.is_file():
            data = json.loads(saved.read_text())
            mean, std = data.get("image_mean", mean), data.get("image_std", std)
        elif vision_config.model_type == "clip_vision_model":
            mean, std = CLIP_MEAN, CLIP_STD
    # ViT towers interpolate their position embeddings for a crop_size other than their own (MiniCPM-V's 448).
    return VLMImageProcessor(size=cfg.crop_size or vision.input_size(config), image_mean=mean, image_std=std,
                             resize_mode=cfg.image_resize_mode, slicing=cfg.slicing, max_slices=cfg.max_slices,
                             multiple=multiple or vision.stride(vision_config))


def build_vision_tower(cfg: ModelConfig) -> tuple[torch.nn.Module, bool]:
    """The vision tower of `cfg`, from its checkpoint or with random weights; and whether it is random."""
    if cfg.vision:
        return load_vision_tower(cfg.vision, cfg), False
    vision_config = _config_from_dict(cfg.vision_config, "vision_config")
    vision.check_supported(vision_config)
    tower = AutoModel.from_config(vision_config, dtype=_dtype(cfg.dtype), **_attention(cfg, vision_config))
    vision.probe_prefix_tokens(tower)
    return tower, True


def load_language_model(cfg: ModelConfig):
    """The pretrained LM of `cfg.lm` (a directory, a fetched id or a GGUF file) and its tokenizer, adapted."""
    dtype, path = _dtype(cfg.dtype), Path(cfg.lm).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.lm = {cfg.lm!r}: no such GGUF file")
        from vlmkit.model.convert import load_gguf_causal_lm

        lm, tokenizer = load_gguf_causal_lm(path, dtype)
        lm.config._attn_implementation = cfg.attn_implementation
    else:
        directory = checkpoint_dir(cfg.lm, "lm")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=cfg.attn_implementation)
    tokenizer = adapt_pretrained_tokenizer(tokenizer, sliced=cfg.slicing is not None)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))  # new rows drawn around the mean of the old ones
    return lm, tokenizer


def build(cfg: ModelConfig, training_texts: Callable[[], Iterable[str]] | None = None, tokenizer=None) -> Built:
    """Build (or load) the model and processor described by `cfg`.

    With no LM checkpoint, `tokenizer` is used when given (a resumed run's), else a BPE
    tokenizer is trained on `training_texts()`.
    """
    if cfg.init_from:
        directory = _local_dir(cfg.init_from, "init_from")
        saved = VLMConfig.from_pretrained(directory)
        # Per sub-model: a CNN tower accepts only "eager" (it has no attention to implement).
        vision_attention = "eager" if vision.is_cnn(saved.vision_config) else cfg.attn_implementation
        attention = {"": cfg.attn_implementation, "text_config": cfg.attn_implementation,
                     "vision_config": vision_attention}
        model = VLMForConditionalGeneration.from_pretrained(directory, dtype=_dtype(cfg.dtype),
                                                            attn_implementation=attention)
        return Built(model, VLMProcessor.from_pretrained(directory), frozenset())

    dtype, random = _dtype(cfg.dtype), {"projector"}
    tower, random_tower = build_vision_tower(cfg)
    if random_tower:
        random.add("vision")

    if cfg.lm:
        lm, tokenizer = load_language_model(cfg)
    else:
        if tokenizer is None and training_texts is None:
            raise ConfigError("no model.lm checkpoint and no training data to train a tokenizer on; "
                              "give data.train or model.lm")
        tokenizer = tokenizer or train_tokenizer(training_texts(), cfg.vocab_size)
        text_config = _config_from_dict({**cfg.text_config, "vocab_size": len(tokenizer)}, "text_config")
        lm = AutoModelForCausalLM.from_config(text_config, dtype=dtype, attn_implementation=cfg.attn_implementation)
        random.add("lm")

    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    for key, value in special.items():
        setattr(lm.config, key, value)
    config = VLMConfig(
        vision_config=tower.config, text_config=lm.config, projector_type=cfg.projector,
        projector_args=cfg.projector_args, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_size=cfg.image_size,
    )
    model = VLMForConditionalGeneration(config, vision_tower=tower, language_model=lm).to(dtype)
    # A pretrained LM keeps its own generation settings (end-of-turn ids, sampling defaults). The
    # placeholder token must never be generated: it would ask for image features that don't exist.
    generation = lm.generation_config if cfg.lm else GenerationConfig(**special)
    generation.suppress_tokens = [*(generation.suppress_tokens or []), config.image_token_id]
    generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation
    # Slices must cut into whole patches, and into whole groups of them for a pixel shuffle.
    multiple = vision.stride(config.vision_config) * grid_multiple(image_token_spec(config))
    processor = VLMProcessor(tower_image_processor(cfg, config, multiple), tokenizer,
                             image_token_spec=image_token_spec(config))
    return Built(model, processor, frozenset(random))

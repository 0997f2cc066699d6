"""Recipes: each seed system as a config under `configs/recipes/`, and `--tiny` to shrink one.

Every config shipped with vlmkit (recipes, `lora.yaml`, `ddp.yaml`, the DeepSpeed JSON files, ...)
can be named by name, from a clone or an installed package: `shipped_config`.

A recipe names real checkpoints by local path. `shrink` keeps everything that defines the
design (encoder and LM families, projector, token layout, slicing, freezing, learning rates,
LoRA) and swaps the checkpoints for tiny random-weight models of the same families, so every
recipe trains in seconds on the built-in data -- the tests do exactly that, so recipes cannot rot.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlmkit.errors import ConfigError

CONFIGS = resources.files("vlmkit") / "configs"  # shipped configs: YAML run configs, DeepSpeed JSON
RECIPES = CONFIGS / "recipes"

# Sizes of the tiny towers and LMs, per family; anything not listed keeps the family's defaults.
TINY_VISION = {
    "clip_vision_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "siglip_vision_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "siglip2_vision_model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_patches": 16, "patch_size": 8},
}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 2048, "tie_word_embeddings": True}
# Projector sizes that scale with the real model; the tiny one takes the LM's width instead.
SIZED_PROJECTOR_ARGS = ("hidden_size", "heads", "intermediate_size")
TINY_QUERIES = 8


def shipped_names(suffix: str = ".yaml") -> list[str]:
    """Names of the configs shipped with vlmkit whose files end in `suffix`: `lora`, ..., `recipes/llava`, ..."""
    return [prefix + stem for prefix, folder in (("", CONFIGS), ("recipes/", RECIPES))
            for stem in sorted(p.name.removesuffix(suffix) for p in folder.iterdir() if p.name.endswith(suffix))]


def shipped_config(name: str | Path | None, suffix: str = ".yaml") -> str | Path | None:
    """`name` itself when it is a file (or None); else the config shipped with vlmkit that it names.

    `lora`, `lora.yaml`, `configs/lora`, `vlmkit/configs/lora.yaml` and `src/vlmkit/configs/lora.yaml`
    all name the shipped `lora.yaml`, so the paths the docs write work from any directory and from an
    installed package; a bare name that is no top-level config is looked up among the recipes
    (`minicpm-v` or `recipes/minicpm-v`). Anything else is a ConfigError listing what ships.
    """
    if name is None or Path(name).is_file():
        return name
    bare = str(name)
    for prefix in ("src/vlmkit/configs/", "vlmkit/configs/", "configs/"):
        if bare.startswith(prefix):
            bare = bare.removeprefix(prefix)
            break
    folder, _, stem = bare.removesuffix(suffix).rpartition("/")
    for where in {"": (CONFIGS, RECIPES), "recipes": (RECIPES,)}.get(folder, ()):
        if stem and (where / f"{stem}{suffix}").is_file():
            return str(where / f"{stem}{suffix}")
    raise ConfigError(f"config file {name} not found, and no config shipped with vlmkit has that name; the "
                      f"shipped {suffix.lstrip('.').upper()} configs are: {', '.join(shipped_names(suffix))}")


def recipe_path(name: str | Path | None) -> str | Path | None:
    """The YAML run config `name` names (a file, or a shipped config or recipe by name): `load_config`'s reading."""
    return shipped_config(name, ".yaml")


def shrink(config):
    """The same recipe at tiny scale with random weights (`config` is a run config; changed in place)."""
    model = config.model
    vision_type = model.vision_config.get("model_type")
    if vision_type not in TINY_VISION:
        raise ConfigError(f"--tiny has no tiny {vision_type!r} tower; it shrinks {', '.join(TINY_VISION)}")
    model.init_from = model.vision = model.lm = None
    model.vision_config = {"model_type": vision_type, **TINY_VISION[vision_type]}
    model.text_config = {"model_type": model.text_config.get("model_type", "llama"), **TINY_TEXT}
    model.image_size, model.crop_size, model.dtype = None, None, "float32"
    args = {k: v for k, v in model.projector_args.items() if k not in SIZED_PROJECTOR_ARGS}
    if "num_queries" in args or model.projector in ("resampler", "qformer"):
        args["num_queries"] = min(int(args.get("num_queries", TINY_QUERIES)), TINY_QUERIES)
    if "depth" in args:
        args["depth"] = min(int(args["depth"]), 2)
    if args.get("cross_attention_frequency", 1) > args.get("depth", 2):
        args["cross_attention_frequency"] = 1
    model.projector_args = args
    train = config.train
    train.batch_size, train.grad_accum = min(train.batch_size, 4), 1
    train.bf16, train.gradient_checkpointing, train.deepspeed, train.fsdp = False, False, None, ""
    train.report_to = []
    if hasattr(config, "lora"):
        config.lora.quantize = None
    if hasattr(config, "retrieval"):
        config.retrieval.init_from = None
        config.retrieval.grad_cache_micro_batch_size = min(config.retrieval.grad_cache_micro_batch_size, 2)
    return config

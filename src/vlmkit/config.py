"""Run configuration: dataclasses, read from YAML, changed with dotted `key=value` overrides.

The dataclass defaults are the base layer every config file is merged over; they describe the
tiny from-scratch model, spelled out in `configs/scratch.yaml` (a test keeps the two equal).
`vlmkit train` with no config file uses the `default` recipe (`configs/default.yaml`): a
pretrained vision encoder and a pretrained instruction-tuned LM, composed. The full config is
printed when a run starts and saved next to the model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmkit.errors import ConfigError
from vlmkit.recipes import recipe_path

# The built-in defaults' from-scratch tower and LM (`configs/scratch.yaml`); `vlmkit train --tiny`
# shrinks other families with its own sizes (recipes.py).
SCRATCH_VISION = {
    "model_type": "clip_vision_model", "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 3,
    "num_attention_heads": 3, "image_size": 64, "patch_size": 8,
}
SCRATCH_TEXT = {
    "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 3, "num_key_value_heads": 3, "max_position_embeddings": 1024, "tie_word_embeddings": True,
}


@dataclass
class ModelConfig:
    """What to build: a saved vlmkit model, local checkpoints, or configs with random weights."""

    init_from: str | None = None  # a saved vlmkit model directory (e.g. the align stage's output)
    vision: str | None = None  # local CLIP / SigLIP / SigLIP2 checkpoint; None: build from vision_config
    lm: str | None = None  # local causal-LM checkpoint; None: build from text_config
    vision_config: dict = field(default_factory=lambda: dict(SCRATCH_VISION))
    text_config: dict = field(default_factory=lambda: dict(SCRATCH_TEXT))
    projector: str = "mlp"
    projector_args: dict = field(default_factory=dict)
    vision_feature_layer: int | list = -1  # or a list of layers, concatenated (as LLaVA takes a list)
    vision_feature_select_strategy: str = "default"
    image_size: int | None = None  # square input side; needed by CNN encoders, which have none of their own
    image_resize_mode: str = "pad"
    slicing: str | None = None  # high-resolution crops: None, "minicpm" (adaptive slices) or "anyres" (tiles)
    crop_size: int | None = None  # side of the crops (slices are about this size); None: the encoder's own input
    max_slices: int = 9  # slices (or tiles) beyond the whole-image view; a request may ask for fewer
    vocab_size: int = 1024  # of the BPE tokenizer trained on the training text when `lm` is None
    attn_implementation: str = "sdpa"
    dtype: str = "float32"


@dataclass
class VideoSettings:
    """How a record's video becomes frames (`vlmkit.processing.video`)."""

    frames: int = 8  # sampled uniformly ...
    fps: float | None = None  # ... or at this rate; either way at most max_frames
    max_frames: int = 32
    max_slices: int = 1  # slices per frame with a slicing model (1: the whole view; anyres: + 1 tile)


@dataclass
class DataConfig:
    train: str | list | None = None  # JSONL of records, or a list of JSONLs to mix (ids must stay unique)
    eval: str | None = None  # JSONL of records, for the eval loss during training
    # JSONL(s) whose text also trains a from-scratch tokenizer (not trained on): a first stage
    # names its later stages' data here, so their words get tokens of their own.
    tokenizer_data: str | list | None = None
    max_length: int = 1024  # longer samples are errors (or skipped with skip_bad), never truncated
    skip_bad: bool = False
    max_pixels: int = 64_000_000
    num_workers: int = 0
    video: VideoSettings = field(default_factory=lambda: VideoSettings())


@dataclass
class LearningRates:
    """Per-module peak learning rates; 0 freezes the module, None takes the stage's default."""

    vision: float | None = None
    projector: float | None = None
    lm: float | None = None


STAGE_LEARNING_RATES = {
    "align": LearningRates(vision=0.0, projector=1e-3, lm=0.0),  # projector only
    "sft": LearningRates(vision=0.0, projector=2e-5, lm=2e-5),  # projector + LM; vision optional
    "dpo": LearningRates(vision=0.0, projector=1e-6, lm=1e-6),  # preference tuning moves an SFT model gently
}


@dataclass
class TrainConfig:
    stage: str = "sft"
    lr: LearningRates = field(default_factory=LearningRates)
    scratch_lr: float = 2e-3  # default for modules that start from random weights
    weight_decay: float = 0.01
    warmup: float = 0.03  # ratio of all steps when < 1, else a step count
    scheduler: str = "cosine"
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    time_budget: float = 0.0  # seconds; > 0: stop then, the LR schedule following time (max_steps a cap)
    epochs: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: evaluate only at the end (when data.eval is set)
    logging_steps: int = 10
    output_dir: str = "runs/train"
    resume: bool = False  # continue from the newest checkpoint in output_dir
    bf16: bool | str = False  # or "auto": where this machine multiplies bf16 faster (train/precision.py)
    gradient_checkpointing: bool = False  # for the LM and the vision encoder
    report_to: list = field(default_factory=lambda: ["tensorboard"])
    packing: bool = False  # samples end to end in fewer rows, attention confined to each sample
    packing_length: int = 0  # tokens per packed row; 0: the batch's longest sample
    # While the vision encoder is frozen, its features of each image are computed once and reused
    # (model/feature_cache.py), up to this much CPU memory; 0 turns the cache off. Not with FSDP or ZeRO-3.
    vision_feature_cache_gb: float = 4.0
    # "word_norm": a new projector between pretrained parts starts with image tokens of the LM's
    # word-embedding norm, measured on the first training images (model/projector_scale.py); "none".
    projector_init: str = "word_norm"
    # The share of the steps before the LM (or its adapters) starts to learn, the projector
    # learning alone against the frozen LM until then (LLaVA's two stages in one run); the LM's
    # LoRA adapters are switched off until then (train/trainer.py: idle_adapters). Not with time_budget.
    lm_start: float = 0.0
    torch_compile: bool = False
    peak_flops: float = 0.0  # the device's FLOP/s for the MFU shown while training; 0: a matmul timed at the start
    optimizer: str = "adamw"  # or "muon": Muon for the LM's hidden matrices, AdamW for the rest (train/muon.py)
    fsdp: str = ""  # transformers' fsdp option, e.g. "full_shard auto_wrap"; see configs/fsdp.yaml
    fsdp_config: dict = field(default_factory=dict)
    deepspeed: str | None = None  # a DeepSpeed JSON config, e.g. configs/deepspeed-zero2.json

    def learning_rates(self, random_modules: frozenset[str] = frozenset()) -> LearningRates:
        """Peak learning rate per module: the explicit value, else `scratch_lr` for a module that
        starts from random weights (freezing or gently tuning noise is never wanted), else the
        stage's default."""
        if self.stage not in STAGE_LEARNING_RATES:
            raise ConfigError(f"train.stage {self.stage!r} is not one of {', '.join(STAGE_LEARNING_RATES)}")
        default = STAGE_LEARNING_RATES[self.stage]
        chosen = {}
        for name, value in dataclasses.asdict(self.lr).items():
            if value is None:
                value = self.scratch_lr if name in random_modules else getattr(default, name)
            chosen[name] = value
        return LearningRates(**chosen)


@dataclass
class LoraSettings:
    """LoRA through PEFT: adapters on the LM (and optionally the vision encoder); see docs/finetuning.md."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    vision: bool = False  # adapters on the vision encoder too (its learning rate must not be 0)
    vision_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                 "fc2"])
    modules_to_save: list = field(default_factory=lambda: ["projector"])  # trained fully, at their own rate
    save: str = "adapter"  # "adapter": the adapters alone (plus a base to load them on); "merged": one model
    quantize: str | None = None  # "4bit": QLoRA (needs bitsandbytes, a CUDA GPU and model.init_from)


@dataclass
class DPOSettings:
    """Direct preference optimisation (`vlmkit dpo`), trained by TRL's DPOTrainer (train/dpo.py)."""

    beta: float = 0.1
    loss_type: str | list = "sigmoid"  # any of TRL's: "ipo", "hinge", "robust", ...; a list adds several up
    # True: the starting model scores every pair once, before training. False: the reference runs
    # beside training: a frozen copy of the model (with LoRA, of its adapters: far less memory).
    precompute_ref_log_probs: bool = True
    trl: dict = field(default_factory=dict)  # other trl.DPOConfig fields, e.g. {label_smoothing: 0.1}


@dataclass
class RunConfig:
    """Everything `vlmkit train` and `vlmkit dpo` read: the sections of a run's YAML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)


@dataclass
class GenerationSettings:
    """Decoding settings of chat, the web page and the API (`vlmkit chat` flags, `:conf`, request
    fields); `do_sample=False` is greedy and ignores temperature/top_p/top_k."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_slices: int | None = None  # fewer slices per image than the model's own (sliced models only)

    def update(self, key: str, value: str) -> None:
        """Set one field from text (as `:conf key=value` does), read as config overrides are."""
        parsed = parse_setting(GenerationSettings, key, value)
        previous = getattr(self, key)
        setattr(self, key, parsed)
        try:
            self.check()
        except ConfigError:
            setattr(self, key, previous)
            raise

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("need temperature > 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0")
        if self.max_slices is not None and self.max_slices < 1:
            raise ConfigError("max_slices must be at least 1 (or none for the model's own)")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


# `vlmkit retriever train`: the sections of `vlmkit train` (model, train) plus `retrieval`, with
# the data a retriever trains on.
@dataclass
class RetrievalConfig:
    """How embeddings are made (saved in the model's config) and how the contrastive loss is set up."""

    init_from: str | None = None  # a saved retriever to go on training (model.* is then ignored)
    pooling: str = "last"
    normalize: bool = True
    query_prefix: str = "query: "
    doc_prefix: str = "page: "
    bidirectional: bool = False
    multi_vector_dim: int = 0  # > 0: one vector of this size per token, MaxSim scoring (ColPali)
    page_text_tokens: int = 0  # > 0: a page's input also carries the first N tokens of its text layer
    temperature: float = 0.02
    hard_negatives: int = 0  # per query, drawn from each pair's "neg" list
    grad_cache: bool = False
    grad_cache_micro_batch_size: int = 8


@dataclass
class RetrieverDataConfig:
    train: str | None = None  # pairs JSONL
    docs: str | None = None  # page store holding every page the pairs name
    num_workers: int = 0


@dataclass
class RetrieverRunConfig:
    """Everything `vlmkit retriever train` reads: `vlmkit train`'s model and train sections, the
    retrieval settings, and the pairs and page store it trains on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    data: RetrieverDataConfig = field(default_factory=RetrieverDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/retriever"))


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """Check `value` against a (simple) type hint, converting ints to floats where a float is wanted."""
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is not type(None) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{where} = {value!r} has the wrong type; expected {hint}")


def parse_setting(cls, key: str, text: str):
    """One field of the dataclass `cls` from text, read as YAML and checked against the field's
    type, as a `section.key=value` override is: the one reading of typed settings."""
    hints = _hints(cls)
    if key not in hints:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(hints)}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if value in ("None", "none") and type(None) in typing.get_args(hints[key]):
        value = None  # as the settings are shown (Python's spelling), besides YAML's null
    return _coerce(value, hints[key], key)


def _from_dict(cls, data: dict, where: str):
    hints, names = _hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()})


def load_config(path: str | Path | None = None, overrides: list[str] = (), root: type = RunConfig):
    """Defaults, then the YAML file (if any), then `section.key=value` overrides, in that order.

    Hand-written over PyYAML: OmegaConf's structured configs take no unions but Optional, and
    these fields are unions (`data.train`: a path or a list; `train.bf16`: a bool or "auto").

    `root` is the dataclass of the whole config: `RunConfig` for `vlmkit train`, another one
    for other commands (the retriever's) that share the sections and this reading.
    """
    sections = ", ".join(f.name for f in dataclasses.fields(root))
    path = recipe_path(path)
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections ({sections})")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    config = _from_dict(root, _merge(dataclasses.asdict(root()), data), str(path or "config"))
    config.train.learning_rates()  # validates the stage name early
    return config


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge. A sub-config (vision_config, text_config) that names another
    model_type replaces the default instead, so no key of the tiny default leaks into it."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        other_type = isinstance(value, dict) and value.get("model_type", (old or {}).get("model_type")) != (
            old or {}).get("model_type") if isinstance(old, dict) else False
        out[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) and not other_type else value
    return out


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def load_retriever_config(path: str | Path | None = None, overrides: list[str] = ()) -> RetrieverRunConfig:
    """Defaults, then the YAML file, then `section.key=value` overrides (as `vlmkit train` reads its config)."""
    return load_config(path, overrides, root=RetrieverRunConfig)

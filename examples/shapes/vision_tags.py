"""The shapes example's first stage: pre-train a vision encoder on its captions' words, before any LM sees it.

A pretrained CLIP or SigLIP tower comes with features worth reading. A tower trained from
random weights inside a VLM does not: it learns only from what the language model's attention
passes back, a weak signal while that attention is itself still forming (examples/shapes/README.md).
This stage gives the tower a direct one, from the same image-caption records the align stage
uses: every output token scores every word of the caption vocabulary, and a log-sum-exp over
the tokens pools the scores into one logit per word, trained to say which words the caption
uses (multi-label, as in tagging pre-training). The log-sum-exp is a smooth maximum: one token
is enough to claim an object, while a word that spans several tokens adds up their evidence.

Captions that never pair some colour with some shape teach a tower shape detectors tied to the
colours they were seen in: the shapes example's tower named the shape of 0.70 of the held-out pairs'
objects and 0.99 of the others. `tags.channel_shuffle` permutes the colour channels of a share
of the images (a green triangle turns red, blue or purple), with the loss on the colour words
(`tags.colour_words`) left out for them, which brought the held-out pairs to 0.98.

Its config is `vlmkit train`'s (model, data, train) plus a `tags` section (`TagRunConfig`).

Hand-written because no maintained library trains a transformers vision model on caption tags.
The trained encoder is saved as a plain transformers checkpoint with its image normalisation,
so that `model.vision=DIR` composes it with any LM; the tag head is kept beside it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import Trainer

from vlmkit.config import LearningRates, RunConfig, load_config
from vlmkit.data.records import Record, prepare_all, read_record_files
from vlmkit.errors import ConfigError, DataError
from vlmkit.model import vision
from vlmkit.model.build import build_vision_tower, tower_image_processor
from vlmkit.processing.images import open_image
from vlmkit.train import stage
from vlmkit.train.trainer import training_arguments

HEAD_FILE = "tag_head.safetensors"  # the trained head, written beside the tower with TAGS_FILE
TAGS_FILE = "tags.json"
# The head file's metadata: which features of the tower its scores are for.
HEAD_FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")
MIN_TAG_COUNT = 3  # rarer words teach nothing general and only add outputs
MAX_POSITIVE_WEIGHT = 100.0
# Every order of the three channels but the identity.
CHANNEL_ORDERS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
WORD = re.compile(r"[a-z0-9]+")
PRETRAINED_TOWER_LR = 1e-4  # going on from a saved tower (model.vision); a random one trains at train.scratch_lr


@dataclass
class TagSettings:
    # The chance that an image's colour channels are permuted, so that each shape is seen in
    # colours its captions never pair it with; the `colour_words` tags are not trained on such
    # an image (its colours are no longer the caption's).
    channel_shuffle: float = 0.0
    colour_words: list = field(default_factory=list)


@dataclass
class TagRunConfig(RunConfig):
    tags: TagSettings = field(default_factory=TagSettings)


def load_tag_config(path, overrides=()) -> TagRunConfig:
    return load_config(path, overrides, root=TagRunConfig)


def caption_words(record: Record) -> set[str]:
    """The words of a record's assistant turns, lower-cased."""
    answers = [turn["content"].lower() for turn in record.conversations if turn["role"] == "assistant"]
    return {word for text in answers for word in WORD.findall(text)}


def tag_vocabulary(records: list[Record]) -> tuple[list[str], torch.Tensor]:
    """The tags (words in at least MIN_TAG_COUNT captions) and the weight of each one's positives.

    The weight balances a tag's positives against its negatives (capped): a word in 0.5% of the
    captions would otherwise pass the tower a gradient too small to learn it in the time that
    colours, in half the captions, take.
    """
    counts = Counter(word for record in records for word in caption_words(record))
    vocabulary = sorted(word for word, n in counts.items() if n >= MIN_TAG_COUNT)
    if not vocabulary:
        raise DataError(f"no word occurs in {MIN_TAG_COUNT} or more captions; the vision stage needs "
                        "image-caption records (one image and its description each)")
    positives = torch.tensor([counts[word] for word in vocabulary], dtype=torch.float32)
    return vocabulary, ((len(records) - positives) / positives).clamp(1.0, MAX_POSITIVE_WEIGHT)


class TagDataset(Dataset):
    """One image, the multi-hot vector of its caption's words and which of them to train on, per item.

    With `channel_shuffle` > 0 that share of the images has its colour channels permuted (drawn from
    torch's generator, which the Trainer seeds and checkpoints) and the `colour_words` left out.
    """

    def __init__(self, records: list[Record], vocabulary: list[str], image_processor, max_pixels: int,
                 skip_bad: bool = False, channel_shuffle: float = 0.0, colour_words: list[str] = ()):
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.image_processor, self.max_pixels = image_processor, max_pixels
        self.channel_shuffle = channel_shuffle
        self.colour_tags = _colour_tags(self.index, channel_shuffle, colour_words)
        self.records, self.skipped = prepare_all(records, self._check, skip_bad)

    def _check(self, record: Record) -> Record:
        if len(record.images) != 1:
            raise record.error(f"the vision stage takes one image per caption record, not {len(record.images)}")
        self._open(record, decode=False)  # the header only: a missing or unreadable file fails here
        return record

    def _open(self, record: Record, decode: bool = True):
        try:
            return open_image(record.images[0], max_pixels=self.max_pixels, decode=decode)
        except DataError as err:
            raise record.error(str(err)) from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image = self._open(record)
        tags, trained = torch.zeros(len(self.index)), torch.ones(len(self.index))
        for word in caption_words(record):
            if word in self.index:
                tags[self.index[word]] = 1.0
        if self.channel_shuffle and float(torch.rand(())) < self.channel_shuffle:
            channels = image.convert("RGB").split()
            order = CHANNEL_ORDERS[int(torch.randint(len(CHANNEL_ORDERS), ()))]
            image = Image.merge("RGB", [channels[c] for c in order])
            trained[self.colour_tags] = 0.0
        pixel_values = self.image_processor([image])["pixel_values"][0]
        return {"pixel_values": pixel_values, "tags": tags, "trained_tags": trained}


def _colour_tags(index: dict[str, int], channel_shuffle: float, colour_words: list[str]) -> list[int]:
    """The tag indices of `colour_words`, checked against the shuffle that needs them."""
    if not 0.0 <= channel_shuffle <= 1.0:
        raise ConfigError(f"tags.channel_shuffle is {channel_shuffle}; give a probability from 0 to 1")
    if channel_shuffle and not colour_words:
        raise ConfigError("tags.channel_shuffle needs tags.colour_words: the words a shuffled image's caption "
                          "no longer gets right (e.g. [red, green, blue])")
    missing = [word for word in colour_words if word.lower() not in index]
    if missing:
        raise ConfigError(f"tags.colour_words: {', '.join(missing)} not among the tags (words in "
                          f"{MIN_TAG_COUNT} or more captions); remove them or check the spelling")
    return [index[word.lower()] for word in colour_words]


class TowerTagger(nn.Module):
    """A vision tower plus one linear tag scorer per output token, pooled by log-sum-exp."""

    def __init__(self, tower: nn.Module, encode_config, n_tags: int, positive_weight: torch.Tensor | None = None):
        super().__init__()
        self.tower, self.encode_config = tower, encode_config
        self.head = nn.Linear(vision.feature_size(tower.config), n_tags)
        self.register_buffer("positive_weight", positive_weight, persistent=False)

    def forward(self, pixel_values: torch.Tensor, tags: torch.Tensor | None = None,
                trained_tags: torch.Tensor | None = None) -> dict:
        """Tag logits per image; with `tags`, the mean loss over the (image, tag) pairs `trained_tags` keeps."""
        tokens = vision.encode(self.tower, self.encode_config, pixel_values)  # (images, tokens, width)
        logits = torch.logsumexp(self.head(tokens), dim=1)
        out = {"logits": logits}
        if tags is not None:
            trained = torch.ones_like(tags) if trained_tags is None else trained_tags
            losses = F.binary_cross_entropy_with_logits(logits, tags, pos_weight=self.positive_weight, reduction="none")
            out["loss"] = (losses * trained).sum() / trained.sum()
        return out


def _check(cfg: TagRunConfig) -> None:
    """Refuse settings this stage would otherwise ignore."""
    if cfg.model.init_from or cfg.model.lm:
        raise ConfigError("the vision stage trains a vision encoder alone: leave model.init_from and model.lm "
                          "unset (give model.vision_config, or model.vision to go on from a checkpoint)")
    unsupported = {"data.eval": cfg.data.eval, "lora.enabled": cfg.lora.enabled, "train.packing": cfg.train.packing,
                   "model.slicing": cfg.model.slicing, "train.fsdp": cfg.train.fsdp,
                   "train.deepspeed": cfg.train.deepspeed,
                   "train.gradient_checkpointing": cfg.train.gradient_checkpointing,
                   "train.time_budget": cfg.train.time_budget}
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise ConfigError(f"the vision stage does not support {', '.join(given)}; unset them (the stage trains one "
                          "whole-image view of a small encoder, on one process or with DDP)")


def _vocabulary(records: list[Record], out: Path, resuming: bool) -> tuple[list[str], torch.Tensor]:
    """The tag vocabulary, written to `out` before training so that a resumed run keeps its order."""
    vocabulary, positive_weight = tag_vocabulary(records)
    saved = out / TAGS_FILE
    if resuming and saved.is_file() and json.loads(saved.read_text()) != vocabulary:
        raise ConfigError(f"the captions give other tags than {saved} of the run being resumed; resume on the "
                          "same data, or start a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(vocabulary))
    return vocabulary, positive_weight


def run_vision_stage(cfg: TagRunConfig, log=print) -> Path:
    """Train the tower on caption tags; save it where `model.vision` can load it."""
    _check(cfg)
    out, checkpoint = stage.begin(cfg, "vision stage", log)
    records, bad_lines = read_record_files(cfg.data.train, cfg.data.skip_bad)
    tower, random = build_vision_tower(cfg.model)
    encode_config = SimpleNamespace(vision_config=tower.config, vision_feature_layer=cfg.model.vision_feature_layer,
                                    vision_feature_select_strategy=cfg.model.vision_feature_select_strategy,
                                    image_size=cfg.model.image_size)
    vocabulary, positive_weight = _vocabulary(records, out, checkpoint is not None)
    model = TowerTagger(tower, encode_config, len(vocabulary), positive_weight)
    lr = cfg.train.lr.vision
    if lr is None:
        lr = cfg.train.scratch_lr if random else PRETRAINED_TOWER_LR
    if not lr:
        raise ConfigError("train.lr.vision is 0 in the vision stage: nothing would train")
    args = training_arguments(cfg, LearningRates(vision=lr, projector=0.0, lm=0.0), False)
    args.include_num_input_tokens_seen = "no"  # images, not tokens
    image_processor = tower_image_processor(cfg.model, encode_config)
    dataset = TagDataset(records, vocabulary, image_processor, cfg.data.max_pixels, cfg.data.skip_bad,
                         cfg.tags.channel_shuffle, cfg.tags.colour_words)
    skipped = bad_lines + dataset.skipped
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    log(f"vision stage: {len(dataset)} images, {len(vocabulary)} tags, learning rate {lr}")

    result, seconds = stage.fit(trainer, checkpoint, log)
    summary = {"n_train": len(dataset), "skipped_records": len(skipped),
               "n_params": sum(p.numel() for p in tower.parameters()), "n_tags": len(vocabulary),
               "metrics": dict(result.metrics)}
    save = lambda t: save_tower(t.model, image_processor, out) if t.is_world_process_zero() else None
    stage.finish(trainer, cfg, out, seconds, summary, log, save=save, skipped=skipped, what="the vision encoder")
    return out


def save_tower(model: TowerTagger, image_processor, out: Path) -> None:
    """The tower as a transformers checkpoint, the image normalisation it was trained with, and the tag head."""
    out.mkdir(parents=True, exist_ok=True)
    model.tower.save_pretrained(out)  # safetensors
    normalisation = {"image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
                     "size": image_processor.size}
    (out / "preprocessor_config.json").write_text(json.dumps(normalisation))
    # Which features the head scores: its scores mean nothing for other features of the tower.
    trained_on = {key: str(getattr(model.encode_config, key)) for key in HEAD_FEATURE_KEYS}
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE),
              metadata=trained_on)

"""Training examples: records -> token ids, labels and pixel values, checked before training starts.

The text of every record is tokenised up front (fast, and it gives exact lengths for length
checks, grouping and packing), and every image is decoded once then too (and again whenever
its example is fetched): an image whose checksums are sound but whose pixels are not is found
only by decoding it, and must be found before training starts, not by a batch halfway through.
A bad record (missing or unreadable image, too long, nothing to learn) raises a DataError
naming file, line and id -- or, with `skip_bad`, is left out and counted, never silently
replaced by another one. Videos are only probed up front; their frames are decoded when fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from vlmkit.config import VideoSettings
from vlmkit.data.records import Record, prepare_all, read_records
from vlmkit.errors import DataError
from vlmkit.processing.image_processing import concat_image_inputs
from vlmkit.processing.images import open_image
from vlmkit.processing.processor import IGNORE_INDEX, VLMProcessor
from vlmkit.processing.video import probe_video, read_video, with_video_frames


TOKENIZE_CHUNK = 1024  # records per tokenizer call while preparing


@dataclass
class Example:
    record: Record
    input_ids: torch.Tensor
    labels: torch.Tensor


def _video_kwargs(video: VideoSettings, max_pixels: int | None) -> dict:
    kwargs = {"num_frames": video.frames, "fps": video.fps, "max_frames": video.max_frames}
    return kwargs | ({"max_pixels": max_pixels} if max_pixels else {})


class ConversationDataset(Dataset):
    """Examples for supervised training: `input_ids`, `labels`, `pixel_values` per item."""

    def __init__(self, records: list[Record], processor: VLMProcessor, max_length: int, skip_bad: bool = False,
                 max_pixels: int | None = None, video: VideoSettings | None = None):
        self.processor, self.max_length, self.max_pixels = processor, max_length, max_pixels
        self.video = video or VideoSettings()
        self.examples: list[Example]
        self.skipped: list[DataError]
        self.examples, self.skipped = self._prepare_all(records, skip_bad)

    @classmethod
    def from_jsonl(cls, path, processor: VLMProcessor, max_length: int, skip_bad: bool = False, **kwargs):
        records, bad_lines = read_records(path, skip_bad=skip_bad)
        dataset = cls(records, processor, max_length, skip_bad, **kwargs)
        dataset.skipped = bad_lines + dataset.skipped
        return dataset

    def _open(self, record: Record, path: str, decode: bool):
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        try:
            return open_image(path, decode=decode, **kwargs)
        except DataError as err:
            raise record.error(f"image {path}: {err.problem}") from None

    def _video(self, record: Record, decode: bool):
        """A probe (frame size and times; nothing decoded) or the sampled (frames, times) of the record's video."""
        try:
            return (read_video if decode else probe_video)(record.video, **_video_kwargs(self.video, self.max_pixels))
        except DataError as err:
            raise record.error(f"video {record.video}: {err.problem}") from None

    def _budgets(self, record: Record, n_images: int) -> list[int | None]:
        """Slice budget per image: the model's own for images, `video.max_slices` for the frames among them."""
        n_frames = n_images - len(record.images)
        if not n_frames:
            return [None] * n_images
        frames = [self.video.max_slices] * n_frames
        return with_video_frames(record.conversations, [None] * len(record.images), frames, [0.0] * n_frames)[1]

    def _prepare_all(self, records: list[Record], skip_bad: bool) -> tuple[list[Example], list[DataError]]:
        """Every record's example, tokenised a chunk of records at a time; and the records skipped."""
        planned, skipped = prepare_all(records, self._expand, skip_bad)
        encoded = []
        for start in range(0, len(planned), TOKENIZE_CHUNK):
            encoded += self.processor.tokenize_turns([turns for _, turns in planned[start : start + TOKENIZE_CHUNK]])
        pairs = [(record, item) for (record, _), item in zip(planned, encoded)]
        return prepare_all(pairs, self._check, skip_bad, skipped)  # the count of skipped records spans both passes

    def _expand(self, record: Record) -> tuple[Record, list[dict]]:
        """The record and its turns with the image placeholders laid out (each image decoded once, to check it)."""
        sizes = [self._open(record, p, decode=True).size for p in record.images]
        conversations = record.conversations
        if record.video:
            probe = self._video(record, decode=False)
            frames = [probe.size] * len(probe.timestamps)
            conversations, sizes = with_video_frames(conversations, sizes, frames, probe.timestamps)
        budgets = self._budgets(record, len(sizes))
        plans = [self.processor.image_processor.plan(size, budget) for size, budget in zip(sizes, budgets)]
        try:
            return record, self.processor.expand_turns(conversations, plans)
        except DataError as err:
            raise record.error(err.problem) from None

    def _check(self, pair: tuple[Record, dict]) -> Example:
        record, encoded = pair
        n = len(encoded["input_ids"])
        if n > self.max_length:
            raise record.error(f"is {n} tokens long, over max_length {self.max_length}; raise data.max_length "
                               "or shorten the record (vlmkit never truncates a sample)")
        if not (encoded["labels"] != IGNORE_INDEX).any():
            raise record.error("has no assistant tokens to learn from")
        return Example(record, encoded["input_ids"], encoded["labels"])

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        record = example.record
        images = [self._open(record, p, decode=True) for p in record.images]
        if record.video:
            frames, times = self._video(record, decode=True)
            _, images = with_video_frames(record.conversations, images, frames, times)
        images = self.processor.image_inputs(images, self._budgets(record, len(images)))
        return {"input_ids": example.input_ids, "labels": example.labels} | images


class Collator:
    """Right-pads ids (pad token) and labels (-100) to the longest example; concatenates all crops."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask} | concat_image_inputs(items)

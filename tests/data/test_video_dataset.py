"""A record with an image and a video trains: frames become crops at the <video> marker's place."""

from __future__ import annotations

import json

import torch
from PIL import Image

from tests.conftest import tiny_model_config
from tests.processing.helpers import write_video
from vlmkit.config import VideoSettings
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.records import read_records
from vlmkit.model.build import build
from vlmkit.train.run import _texts


def _records(tmp_path):
    write_video(tmp_path / "clip.mp4")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "still.png")
    record = {"id": "v1", "images": ["still.png"], "video": "clip.mp4",
              "conversations": [{"role": "user", "content": "<image>\nThe photo, then the clip:\n<video>\nWhat changes?"},
                                {"role": "assistant", "content": "the colour"}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    return read_records(tmp_path / "data.jsonl")[0]


def test_a_video_record_becomes_frames_and_trains(tmp_path, train_records):
    records = _records(tmp_path)
    torch.manual_seed(0)
    for slicing in (None, "minicpm"):
        built = build(tiny_model_config(slicing=slicing), training_texts=lambda: _texts(train_records))
        dataset = ConversationDataset(records, built.processor, max_length=1024, video=VideoSettings(frames=4))
        item = dataset[0]
        still = len(built.processor.image_processor.plan((40, 30)).crop_sizes)
        assert item["pixel_values"].shape[0] == still + 4  # the still's crops, then one per frame
        text = built.processor.tokenizer.decode(item["input_ids"])
        assert text.index("The photo") < text.index("0.2s:") < text.index("What changes")
        batch = Collator(built.processor.tokenizer.pad_token_id)([item])
        loss = built.model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()

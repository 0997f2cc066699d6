"""The shapes example's SFT data: a fixed share of records show blank images, answers kept."""

from pathlib import Path

import torch
from PIL import Image

from examples.shapes.scratch import with_blank_images
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.records import read_records, write_records
from vlmkit.processing.images import blank_like


def _blank_ids(source: Path, target: Path, seed: int, mean: list[float]) -> tuple[set[str], list]:
    target.parent.mkdir()
    records, _ = read_records(with_blank_images(source, target, 0.25, seed, mean))
    return {r.id for r in records if any(Path(p).name.startswith("blank-") for p in r.images)}, records


def test_a_fixed_share_of_records_sees_the_blank_image_that_blind_evaluation_uses(tiny, train_records, tmp_path):
    processor = tiny.processor
    mean = processor.image_processor.image_mean
    source = tmp_path / "data" / "train.jsonl"
    source.parent.mkdir()
    write_records(source, train_records)
    blank, records = _blank_ids(source, tmp_path / "a" / "train.jsonl", 3, mean)
    assert 0 < len(blank) < len(records)  # 48 records at 0.25: some, not all
    # The same set every time with that seed; another seed draws another set.
    assert _blank_ids(source, tmp_path / "b" / "train.jsonl", 3, mean)[0] == blank
    assert _blank_ids(source, tmp_path / "c" / "train.jsonl", 4, mean)[0] != blank

    image = Image.open(train_records[0].images[0])
    expected = processor.image_inputs([blank_like(image, mean)], [None])["pixel_values"]
    assert expected.abs().max() < 0.01  # the processor's mean: normalised to (nearly) zero, it shows nothing
    plain = ConversationDataset(train_records, processor, max_length=1024)
    dataset = ConversationDataset(records, processor, max_length=1024)
    for index in range(len(dataset)):
        item, original = dataset[index], plain[index]
        assert torch.equal(item["input_ids"], original["input_ids"])  # the question and answers are kept
        assert torch.equal(item["labels"], original["labels"])
        if records[index].id in blank:
            assert torch.equal(item["pixel_values"], expected.expand_as(item["pixel_values"]))
        else:
            assert torch.equal(item["pixel_values"], original["pixel_values"])

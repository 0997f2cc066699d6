"""`data.blank_image_rate`: a fixed share of training examples see blank images, answers kept."""

import pytest
import torch
from PIL import Image

from vlmkit.data.dataset import ConversationDataset
from vlmkit.errors import ConfigError
from vlmkit.processing.images import blank_like


def test_a_fixed_share_of_examples_sees_the_blank_image_that_blind_evaluation_uses(tiny, train_records):
    processor = tiny.processor
    plain = ConversationDataset(train_records, processor, max_length=1024)
    dataset = ConversationDataset(train_records, processor, max_length=1024, blank_image_rate=0.25, seed=3)
    assert 0 < len(dataset.blank) < len(dataset)  # 48 examples at 0.25: some, not all
    # The same set every time the data set is built with that seed (every epoch, and after --resume).
    again = ConversationDataset(train_records, processor, max_length=1024, blank_image_rate=0.25, seed=3)
    assert again.blank == dataset.blank
    assert ConversationDataset(train_records, processor, max_length=1024, blank_image_rate=0.25, seed=4).blank != \
        dataset.blank

    image = Image.open(train_records[0].images[0])
    blank = processor.image_inputs([blank_like(image, processor.image_processor.image_mean)], [None])["pixel_values"]
    assert blank.abs().max() < 0.01  # the processor's mean: normalised to (nearly) zero, it shows nothing
    for index in range(len(dataset)):
        item, original = dataset[index], plain[index]
        assert torch.equal(item["input_ids"], original["input_ids"])  # the question and answers are kept
        assert torch.equal(item["labels"], original["labels"])
        if index in dataset.blank:
            assert torch.equal(item["pixel_values"], blank.expand_as(item["pixel_values"]))
        else:
            assert torch.equal(item["pixel_values"], original["pixel_values"])


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_a_rate_outside_0_to_1_is_refused(tiny, train_records, rate):
    with pytest.raises(ConfigError, match="data.blank_image_rate must be between 0 and 1"):
        ConversationDataset(train_records[:2], tiny.processor, max_length=1024, blank_image_rate=rate)

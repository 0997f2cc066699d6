"""Packing: a packed row computes what its samples compute alone, and trains like the padded batch."""

import pytest
import torch

from tests.finetune.helpers import make_config, run
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.packing import PackedCollator, pack
from vlmkit.processing.processor import IGNORE_INDEX


@pytest.fixture
def samples(tiny, train_records, synth_dir):
    """Multi-turn questions and short captions (lengths that pack), and the model in eval mode."""
    from vlmkit.data.records import read_records

    captions = read_records(synth_dir / "captions.jsonl")[0]
    dataset = ConversationDataset(train_records[:3] + captions[:5], tiny.processor, max_length=1024)
    return tiny.model.eval(), [dataset[i] for i in range(len(dataset))]


CAPACITY = 240  # room for two or three of the test samples per row


def _placement(items):
    """(row, start) of each item in the packed batch, as PackedCollator lays them out."""
    lengths = [len(item["input_ids"]) for item in items]
    where = {}
    for r, row in enumerate(pack(lengths, max(CAPACITY, *lengths))):
        start = 0
        for i in row:
            where[i] = (r, start)
            start += lengths[i]
    return where


def test_first_fit_never_exceeds_the_capacity():
    lengths = [7, 3, 5, 2, 2, 1, 6]
    rows = pack(lengths, 7)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 7 for row in rows)
    assert len(rows) == 4  # 26 tokens need at least 4 rows of 7


def _sum_loss(model, batch) -> tuple[float, int]:
    """Summed token loss and supervised-token count of one sample (as the LM shifts it)."""
    logits = model(**batch).logits[0, :-1]
    labels = batch["labels"][0, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def test_packed_loss_equals_the_mean_loss_of_the_samples_unpacked(samples):
    model, items = samples
    packed, padded = PackedCollator(0, CAPACITY)(items), Collator(0)(items)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] <= len(items) // 2 and packed["input_ids"].shape[1] <= CAPACITY
    assert (packed["input_ids"] != 0).sum() == padded["attention_mask"].sum()
    # Without a capacity, rows are as long as the longest sample: never longer than the padded batch's.
    assert PackedCollator(0)(items)["input_ids"].shape[1] == padded["input_ids"].shape[1]

    alone = [_sum_loss(model, Collator(0)([item])) for item in items]
    mean_unpacked = sum(loss for loss, _ in alone) / sum(n for _, n in alone)  # over all supervised tokens
    packed_loss, padded_loss = float(model(**packed).loss), float(model(**padded).loss)
    print(f"packed {packed_loss:.7f} unpacked {mean_unpacked:.7f} difference {abs(packed_loss - mean_unpacked):.1e}")
    assert abs(packed_loss - mean_unpacked) < 1e-5
    assert abs(packed_loss - padded_loss) < 1e-5


@torch.no_grad()
def test_each_packed_sample_sees_only_itself(samples):
    model, items = samples
    packed = PackedCollator(0, CAPACITY)(items)
    logits = model(**packed).logits
    where = _placement(items)
    for i, item in enumerate(items):
        (r, start), n = where[i], len(item["input_ids"])
        assert torch.equal(packed["input_ids"][r, start : start + n], item["input_ids"])
        assert torch.allclose(logits[r, start : start + n], model(**Collator(0)([item])).logits[0], atol=1e-4)

    # The test can fail: positions that run on across samples let attention cross between them.
    r, start = next((r, s) for r, s in where.values() if s > 0)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert not torch.allclose(model(**leaky).logits[r, start:], logits[r, start:], atol=1e-3)


def test_position_ids_restart_and_images_stay_whole(samples, tiny):
    _, items = samples
    packed = PackedCollator(0, CAPACITY)(items)
    where = _placement(items)
    order = sorted(range(len(items)), key=lambda i: where[i])  # row by row, left to right
    for i in order:
        (r, start), n = where[i], len(items[i]["input_ids"])
        assert packed["position_ids"][r, start : start + n].tolist() == list(range(n))
        assert packed["labels"][r, start] == IGNORE_INDEX
        image_tokens = int((packed["input_ids"][r, start : start + n] == tiny.processor.image_token_id).sum())
        assert image_tokens == tiny.processor.tokens_per_crop * len(items[i]["pixel_values"])
    # The crops follow the placeholders, row by row.
    assert torch.equal(packed["pixel_values"], torch.cat([items[i]["pixel_values"] for i in order]))


def test_training_with_packing_follows_the_padded_loss_curve(synth_dir, tmp_path, trainers):
    for name, packing in (("padded", "false"), ("packed", "true")):
        options = ["train.max_steps=3", f"train.packing={packing}", f"train.packing_length={CAPACITY}"]
        run(make_config(synth_dir / "train.jsonl", tmp_path / name, options))
    padded, packed = ([e["loss"] for e in t.state.log_history if "loss" in e] for t in trainers)
    assert len(padded) == len(packed) == 3
    assert max(abs(a - b) for a, b in zip(padded, packed)) < 1e-5

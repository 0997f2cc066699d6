"""Packing: a batch's samples laid end to end in as few rows as fit, instead of one padded row each.

Rows hold up to `capacity` tokens (`train.packing_length`), filled first-fit, longest sample
first; by default, as many as the batch's longest sample, so a packed batch never attends
over longer rows than the padded one would -- it just has fewer rows and less padding.
Longer rows pack tighter but cost more attention: sdpa on a CPU computes each row's full
(masked) square. A sample longer than the capacity gets a row of its own. Position ids
restart at 0 for every sample, and no attention mask or cache is used; from that transformers builds attention confined to each sample -- a block-diagonal
causal mask for sdpa/eager, variable-length kernels for flash attention -- so a packed row
computes exactly what its samples would alone. A row's padding is one more such "sample"
with no labels. Samples are never cut, so an image's placeholder tokens stay in one piece;
the crops are reordered to follow their placeholders row by row.

The loss of a packed batch is the mean over its supervised tokens, the same as the padded
batch's; only the work on padding goes away.

Not transformers' `DataCollatorWithFlattening`: it lays the whole batch in one row, whose
attention square (batch x length, squared) a CPU's sdpa computes in full, and it knows nothing
of the crops that must follow their placeholders.
"""

from __future__ import annotations

import torch

from vlmkit.processing.image_processing import concat_image_inputs
from vlmkit.processing.processor import IGNORE_INDEX


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row: first fit, longest first; no row longer than `capacity`."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


class PackedCollator:
    """Collates examples (`input_ids`, `labels`, `pixel_values`) into packed rows."""

    def __init__(self, pad_token_id: int, capacity: int = 0):
        self.pad_token_id, self.capacity = pad_token_id, capacity

    def __call__(self, items: list[dict]) -> dict:
        lengths = [len(item["input_ids"]) for item in items]
        rows = pack(lengths, max(self.capacity, *lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        crops = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n, item = lengths[i], items[i]
                ids[r, start : start + n] = item["input_ids"]
                # The row's shifted loss would make a sample's first token a prediction from the previous
                # sample's last one; alone it is never predicted.
                labels[r, start + 1 : start + n] = item["labels"][1:]
                positions[r, start : start + n] = torch.arange(n)
                crops.append(item)
                start += n
            positions[r, start:] = torch.arange(width - start)  # the padding: a sample of its own
        # transformers reads packing from the position ids only when there is no KV cache, and a model
        # config's use_cache (true by default) would otherwise make one, in training too.
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}
        return batch | concat_image_inputs(crops)

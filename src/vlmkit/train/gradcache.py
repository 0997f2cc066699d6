"""GradCache: the exact gradient of a contrastive loss over a batch too large to back-propagate at once.

The loss depends on the encoders' parameters only through the representations, so
dL/dtheta = sum over examples of (dL/dr_i) . (dr_i/dtheta). The step therefore runs:

1. every micro-batch forward without a graph, keeping only the representations r_i
   (and the random state each forward started from);
2. the loss on all cached representations, and its gradient dL/dr_i;
3. every micro-batch forward again from the same random state (so dropout draws the same
   masks), then backward of sum_i r_i . dL/dr_i, which adds exactly that micro-batch's share.

Memory is that of one micro-batch plus the representations. Gradients accumulate in .grad
as usual; `no_sync` keeps DDP from all-reducing until the last micro-batch's backward.
(Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from vlmkit.model.retriever import concat


@dataclass
class RandomState:
    """The CPU and CUDA generator states at one moment, to replay a forward's random draws."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state, then put the generators back where they were."""
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def split_batch(batch: dict, size: int) -> list[dict]:
    """Micro-batches of at most `size` rows, each trimmed to its own longest sequence.

    `pixel_values` rows are crops: `crops_per_row` (one number per row, left out of the
    micro-batches) says how many belong to each row; without it, one crop per row.
    """
    rows = batch["input_ids"].shape[0]
    crops = batch.get("crops_per_row")
    crops = torch.ones(rows, dtype=torch.long) if crops is None else crops.cpu()
    first_crop = torch.cat([torch.zeros(1, dtype=torch.long), crops.cumsum(0)]).tolist()
    out = []
    for start in range(0, rows, size):
        stop = min(start + size, rows)
        mask = batch["attention_mask"][start:stop]
        # Right padding beyond the micro-batch's longest row changes nothing but the cost.
        length = int(mask.sum(1).max())
        micro = {"input_ids": batch["input_ids"][start:stop, :length], "attention_mask": mask[:, :length]}
        for key in ("pixel_values", "crop_sizes"):  # crop_sizes: crops of several sizes (sliced pages)
            if batch.get(key) is not None:
                micro[key] = batch[key][first_crop[start]:first_crop[stop]]
        out.append(micro)
    return out


def grad_cache_step(
    encode: Callable[[dict], torch.Tensor],
    batches: Sequence[dict],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    micro_batch_size: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """One GradCache step; returns the (unscaled, detached) loss.

    `batches` are the inputs of each tower (e.g. queries, then pages); `encode` maps a
    micro-batch to representations; `loss_fn` maps the full representations of every tower
    to the loss. Parameter gradients of `loss_scale * loss` are added to `.grad` by
    `backward` (the training engine's, so mixed precision scaling applies); every backward
    but the last runs under `no_sync`.
    """
    micro = [split_batch(batch, micro_batch_size) for batch in batches]
    states: list[list[RandomState]] = []
    cached: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for tower in micro:
            states.append([])
            cached.append([])
            for inputs in tower:
                states[-1].append(RandomState.capture())
                cached[-1].append(encode(inputs))

    reps = [concat(tower).detach().requires_grad_() for tower in cached]
    loss = loss_fn(reps)
    grads = torch.autograd.grad(loss * loss_scale, reps)

    last = (len(micro) - 1, len(micro[-1]) - 1)
    for t, tower in enumerate(micro):
        start = 0
        for m, inputs in enumerate(tower):
            with states[t][m].replay():
                rep = encode(inputs)
            rows = slice(start, start + rep.shape[0])
            grad = grads[t][rows] if rep.dim() == 2 else grads[t][rows, : rep.shape[1]]
            start += rep.shape[0]
            with contextlib.nullcontext() if (t, m) == last else no_sync():
                backward(torch.sum(rep * grad))
    return loss.detach()

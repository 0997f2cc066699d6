"""Contrastive training of a `VLMRetriever` inside the transformers Trainer.

InfoNCE over in-batch negatives (every other page of the batch, on every process) plus any
hard negatives; with `grad_cache_micro_batch_size` the step is a GradCache step. The rest --
DDP, gradient accumulation, mixed precision, checkpoints that resume -- is the Trainer's.

Layout of one process's batch: `query` holds B queries; `doc` holds their B positive pages
first, then the hard negatives. Batches are built (and shuffled) by `PairBatches`, so the
Trainer must read them in order: item i of the dataset is process (i mod world size)'s share
of global batch i // world size.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import SequentialSampler

from vlmkit.errors import ConfigError
from vlmkit.model.retriever import score
from vlmkit.train.gradcache import grad_cache_step
from vlmkit.train.trainer import VLMTrainer

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "crop_sizes")


def gather(local: torch.Tensor) -> torch.Tensor:
    """All processes' rows, in rank order; gradients flow back to this process's own rows only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    if local.dim() == 3:  # multi-vector: pad every process's token axis to the longest
        lengths = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
        dist.all_gather(lengths, torch.tensor([local.shape[1]], device=local.device))
        local = F.pad(local, (0, 0, 0, int(max(lengths)) - local.shape[1]))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def info_nce(queries: torch.Tensor, docs: torch.Tensor, temperature: float, n_local_queries: int,
             n_local_docs: int) -> torch.Tensor:
    """Mean cross-entropy of each query against every page; query j of process p has its
    positive at row p * n_local_docs + j of the gathered pages."""
    logits = score(queries, docs).float() / temperature
    j = torch.arange(queries.shape[0], device=queries.device)
    targets = (j // n_local_queries) * n_local_docs + j % n_local_queries
    return F.cross_entropy(logits, targets)


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


class RetrieverTrainer(VLMTrainer):
    """`VLMTrainer` (per-module learning rates) with a contrastive loss and optional GradCache."""

    def __init__(self, *args, temperature: float, grad_cache_micro_batch_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if temperature <= 0:
            raise ConfigError(f"retrieval.temperature must be positive, got {temperature}")
        self.temperature, self.micro_batch_size = temperature, grad_cache_micro_batch_size
        if self.micro_batch_size and self.is_deepspeed_enabled:
            raise ConfigError("GradCache calls backward once per micro-batch, which DeepSpeed's engine does not "
                              "allow within one step; use DDP or FSDP, or turn grad_cache off")

    def floating_point_ops(self, inputs: dict) -> int:
        tokens = sum(int(inputs[tower]["attention_mask"].sum()) for tower in ("query", "doc"))
        return 6 * tokens * self.model.num_parameters()

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def contrastive_loss(self, reps: list[torch.Tensor]) -> torch.Tensor:
        queries, docs = reps
        return info_nce(gather(queries), gather(docs), self.temperature, queries.shape[0], docs.shape[0])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        queries = model(**model_inputs(inputs["query"]))
        docs = model(**model_inputs(inputs["doc"]))  # pages last: their graph reaches every parameter (DDP)
        loss = self.contrastive_loss([queries, docs])
        return (loss, {"query": queries, "doc": docs}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        # Every process computes the whole gathered loss and DDP averages the gradients, so the
        # gradient is scaled back up by the world size (and down by the accumulation steps).
        scale = self.accelerator.num_processes / self.current_gradient_accumulation_steps
        if self.micro_batch_size:

            def encode(batch):
                with self.compute_loss_context_manager():
                    return model(**batch)

            no_sync = functools.partial(self.accelerator.no_sync, model)
            loss = grad_cache_step(encode, [inputs["query"], inputs["doc"]], self.contrastive_loss,
                                   self.micro_batch_size, self.accelerator.backward, no_sync, loss_scale=scale)
        else:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss * scale)
        return loss.detach() / self.current_gradient_accumulation_steps

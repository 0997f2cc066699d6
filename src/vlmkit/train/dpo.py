"""DPO for VLMs: pair examples, their collator, the sigmoid DPO loss, and a trainer that applies it.

The loss is DPO's (Rafailov et al. 2023), as TRL computes it for `loss_type="sigmoid"` (a
test checks the two agree on the same log-probs): with policy and reference log-probs
summed over each reply's tokens,

    loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

The reference log-probs are computed once, before training, with the starting model, so no
second copy of the model is held in memory. TRL's own DPOTrainer is not used because it
tokenises through its own processor conventions and patches the LM head; vlmkit's
processor and model do neither.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.data.records import Record, prepare_all
from vlmkit.errors import DataError
from vlmkit.processing.processor import IGNORE_INDEX
from vlmkit.train.trainer import VLMTrainer


@dataclass
class Pair:
    record: Record
    chosen: dict  # input_ids and labels (the reply's tokens only)
    rejected: dict
    reference: tuple[float, float] | None = None  # reference log-probs of (chosen, rejected)


class PreferenceDataset(ConversationDataset):
    """Preference records as pairs of token sequences sharing the prompt and images."""

    def _prepare_all(self, records: list[Record], skip_bad: bool) -> tuple[list[Pair], list[DataError]]:
        return prepare_all(records, self._prepare, skip_bad)

    def _prepare(self, record: Record) -> Pair:
        if record.video:
            raise record.error("DPO takes image records only; this one has a video (train on its frames as images)")
        images = [self._open(record, p, decode=False) for p in record.images]
        crops = [self.processor.image_processor.plan(image.size) for image in images]
        prompt = record.conversations[:-1]
        try:
            prompt_ids = self.processor.encode_text(prompt, crops, add_generation_prompt=True)["input_ids"]
            replies = [self.processor.encode_text([*prompt, {"role": "assistant", "content": record.extra[key]}],
                                                  crops) for key in ("chosen", "rejected")]
        except DataError as err:
            raise record.error(err.problem) from None
        for reply in replies:
            n = len(reply["input_ids"])
            if n > self.max_length:
                raise record.error(f"is {n} tokens long with a reply, over max_length {self.max_length}")
            if not torch.equal(reply["input_ids"][: len(prompt_ids)], prompt_ids):
                raise record.error("the chat template does not render the prompt as a prefix of prompt + reply")
            reply["labels"][: len(prompt_ids)] = IGNORE_INDEX  # earlier assistant turns are prompt, not reply
        return Pair(record, *replies)

    def __getitem__(self, index: int) -> dict:
        pair = self.examples[index]
        images = [self._open(pair.record, p, decode=True) for p in pair.record.images]
        item = {"chosen": pair.chosen, "rejected": pair.rejected, "images": self.processor.image_inputs(images)}
        return item | ({"reference": torch.tensor(pair.reference)} if pair.reference is not None else {})


class PairCollator:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (crops in the same order)."""

    def __init__(self, pad_token_id: int):
        self.pad = Collator(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        rows = [item[key] | item["images"] for key in ("chosen", "rejected") for item in items]
        batch = self.pad(rows)
        if all("reference" in item for item in items):
            batch["reference_logps"] = torch.stack([item["reference"] for item in items])
        return batch


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of each row's labelled tokens (labels shifted as the LM shifts them)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    per_token = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Mean sigmoid DPO loss of (B, 2) log-probs [chosen, rejected], and the usual reward metrics."""
    ratios = policy - reference
    rewards = beta * ratios.detach()
    loss = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1])).mean()
    metrics = {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
               "rewards/margins": rewards[:, 0] - rewards[:, 1],
               "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float()}
    return loss, metrics


def pair_logps(model, batch: dict) -> torch.Tensor:
    """(B, 2) summed reply log-probs [chosen, rejected] of a PairCollator batch."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "reference_logps")}
    logps = sequence_logps(model(**inputs).logits, batch["labels"])
    return torch.stack(logps.chunk(2), dim=1)


@torch.no_grad()
def score_pairs(model, dataset: PreferenceDataset, collator: PairCollator, batch_size: int = 16) -> torch.Tensor:
    """(N, 2) reply log-probs of every pair, in eval mode (the model's mode is restored afterwards)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    scores = []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        scores.append(pair_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu())
    model.train(was_training)
    return torch.cat(scores)


def preference_accuracy(scores: torch.Tensor) -> float:
    """Share of pairs whose chosen reply is more likely than the rejected one."""
    return float((scores[:, 0] > scores[:, 1]).float().mean())


def add_reference(dataset: PreferenceDataset, scores: torch.Tensor) -> None:
    for pair, (chosen, rejected) in zip(dataset.examples, scores.tolist()):
        pair.reference = (chosen, rejected)


class DPOTrainer(VLMTrainer):
    """VLMTrainer (one learning rate per module) whose loss is DPO's; logs rewards and margins."""

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: scale by accumulation steps
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.get("reference_logps")
        if reference is None:
            raise DataError("DPO batch without reference log-probs; compute them with add_reference first")
        loss, metrics = dpo_loss(pair_logps(model, inputs), reference, self.beta)
        for name, values in metrics.items():
            self._metrics[name].append(self.accelerator.gather_for_metrics(values).mean().item())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        logs = logs | {name: sum(v) / len(v) for name, v in self._metrics.items() if v}
        self._metrics.clear()
        super().log(logs, *args, **kwargs)

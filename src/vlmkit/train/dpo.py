"""DPO for VLMs on TRL's DPOTrainer: vlmkit tokenises the pairs and opens their images, TRL trains.

TRL brings the losses (`dpo.loss_type`: sigmoid, ipo, hinge, robust, ...), the reference
(log-probs precomputed once, or a frozen copy of the model, or of its LoRA adapters, beside
training), the metrics (rewards/chosen, rewards/accuracies, rewards/margins, logps/*) and
their logging.
vlmkit brings what TRL's own processing does not know: its processor expands each `<image>`
marker into the model's count of placeholder tokens, and its model takes `pixel_values` (and
`crop_sizes`). The seams, in TRL 1.16:

- The data is a `datasets.Dataset` (TRL accepts nothing else) of rows already tokenised here,
  in TRL's own columns (`prompt_ids`, `chosen_ids`, `rejected_ids`), plus which reply tokens
  are scored (`chosen_mask`, `rejected_mask`: the chat template's assistant tokens) and the
  pair's `index`, by which `PairCollator` opens the images. `_prepare_dataset`, TRL's
  tokenisation, is overridden to leave it as it is. There is no `images` column on purpose:
  TRL takes a dataset with one for raw data that its own vision collator processes, and
  refuses precomputed reference log-probs for it.
- `PairCollator` gives TRL's batch (chosen rows, then rejected rows, `completion_mask`,
  `ref_*_logps`) plus the image crops, which TRL passes to the model untouched.
- TRL scores tokens with a fused LM head (`add_fused_lm_head`): it patches `model.forward`
  to run `model.base_model` for hidden states and the LM head on the scored positions only.
  vlmkit's model keeps its LM whole, so its `base_model` is itself and has no hidden states
  to give. `_move_fused_head` moves the patch down to `model.language_model`, the causal LM
  it is written for; the model's own forward merges the image features and passes
  `fused_lm_head=True` on. It runs after TRL's `__init__` and, because TRL precomputes the
  reference inside its `__init__`, also at the start of `_precompute_ref_logps`.

Everything else -- `_compute_loss`, `compute_ref_log_probs`, `log` -- is TRL's, unchanged. Two
smaller overrides keep vlmkit's output directory as it was: no TRL model card (it offers a
text-generation pipeline of a base model it cannot name), and no copy of a LoRA model's
adapters that TRL keeps as the reference (`drop_reference_adapter`, before the final save).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import trl
from accelerate import PartialState
from accelerate.utils import is_peft_model
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from trl.trainer.utils import add_fused_lm_head

from vlmkit.config import LearningRates, RunConfig
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.records import Record, prepare_all
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.image_processing import concat_image_inputs
from vlmkit.processing.processor import IGNORE_INDEX
from vlmkit.train.trainer import VLMTrainer, training_arguments

REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # TRL's precomputed reference, per row


@dataclass
class Pair:
    record: Record
    row: dict  # prompt_ids, then chosen_/rejected_ ids and mask (1: a scored reply token)


class PreferenceDataset(ConversationDataset):
    """Preference records as TRL's tokenised rows: a prompt (images laid out) and two replies."""

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
        row, start = {"prompt_ids": prompt_ids.tolist()}, len(prompt_ids)
        for key, reply in zip(("chosen", "rejected"), replies):
            n = len(reply["input_ids"])
            if n > self.max_length:
                raise record.error(f"is {n} tokens long with a reply, over max_length {self.max_length}")
            if not torch.equal(reply["input_ids"][:start], prompt_ids):
                raise record.error("the chat template does not render the prompt as a prefix of prompt + reply")
            # Earlier assistant turns lie inside the prompt, so only this reply's tokens are scored.
            row[f"{key}_ids"] = reply["input_ids"][start:].tolist()
            row[f"{key}_mask"] = (reply["labels"][start:] != IGNORE_INDEX).long().tolist()
        return Pair(record, row)

    def __getitem__(self, index: int) -> dict:
        return {"index": index, **self.examples[index].row}

    def images(self, index: int) -> dict:
        """`pixel_values` (and `crop_sizes`) of pair `index`'s images; empty without images."""
        record = self.examples[index].record
        return self.processor.image_inputs([self._open(record, p, decode=True) for p in record.images])

    def to_dataset(self, folder: Path) -> datasets.Dataset:
        """The rows as the `datasets.Dataset` TRL trains on, saved in `folder`. TRL caches the
        reference log-probs beside a dataset's files, so every process must read the same ones
        (in memory, each would look for its own); a resumed run finds them there again."""
        state = PartialState()
        with state.main_process_first():
            if state.is_main_process:
                datasets.Dataset.from_list([self[i] for i in range(len(self))]).save_to_disk(str(folder))
            return datasets.load_from_disk(str(folder))


class PairCollator:
    """TRL's preference batch with the images: the B chosen sequences (prompt + reply), then the B
    rejected ones; `completion_mask` marks the scored reply tokens; each pair's crops come once per
    half, in row order, as its placeholders do. TRL's reference log-probs pass through."""

    def __init__(self, pairs: PreferenceDataset):
        self.pairs = pairs
        self.pad_token_id = pairs.processor.tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        ids, masks = [], []
        for key in ("chosen", "rejected"):
            for row in rows:
                ids.append(torch.tensor(row["prompt_ids"] + row[f"{key}_ids"]))
                masks.append(torch.tensor([0] * len(row["prompt_ids"]) + row[f"{key}_mask"]))
        batch = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
                 "attention_mask": pad_sequence([torch.ones_like(row) for row in ids], batch_first=True),
                 "completion_mask": pad_sequence(masks, batch_first=True)}
        images = [self.pairs.images(row["index"]) for row in rows]
        batch |= concat_image_inputs(images + images)
        return batch | {key: torch.tensor([row[key] for row in rows]) for key in REFERENCE_KEYS if key in rows[0]}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of each row's labelled tokens (labels shifted as the LM shifts them)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    per_token = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(dim=1)


def pair_logps(model, batch: dict) -> torch.Tensor:
    """(B, 2) summed reply log-probs [chosen, rejected] of a PairCollator batch, from the model's logits
    (TRL's fused head, which only training sets up, is not needed)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", *REFERENCE_KEYS)}
    logps = sequence_logps(model(**inputs).logits, labels)
    return torch.stack(logps.chunk(2), dim=1)


@torch.no_grad()
def score_pairs(model, pairs: PreferenceDataset, batch_size: int = 16) -> torch.Tensor:
    """(N, 2) reply log-probs of every pair, in eval mode (the model's mode is restored afterwards)."""
    was_training, device, collate = model.training, next(model.parameters()).device, PairCollator(pairs)
    model.eval()
    scores = []
    for start in range(0, len(pairs), batch_size):
        batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        scores.append(pair_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu())
    model.train(was_training)
    return torch.cat(scores)


def preference_accuracy(scores: torch.Tensor) -> float:
    """Share of pairs whose chosen reply is more likely than the rejected one."""
    return float((scores[:, 0] > scores[:, 1]).float().mean())


def precomputed_reference(dataset: datasets.Dataset) -> torch.Tensor | None:
    """(N, 2) reference log-probs TRL precomputed into the rows, or None (the reference runs beside training)."""
    if not set(REFERENCE_KEYS) <= set(dataset.column_names):
        return None
    return torch.stack([torch.tensor(dataset[key]) for key in REFERENCE_KEYS], dim=1)


def dpo_arguments(cfg: RunConfig, rates: LearningRates) -> trl.DPOConfig:
    """The Trainer's arguments from the run's config (trainer.training_arguments), and the `dpo`
    section as TRL's DPOConfig fields."""
    settings = cfg.dpo
    mapped = {"beta": settings.beta, "loss_type": settings.loss_type, "max_length": cfg.data.max_length,
              "precompute_ref_log_probs": settings.precompute_ref_log_probs}
    clash = sorted(set(settings.trl) & set(mapped))
    if clash:
        raise ConfigError(f"dpo.trl sets {', '.join(clash)}; set dpo.{clash[0]} instead")
    try:
        return training_arguments(cfg, rates, has_eval=False, arguments=trl.DPOConfig, **mapped, **settings.trl)
    except (TypeError, ValueError) as err:  # an unknown field, or a value TRL rejects
        raise ConfigError(f"dpo settings: {err}") from None


class DPOTrainer(VLMTrainer, trl.DPOTrainer):
    """TRL's DPOTrainer on vlmkit's model, rows and collator, with VLMTrainer's per-module learning
    rates, time budget and staged checkpoints (the module docstring says why each override exists)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._move_fused_head()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenised by PreferenceDataset, images laid out by vlmkit's processor

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._move_fused_head()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _vlm(self, model: nn.Module) -> nn.Module:
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _move_fused_head(self) -> None:
        """TRL's fused LM head, moved from vlmkit's model (whose forward it replaced) to its language
        model, with the per-token outputs TRL asked for: the policy's feed the metrics (and WPO's
        weights), the reference model's are the log-probs alone."""
        policy = ("log_probs", "entropy", "mean_logits", "is_top1")
        policy += ("log_sum_sq_probs",) if self.use_weighting else ()
        for model, outputs in ((self.model, policy), (self.ref_model, ("log_probs",))):
            vlm = None if model is None else self._vlm(model)
            if vlm is not None and "forward" in vars(vlm):  # TRL's patch, not moved yet
                del vlm.forward
                add_fused_lm_head(vlm.language_model, outputs=outputs)

    def create_model_card(self, *args, **kwargs) -> None:
        # TRL's card (README.md, at every checkpoint) offers a text-generation pipeline of a base
        # model it cannot name; a vlmkit model folder has vlmkit_run.yaml and train_summary.json.
        return None

    def drop_reference_adapter(self) -> None:
        """Delete the frozen copy of the adapters TRL adds to a LoRA model as its reference, so that
        the saved model holds the trained adapters alone."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model) and "ref" in model.peft_config:
            model.delete_adapter("ref")


def reference_model(model: nn.Module, precompute: bool, fsdp: bool) -> nn.Module | None:
    """A frozen copy of the starting model, for a reference that runs beside training; None when TRL
    precomputes the reference, or for a LoRA model, of which TRL copies the adapters. Under FSDP, TRL
    precomputes with a reference model too, which it would otherwise load from the model's hub
    name -- one a model vlmkit composed does not have."""
    if is_peft_model(model) or (precompute and not fsdp):
        return None
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    reference.feature_cache = model.feature_cache  # the vision encoder is the same frozen one in both
    return reference


def build_trainer(cfg: RunConfig, model: nn.Module, processor, rates: LearningRates, pairs: PreferenceDataset,
                  data_dir: Path) -> DPOTrainer:
    """TRL's trainer as the run's config sets it up, on `pairs` (saved in `data_dir`). The reference
    is the starting model: precomputed by TRL here, or kept beside the policy."""
    args = dpo_arguments(cfg, rates)
    reference = reference_model(model, cfg.dpo.precompute_ref_log_probs, bool(cfg.train.fsdp))
    return DPOTrainer(model=model, ref_model=reference, args=args,
                      train_dataset=pairs.to_dataset(data_dir), data_collator=PairCollator(pairs),
                      processing_class=processor, learning_rates=rates, time_budget=cfg.train.time_budget)

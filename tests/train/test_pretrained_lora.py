"""The default recipe (configs/default.yaml: DINOv2-small + SmolLM2, LoRA) for two steps on the real checkpoints.

Both ways of saving LoRA are trained once per module on the same data with the same seed:
adapters with their `base/` folder, and one merged model. Images are 56 px (4x4 patches) so
that a step takes about a second on a CPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.serve.generation import load_for_inference
from vlmkit.train import lora
from vlmkit.train.trainer import VLMTrainer

run_module = importlib.import_module("vlmkit.train.run")

# The first two training losses of the default recipe on the synthetic train split (seed 0, batch 2,
# 56 px, no warmup, so that the second loss follows a full first step): float32 values of this code
# on the shipped checkpoints. They move if the composition, the chat template's masks, the data
# order, the initialisation (the projector scaled to the word embeddings included) or the
# optimiser's first step change; with the recipe's lm_start of 0.5, that first step trains the projector alone.
GOLDEN_LOSSES = (5.273992, 4.590486)
# CPUs differ in their float32 kernels: the second loss was 4.590486 on an AMD EPYC and 4.590691 on
# an Intel Xeon (both AVX512-BF16). A real change moves it by far more (the first step moves it 0.68).
GOLDEN_TOLERANCE = 1e-3


def _train(synth_dir, out, save: str, monkeypatch):
    """Two steps of the default recipe; the saved folder and the losses the Trainer logged."""
    seen = []

    class Remembering(VLMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(run_module, "VLMTrainer", Remembering)
    cfg = load_config("default", ["model.image_size=56", "train.max_steps=2", "train.batch_size=2",
                                  "train.report_to=[]", "train.bf16=false", "train.logging_steps=1",
                                  "train.save_steps=1000", "train.warmup=0", f"lora.save={save}"])
    cfg.data.train, cfg.train.output_dir = str(synth_dir / "train.jsonl"), str(out)
    saved = run_module.run(cfg, log=lambda *args: None)
    (trainer,) = seen
    return saved, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def trained(pretrained_checkpoints, synth_dir, tmp_path_factory):
    """(folder, losses) of the adapter run and of the merged run."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        adapter = _train(synth_dir, tmp_path_factory.mktemp("adapter"), "adapter", monkeypatch)
    with pytest.MonkeyPatch.context() as monkeypatch:
        merged = _train(synth_dir, tmp_path_factory.mktemp("merged"), "merged", monkeypatch)
    return {"adapter": adapter, "merged": merged}


def _logits(model, processor, records):
    batch = Collator(processor.tokenizer.pad_token_id)(
        [ConversationDataset(records[:2], processor, max_length=1024)[i] for i in range(2)])
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_adapters_load_merged_and_unmerged_alike(trained, train_records):
    out, _ = trained["adapter"]
    assert lora.is_adapter(out) and (out / lora.BASE_DIR / "config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapters alone, beside their base
    unmerged, processor = lora.load(out)
    merged, _ = lora.load(out, merge=True)
    assert hasattr(unmerged, "peft_config") and not hasattr(merged, "peft_config")
    logits = _logits(unmerged, processor, train_records)
    # Merging folds B @ A into each weight, which reorders float32 sums: logits near 40 move by about 1e-4.
    assert torch.allclose(_logits(merged, processor, train_records), logits, rtol=0, atol=5e-4)
    base, _ = lora.load(out / lora.BASE_DIR)
    assert not torch.allclose(_logits(base, processor, train_records), logits, atol=1e-3)  # training changed it


def test_merged_folder_equals_the_adapters_merged(trained, train_records):
    (adapter_dir, adapter_losses), (merged_dir, merged_losses) = trained["adapter"], trained["merged"]
    assert not lora.is_adapter(merged_dir) and (merged_dir / "model.safetensors").is_file()
    assert merged_losses == adapter_losses  # the same seed and data train the same model
    model, processor = load_for_inference(merged_dir, device="cpu")
    reference, _ = lora.load(adapter_dir, merge=True)
    logits = _logits(model, processor, train_records)
    assert torch.allclose(logits, _logits(reference, processor, train_records), atol=1e-5)


def test_first_losses_of_the_default_recipe_are_pinned(trained):
    _, losses = trained["adapter"]
    assert len(losses) == 2
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=GOLDEN_TOLERANCE), losses

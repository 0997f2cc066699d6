"""LoRA: only adapters (and modules_to_save) train; adapters and merged models save and load exactly;
bad settings fail before training."""

import pytest
import torch

from tests.finetune.helpers import make_config, run, run_module
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.errors import ConfigError
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.serve.generation import load_for_inference
from vlmkit.train import lora
from vlmkit.train.trainer import module_of

LORA = ["lora.enabled=true", "train.max_steps=3", "train.lr.lm=1e-2", "train.lr.projector=1e-2"]


def _logits(model, processor, records):
    batch = Collator(processor.tokenizer.pad_token_id)(
        [ConversationDataset(records[:3], processor, max_length=1024)[i] for i in range(3)]
    )
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_only_adapters_and_the_projector_change(synth_dir, tmp_path, trainers):
    run(make_config(synth_dir / "train.jsonl", tmp_path / "run", LORA + ["lora.vision=true", "train.lr.vision=1e-2"]))
    (trainer,) = trainers
    before, after = trainer.initial_state, trainer.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    adapters = {k for k in after if "lora_" in k}
    copies = {k for k in after if "modules_to_save" in k}
    assert {module_of(k) for k in adapters} == {"lm", "vision"}
    assert {module_of(k) for k in copies} == {"projector"}
    # lora_B starts at zero, so after a few steps every B matrix has moved; nothing outside the adapters
    # and the projector's trainable copy has.
    assert all(k in changed for k in adapters if "lora_B" in k)
    assert all(k in changed for k in copies)
    assert changed <= adapters | copies
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if not ("lora_" in n or
                                                                                     "modules_to_save" in n))
    # Each module's trainable parameters keep their module's own rate.
    groups = trainer.optimizer.param_groups
    assert {g["name"].removesuffix("_no_decay") for g in groups} == {"lm", "vision", "projector"}
    assert all(g["initial_lr"] == 1e-2 for g in groups)


def test_adapter_save_then_load_gives_identical_logits(synth_dir, train_records, tmp_path, trainers):
    out = run(make_config(synth_dir / "train.jsonl", tmp_path / "run", LORA))
    (trainer,) = trainers
    assert lora.is_adapter(out) and (out / "base" / "config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapters alone, not a full copy

    trained = _logits(trainer.model, trainer.processing_class, train_records)
    loaded, processor = lora.load(out)
    assert torch.equal(_logits(loaded, processor, train_records), trained)
    base, _ = lora.load(out / "base")
    assert not torch.allclose(_logits(base, processor, train_records), trained, atol=1e-3)  # the adapters matter

    merged, _ = lora.load(out, merge=True)
    assert isinstance(merged, VLMForConditionalGeneration)
    merged_logits = _logits(merged, processor, train_records)
    assert torch.allclose(merged_logits, trained, atol=1e-5)  # merging only reorders float operations
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    reloaded, _ = lora.load(tmp_path / "merged")
    assert torch.equal(_logits(reloaded, processor, train_records), merged_logits)
    # eval, chat and serve load an adapter-only directory through load_for_inference, merged
    served, _ = load_for_inference(out, device="cpu")
    assert isinstance(served, VLMForConditionalGeneration) and not served.training
    assert torch.equal(_logits(served, processor, train_records), merged_logits)


def test_merged_save_writes_one_plain_model(synth_dir, train_records, tmp_path, trainers):
    out = run(make_config(synth_dir / "train.jsonl", tmp_path / "run", LORA + ["lora.save=merged"]))
    (trainer,) = trainers
    assert not lora.is_adapter(out) and not (out / "base").exists()
    trained = _logits(trainer.model, trainer.processing_class, train_records)
    model = VLMForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in n or "modules_to_save" in n for n in model.state_dict())
    assert torch.allclose(_logits(model, trainer.processing_class, train_records), trained, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [(["lora.target_modules=[q_proj, qkv]"], "lora.target_modules: qkv match no linear layer"),
     (["lora.vision=true", "train.lr.vision=0"], "lora.vision is on but train.lr.vision is 0"),
     (["lora.quantize=4bit"], "needs a CUDA GPU and the bitsandbytes package"),
     (["lora.save=both"], "lora.save 'both'")],
)
def test_bad_lora_settings_fail_before_training(synth_dir, tmp_path, trainers, overrides, message):
    if "quantize" in overrides[0] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the message is for machines without one")
    with pytest.raises(ConfigError, match=message):
        run(make_config(synth_dir / "train.jsonl", tmp_path / "run", LORA + overrides))
    assert trainers == []  # no trainer was built, so no step ran


def test_adapters_idle_until_the_lm_starts_then_train(synth_dir, tmp_path, monkeypatch):
    # Fresh adapters change nothing while their rate is 0, so they are switched off for those steps:
    # the first steps' losses equal a run that keeps them on, lora_B stays 0 until the LM starts,
    # and afterwards every adapter trains and the model leaves with its adapters on.
    from vlmkit.train import trainer as trainer_module

    def losses_and_states(keep_on: bool):
        seen, states = [], []

        class Watching(trainer_module.VLMTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen.append(self)

            def training_step(self, model, inputs, num_items_in_batch=None):
                out = super().training_step(model, inputs, num_items_in_batch)
                first = trainer_module.lm_lora_layers(model)[0]
                b_max = max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n)
                states.append((first.disable_adapters, b_max))
                return out

        with monkeypatch.context() as patch:
            patch.setattr(run_module, "VLMTrainer", Watching)
            if keep_on:
                patch.setattr(trainer_module, "idle_adapters", lambda model, idle: False)
            run(make_config(synth_dir / "train.jsonl", tmp_path / f"run-{keep_on}",
                            ["lora.enabled=true", "lora.save=adapter", "train.max_steps=6", "train.lm_start=0.5",
                             "train.max_grad_norm=0",  # (idle adapters' gradients would count in the clipped norm)
                             "train.lr.lm=1e-2", "train.lr.projector=1e-2"]))
        (trainer,) = seen
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, states, trainer

    idle_losses, idle_states, trainer = losses_and_states(keep_on=False)
    on_losses, on_states, _ = losses_and_states(keep_on=True)
    assert [off for off, _ in idle_states] == [True] * 3 + [False] * 3
    assert [off for off, _ in on_states] == [False] * 6
    # (seen after each backward pass, before that step's update)
    assert all(b == 0 for _, b in idle_states[:4]) and all(b > 0 for _, b in idle_states[4:])
    assert idle_losses[:4] == on_losses[:4]  # the 4th step is the first with the LM learning: B was still 0
    assert not any(layer.disable_adapters for layer in trainer_module.lm_lora_layers(trainer.model))


def test_vision_adapters_train_while_the_lm_waits(synth_dir, tmp_path, trainers):
    from peft.tuners.lora import LoraLayer

    from vlmkit.train.trainer import lm_lora_layers

    run(make_config(synth_dir / "train.jsonl", tmp_path / "run",
                    ["lora.enabled=true", "lora.vision=true", "lora.save=adapter", "train.max_steps=4",
                     "train.lm_start=0.75", "train.lr.lm=1e-2", "train.lr.vision=1e-2", "train.lr.projector=1e-2"]))
    (trainer,) = trainers
    # AdamW counts the steps each parameter got a gradient: the vision encoder's adapters all four,
    # the LM's only the last (its rate starts at step 3), not the three it waited.
    steps = {}
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            steps.setdefault(module_of(name), set()).add(int(trainer.optimizer.state[param]["step"]))
    assert steps == {"vision": {4}, "lm": {1}}
    vision = [m for n, m in trainer.model.named_modules() if isinstance(m, LoraLayer) and module_of(n) == "vision"]
    assert vision and not set(map(id, vision)) & set(map(id, lm_lora_layers(trainer.model)))


def test_adapters_stay_on_while_the_lm_waits_when_nothing_else_trains(synth_dir, tmp_path, trainers):
    # With the projector frozen, idle adapters would leave the backward pass nothing to compute.
    from vlmkit.train.trainer import lm_lora_layers

    run(make_config(synth_dir / "train.jsonl", tmp_path / "run",
                    ["lora.enabled=true", "lora.modules_to_save=[]", "lora.save=adapter", "train.max_steps=2",
                     "train.lm_start=0.5", "train.lr.lm=1e-2", "train.lr.projector=0"]))
    (trainer,) = trainers
    assert not trainer._adapters_idle and not trainer._adapters_may_idle
    assert not any(layer.disable_adapters for layer in lm_lora_layers(trainer.model))

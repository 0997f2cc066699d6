"""Gradient checkpointing covers the LM and the vision encoder and leaves gradients unchanged;
the engine options reach the Trainer's arguments."""

import torch
import transformers.modeling_utils

from tests.finetune.helpers import make_config
from vlmkit.data.dataset import Collator, ConversationDataset
from vlmkit.train.trainer import training_arguments


def _grads(model, batch) -> dict:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_recomputes_every_layer_and_keeps_the_gradients(tiny, train_records, monkeypatch):
    model = tiny.model.train()
    dataset = ConversationDataset(train_records[:3], tiny.processor, max_length=1024)
    batch = Collator(tiny.processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    reference = _grads(model, batch)

    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    model.gradient_checkpointing_enable()
    checkpointed = _grads(model, batch)
    layers = model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    assert len(calls) == layers  # each decoder layer and each vision encoder layer, once per forward
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6), name


def test_engine_options_reach_the_trainer(synth_dir, tmp_path):
    options = ["train.torch_compile=true", "train.gradient_checkpointing=true"]
    cfg = make_config(synth_dir / "train.jsonl", tmp_path, options)
    args = training_arguments(cfg, cfg.train.learning_rates(), has_eval=False)
    assert args.torch_compile and args.activation_checkpointing
    assert not args.deepspeed and not args.fsdp

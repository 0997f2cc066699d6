"""train.lm_start: the LM's learning rate stays 0 for its share of the steps, then warms up into the
run's schedule; the other modules follow the schedule from the first step."""

import torch
from transformers import get_cosine_schedule_with_warmup

from vlmkit.train.trainer import delay_lm


def _rates(start: int, steps: int = 20, warmup: int = 2) -> dict[str, list[float]]:
    params = {name: torch.nn.Parameter(torch.zeros(1)) for name in ("lm", "lm_no_decay", "projector")}
    optimizer = torch.optim.AdamW([{"params": [p], "lr": 1e-3, "name": name} for name, p in params.items()])
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    if start:
        delay_lm(scheduler, start, warmup)
    rates = {name: [] for name in params}
    for _ in range(steps):
        for group in optimizer.param_groups:
            rates[group["name"]].append(group["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_lm_waits_then_warms_up_into_the_shared_schedule():
    plain, delayed = _rates(0), _rates(8)
    assert delayed["projector"] == plain["projector"]
    for name in ("lm", "lm_no_decay"):
        assert delayed[name][:8] == [0.0] * 8
        assert 0 < delayed[name][8] < delayed[name][9] == plain[name][9]  # two warmup steps, then the schedule
        assert delayed[name][10:] == plain[name][10:]


def test_adapters_idle_until_the_lm_starts_then_train(synth_dir, tmp_path, monkeypatch):
    # Fresh adapters change nothing while their rate is 0, so they are switched off for those steps:
    # the first steps' losses equal a run that keeps them on, lora_B stays 0 until the LM starts,
    # and afterwards every adapter trains and the model leaves with its adapters on.
    from tests.finetune.helpers import make_config, run, run_module
    from vlmkit.train import trainer as trainer_module

    def losses_and_states(keep_on: bool):
        seen, states = [], []

        class Watching(trainer_module.VLMTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen.append(self)

            def training_step(self, model, inputs, num_items_in_batch=None):
                out = super().training_step(model, inputs, num_items_in_batch)
                layers = trainer_module.lora_layers(model)
                states.append(([layer.disable_adapters for layer in layers][0],
                               max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n)))
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
    assert not any(layer.disable_adapters for layer in trainer_module.lora_layers(trainer.model))

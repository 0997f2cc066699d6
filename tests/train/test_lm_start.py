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

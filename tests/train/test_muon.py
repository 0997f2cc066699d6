"""`train.optimizer: muon`: which parameters Muon takes, that the scheduler and the checkpoints
reach both of its parts, and that an interrupted run resumes to the same weights."""

import pytest
import torch

from tests.train.test_training import (  # noqa: F401 (recorder is a fixture)
    Interrupted,
    InterruptAfter,
    make_config,
    quiet,
    recorder,
    run_module,
)
from vlmkit.config import TrainConfig
from vlmkit.errors import ConfigError
from vlmkit.train import muon


def test_muon_takes_the_lms_hidden_matrices_and_adamw_the_rest(synth_dir, tmp_path, recorder):
    run_module.run(make_config(synth_dir, tmp_path, optimizer="muon", max_steps=2, warmup=1), log=quiet)
    trainer = recorder.trainers[-1]
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, muon.MuonWithAdamW)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    muon_part, adamw_part = optimizer.parts
    in_muon = [names[id(p)] for group in muon_part.param_groups for p in group["params"]]
    in_adamw = [names[id(p)] for group in adamw_part.param_groups for p in group["params"]]
    assert sorted(in_muon + in_adamw) == sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    # Every attention and MLP matrix of each LM layer, and nothing else.
    assert len(in_muon) == 7 * 2 and all(".layers." in n and n.endswith("proj.weight") for n in in_muon)
    assert any("embed_tokens" in n for n in in_adamw) and any("projector" in n for n in in_adamw)
    assert any("vision_tower" in n for n in in_adamw) and any("norm" in n for n in in_adamw)

    # The scheduler's rate reached both parts' groups (step 2 of 2 with 1 warmup step: cosine at its end).
    rates = trainer.lr_scheduler.get_last_lr()
    assert rates == [group["lr"] for part in optimizer.parts for group in part.param_groups]
    assert rates[0] == pytest.approx(0.0, abs=1e-12)
    # Both parts keep state: Muon a momentum buffer per matrix, AdamW two moments per tensor.
    saved = optimizer.state_dict()["parts"]
    assert len(saved[0]["state"]) == len(in_muon) and "momentum_buffer" in saved[0]["state"][0]
    assert len(saved[1]["state"]) == len(in_adamw) and "exp_avg_sq" in saved[1]["state"][0]


def test_a_muon_run_resumed_from_its_checkpoint_ends_with_the_same_weights(synth_dir, tmp_path, recorder):
    settings = {"max_steps": 4, "save_steps": 2, "batch_size": 2, "optimizer": "muon"}
    run_module.run(make_config(synth_dir, tmp_path / "A", **settings), log=quiet)
    uninterrupted = recorder.trainers[-1]

    recorder.callbacks = [InterruptAfter(2)]
    with pytest.raises(Interrupted):
        run_module.run(make_config(synth_dir, tmp_path / "B", **settings), log=quiet)
    recorder.callbacks = []
    run_module.run(make_config(synth_dir, tmp_path / "B", resume=True, **settings), log=quiet)
    resumed = recorder.trainers[-1]
    assert resumed.state.global_step == 4
    assert resumed.losses == pytest.approx(uninterrupted.losses[2:], rel=1e-6, abs=1e-7)
    final_a, final_b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    for name, weight in final_a.items():
        assert torch.allclose(final_b[name], weight, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "lion"}, "is not one of adamw, muon"),
    ({"optimizer": "muon", "fsdp": "full_shard"}, "needs whole weight matrices"),
    ({"optimizer": "muon", "deepspeed": "ds.json"}, "needs whole weight matrices"),
])  # fmt: skip
def test_unknown_optimizers_and_muon_under_sharding_engines_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        muon.check(TrainConfig(**settings))

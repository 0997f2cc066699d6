"""`train.optimizer: muon`: which parameters Muon takes, that the scheduler and the checkpoints
reach both of its parts, that an interrupted run resumes to the same weights, and that the
grouped Muon steps as torch's own."""

import pytest
import torch

from tests.train.helpers import Interrupted, InterruptAfter, make_config, quiet, run_module
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
])
def test_unknown_optimizers_and_muon_under_sharding_engines_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        muon.check(TrainConfig(**settings))


@pytest.mark.parametrize("nesterov", [True, False])
def test_grouped_muon_steps_as_torchs_muon(nesterov):
    # Square, wide and tall matrices, several of each shape, in two groups (one with a tensor rate);
    # in the second step one matrix has no gradient. The stacked Newton-Schulz run must give every
    # matrix the update torch's one-at-a-time Muon gives it, step after step.
    shapes = [(24, 24), (24, 24), (16, 40), (16, 40), (16, 40), (40, 16), (40, 16)]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    grads[1][2] = None

    def trained(optimizer_class):
        params = [torch.nn.Parameter(tensor.clone()) for tensor in start]
        groups = [{"params": params[:5], "lr": 0.02}, {"params": params[5:], "lr": torch.tensor([0.01]),
                                                       "weight_decay": 0.0}]
        optimizer = optimizer_class(groups, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=muon.ADJUST_LR)
        for step_grads in grads:
            for param, grad in zip(params, step_grads):
                param.grad = None if grad is None else grad.clone()
            optimizer.step()
        return params, optimizer

    reference, torch_optimizer = trained(torch.optim.Muon)
    grouped, grouped_optimizer = trained(muon.GroupedMuon)
    for ours, theirs, before in zip(grouped, reference, start):
        assert (ours - before).abs().max() > 1e-3  # it did step
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # The same state: a checkpoint of either loads into the other and steps on alike.
    ours, theirs = grouped_optimizer.state_dict(), torch_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, state in theirs["state"].items():
        torch.testing.assert_close(ours["state"][index]["momentum_buffer"], state["momentum_buffer"])
    grouped_optimizer.load_state_dict(theirs)
    torch_optimizer.load_state_dict(ours)
    for params in (grouped, reference):
        for param, grad in zip(params, grads[0]):
            param.grad = grad.clone()
    grouped_optimizer.step()
    torch_optimizer.step()
    for ours, theirs in zip(grouped, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_grouped_muon_splits_large_stacks_and_runs_a_closure_with_gradients(monkeypatch):
    monkeypatch.setattr(muon.GroupedMuon, "MAX_STACK_ELEMENTS", 2 * 24 * 24)  # stacks of two
    generator = torch.Generator().manual_seed(1)
    start = [torch.randn(24, 24, generator=generator) for _ in range(5)]
    target = torch.randn(24, 24, generator=generator)
    results = []
    for optimizer_class in (torch.optim.Muon, muon.GroupedMuon):
        params = [torch.nn.Parameter(tensor.clone()) for tensor in start]
        optimizer = optimizer_class(params, lr=0.02)

        def closure():
            optimizer.zero_grad()
            loss = sum(((p - target) ** 2).sum() for p in params)
            loss.backward()
            return loss

        losses = [optimizer.step(closure).item() for _ in range(3)]
        results.append((params, losses))
    (theirs, their_losses), (ours, our_losses) = results
    assert our_losses == pytest.approx(their_losses) and our_losses[-1] < our_losses[0]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, fn", [((160, 448), muon.ADJUST_LR), ((448, 160), "original"), ((16, 40), None)])
def test_grouped_muon_scales_the_rate_as_torch_does(shape, fn):
    from torch.optim._muon import _adjust_lr  # private: checked here so that ours cannot drift from it

    assert muon.adjusted_lr(0.02, fn, torch.Size(shape)) == pytest.approx(_adjust_lr(0.02, fn, torch.Size(shape)))

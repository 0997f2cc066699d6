"""vlmkit's DPO loss against TRL's, on the same log-probs, and the pair log-probs against a direct sum.

TRL computes the loss inside `DPOTrainer._compute_loss`, from per-token log-probs that its
patched LM head returns. The test calls that method with a stand-in trainer and a stand-in
model that hands back chosen per-token log-probs, so TRL's own arithmetic runs on them.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlmkit.train.dpo import dpo_loss, sequence_logps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


def _trl_loss(per_token: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor, beta: float):
    """TRL's sigmoid DPO loss and reward metrics for per-token log-probs (2B, T) [chosen rows, rejected rows]."""
    ident = lambda x: x  # noqa: E731 -- one process: gathering is the identity
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=ident,
                                                                          gather_for_metrics=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    rows, length = per_token.shape[0], per_token.shape[1] + 1
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    inputs = {"input_ids": torch.zeros(rows, length, dtype=torch.long), "attention_mask": torch.ones(rows, length),
              "completion_mask": torch.cat([torch.zeros(rows, 1), mask], dim=1),
              "ref_chosen_logps": reference[:, 0], "ref_rejected_logps": reference[:, 1]}
    loss = trl_dpo.DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl_on_the_same_log_probs(beta):
    torch.manual_seed(0)
    pairs, tokens = 6, 7
    per_token = -torch.rand(2 * pairs, tokens) * 3  # TRL's masked per-token log-probs: zero outside the reply
    mask = (torch.rand(2 * pairs, tokens) > 0.3).float()
    per_token = per_token * mask
    policy = torch.stack(per_token.sum(dim=1).chunk(2), dim=1)  # (pairs, 2): [chosen, rejected]
    reference = policy + torch.randn(pairs, 2)

    ours, metrics = dpo_loss(policy, reference, beta)
    theirs, their_metrics = _trl_loss(per_token, mask, reference, beta)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert ours.item() != pytest.approx(dpo_loss(policy, reference, beta * 2)[0].item(), abs=1e-3)  # beta matters
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].mean().item() == pytest.approx(their_metrics[name], abs=1e-6), name


def test_sequence_log_probs_sum_the_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, -100, 1, -100]])
    expected = []
    for row in range(2):
        log_probs = logits[row].log_softmax(-1)
        expected.append(sum(log_probs[t - 1, labels[row, t]] for t in range(1, 5) if labels[row, t] != -100))
    assert torch.allclose(sequence_logps(logits, labels), torch.stack(expected), atol=1e-6)

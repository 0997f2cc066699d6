"""TRL's DPOTrainer on vlmkit's pairs: each step's loss against the DPO formulas on log-probs computed
apart from TRL, and the pair log-probs against a direct sum.

TRL scores tokens with its fused LM head, moved onto vlmkit's language model (train/dpo.py);
the checks score the same batch through vlmkit's own forward (full logits, images merged),
with the training model for the policy and a copy of the starting model for the reference.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import set_seed

from tests.finetune.helpers import make_config
from vlmkit.data.preferences import make_preferences, read_preferences, write_preferences
from vlmkit.data.records import read_records
from vlmkit.train.dpo import PreferenceDataset, build_trainer, pair_logps, sequence_logps
from vlmkit.train.run import prepare_model

BETA = 0.5


@pytest.fixture
def pairs_file(synth_dir, tmp_path):
    """Four image question pairs: the right answer chosen, another of its category rejected."""
    path = tmp_path / "pairs.jsonl"
    write_preferences(path, make_preferences(read_records(synth_dir / "test.jsonl")[0])[:4])
    return path


def train_five_steps(pairs_file, out, settings):
    """Train 5 full-batch steps; return each step's (loss, policy, reference, TRL's reference,
    completion mask) -- policy and reference scored apart from TRL -- and the trainer's log."""
    cfg = make_config(pairs_file, out, ["train.stage=dpo", "train.max_steps=5", "train.batch_size=4",
                                        "train.lr.lm=3e-3", "train.lr.projector=3e-3", f"dpo.beta={BETA}", *settings])
    set_seed(cfg.train.seed)  # as a run starts (stage.begin): the same starting weights whatever ran before
    records = read_preferences(pairs_file)[0]
    model, processor, rates = prepare_model(cfg, records, None, log=lambda *a: None)
    pairs = PreferenceDataset(records, processor, max_length=1024)
    starting = copy.deepcopy(model).eval()
    trainer = build_trainer(cfg, model, processor, rates, pairs, out / "data")
    steps, compute_loss = [], trainer.compute_loss

    def checked(model, inputs, return_outputs=False, num_items_in_batch=None):
        assert "pixel_values" in inputs  # the images reach the model
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            model.eval()
            policy = pair_logps(model, inputs)
            model.train()
            reference = pair_logps(starting, inputs)
        theirs = torch.stack([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=1)
        steps.append((loss.detach(), policy, reference, theirs, inputs["completion_mask"]))
        return loss

    trainer.compute_loss = checked
    trainer.train()
    return steps, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_trl_sigmoid_loss_of_each_step_equals_the_formula_on_vlmkit_log_probs(pairs_file, tmp_path):
    steps, logged = train_five_steps(pairs_file, tmp_path / "run", [])
    assert len(steps) == 5
    for loss, policy, reference, theirs, _ in steps:
        assert torch.allclose(theirs, reference, atol=1e-4)  # TRL's precomputed reference is the starting model's
        ratios = policy - reference
        # TRL's `loss_type="sigmoid"`: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs
        expected = -F.logsigmoid(BETA * (ratios[:, 0] - ratios[:, 1])).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    losses = [loss.item() for loss, *_ in steps]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)  # policy == reference
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # one batch: every step helps
    # TRL's own metrics, logged each step: the chosen reply's reward climbs from 0, the margin with it.
    chosen, margins = [e["rewards/chosen"] for e in logged], [e["rewards/margins"] for e in logged]
    assert chosen[0] == pytest.approx(0.0, abs=1e-5) and chosen[-1] > 0.0, chosen
    assert margins[-1] > margins[0], margins
    final_ratios = steps[-1][1] - steps[-1][2]
    assert logged[-1]["rewards/chosen"] == pytest.approx(BETA * final_ratios[:, 0].mean().item(), abs=1e-4)


def test_trl_ipo_loss_trains_through_the_same_seams(pairs_file, tmp_path):
    steps, _ = train_five_steps(pairs_file, tmp_path / "run", ["dpo.loss_type=ipo"])
    for loss, policy, reference, _, completion_mask in steps:
        # TRL's `loss_type="ipo"`: the log-ratios averaged over each reply's tokens, squared distance to 1/(2 beta)
        tokens = torch.stack(completion_mask.sum(dim=1).chunk(2), dim=1).float()
        ratios = (policy - reference) / tokens
        expected = ((ratios[:, 0] - ratios[:, 1] - 1 / (2 * BETA)) ** 2).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    losses = [loss.item() for loss, *_ in steps]
    assert losses[0] == pytest.approx(1 / (4 * BETA**2), rel=1e-5)  # no sigmoid loss starts there
    assert losses[-1] < losses[0], losses


def test_sequence_log_probs_sum_the_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, -100, 1, -100]])
    expected = []
    for row in range(2):
        log_probs = logits[row].log_softmax(-1)
        expected.append(sum(log_probs[t - 1, labels[row, t]] for t in range(1, 5) if labels[row, t] != -100))
    assert torch.allclose(sequence_logps(logits, labels), torch.stack(expected), atol=1e-6)

"""The demo's SFT length: the steps that fit in what is left of its time budget."""

from vlmkit.demo import RESERVE_STEPS, SFT_STEP_COST, SFT_STEPS, sft_steps_within


def test_sft_gets_the_steps_that_fit_in_the_budget_at_the_align_stages_speed():
    align = {"train_seconds": 70.0, "steps": 700}  # 0.1 s a step
    steps = sft_steps_within(500.0, align)
    spent = steps * SFT_STEP_COST * 0.1 + RESERVE_STEPS * 0.1
    assert 500.0 - 0.15 < spent <= 500.0  # fills the budget, to within one step
    assert sft_steps_within(500.0, {"train_seconds": 35.0, "steps": 700}) > 2 * steps - 2  # twice as fast a machine


def test_sft_steps_stay_within_their_range():
    align = {"train_seconds": 70.0, "steps": 700}
    assert sft_steps_within(10.0, align) == SFT_STEPS[0]  # the budget is already spent: the minimum
    assert sft_steps_within(10**6, align) == SFT_STEPS[1]

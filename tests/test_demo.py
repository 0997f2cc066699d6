"""The demo's SFT length: what is left of its time budget, less a reserve for evaluation."""

from vlmkit.demo import MIN_SFT_SECONDS, RESERVE_SECONDS, sft_seconds


def test_sft_trains_for_what_is_left_of_the_budget():
    assert sft_seconds(600.0) == 600.0 - RESERVE_SECONDS
    assert sft_seconds(10.0) == MIN_SFT_SECONDS  # the budget is already spent: the minimum

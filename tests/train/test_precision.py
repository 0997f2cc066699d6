"""`train.bf16`: true, false or "auto" (bf16 autocast where this machine multiplies bf16 faster)."""

import pytest
import torch

from vlmkit.config import TrainConfig, load_config
from vlmkit.errors import ConfigError
from vlmkit.train import distributed, precision


@pytest.fixture(autouse=True)
def fresh_decisions():
    precision.bf16_enabled.cache_clear()
    yield
    precision.bf16_enabled.cache_clear()


def test_true_and_false_are_taken_as_they_are(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("nothing to measure"))
    assert precision.bf16_enabled(True) is True and precision.bf16_enabled(False) is False


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="the CPU's rule")
@pytest.mark.parametrize("speedup, expected", [(1.0, False), (0.05, False), (1.49, False), (1.5, True), (4.2, True)])
def test_auto_on_a_cpu_takes_bf16_only_where_its_products_are_clearly_faster(monkeypatch, capsys, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.bf16_enabled("auto") is expected
    assert precision.bf16_enabled("auto") is expected  # decided once ...
    said = capsys.readouterr().out
    assert said.count("train.bf16=auto") == 1 and f"{speedup:.1f}x" in said  # ... and said once, with why
    # The Trainer refuses bf16 without a GPU unless told to use the CPU.
    assert distributed.use_cpu(TrainConfig(bf16="auto")) is expected


def test_the_measured_speedup_is_a_positive_ratio():
    assert precision.cpu_bf16_speedup() > 0


@pytest.mark.parametrize("value", ["yes-please", "AUTO", 1])
def test_other_values_are_refused_with_the_field_named(value):
    with pytest.raises(ConfigError, match="train.bf16 must be true, false or 'auto'"):
        distributed.check(TrainConfig(bf16=value))


def test_auto_reads_from_yaml_and_overrides():
    assert load_config(None, ["train.bf16=auto"]).train.bf16 == "auto"
    assert load_config(None, ["train.bf16=true"]).train.bf16 is True

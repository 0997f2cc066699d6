"""`train.bf16`: true, false or "auto" (bf16 autocast where this machine multiplies bf16 faster)."""

import pytest
import torch

from vlmkit.config import TrainConfig, load_config
from vlmkit.errors import ConfigError
from vlmkit.train import precision
from vlmkit.train.trainer import training_arguments

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="the CPU's rule")


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    precision._auto.cache_clear()
    yield
    precision._auto.cache_clear()


def test_true_and_false_are_taken_as_they_are(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("nothing to measure"))
    assert precision.bf16_enabled(True) is True and precision.bf16_enabled(False) is False


@CPU_ONLY
@pytest.mark.parametrize("speedup, expected", [(1.0, False), (0.05, False), (1.49, False), (1.5, True), (4.2, True)])
def test_auto_on_a_cpu_takes_bf16_only_where_its_products_are_clearly_faster(monkeypatch, capsys, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    assert precision.bf16_enabled("auto") is expected
    assert precision.bf16_enabled("auto") is expected  # decided once ...
    said = capsys.readouterr().out
    assert said.count("train.bf16=auto") == 1  # ... and said once, with the measured ratio
    assert f"autocast {'on' if expected else 'off'} (a bf16 matrix product ran {speedup:.2f}x" in said


@CPU_ONLY
@pytest.mark.parametrize("speedup", [1.0, 4.2])
def test_the_trainer_gets_the_decision_and_is_told_to_use_the_cpu_for_bf16(monkeypatch, tmp_path, speedup):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    cfg = load_config(None, ["train.bf16=auto", f"train.output_dir={tmp_path}", "train.report_to=[]"])
    args = training_arguments(cfg, cfg.train.learning_rates(), has_eval=False)
    assert args.bf16 is (speedup > 1.5)
    # The Trainer refuses bf16 without a GPU unless told to use the CPU.
    assert args.use_cpu is (speedup > 1.5)


@CPU_ONLY
def test_auto_stays_in_float32_when_several_cpu_processes_would_each_decide(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("no process times alone"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert precision.bf16_enabled("auto") is False
    assert "several CPU processes" in capsys.readouterr().out


@pytest.mark.parametrize("native, expected", [(True, True), (False, False)])
def test_auto_on_a_gpu_takes_bf16_where_it_is_native(monkeypatch, native, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return native or including_emulation  # an older GPU: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert precision.bf16_enabled("auto") is expected
    assert asked == {"including_emulation": False}


@pytest.mark.parametrize("value", ["yes-please", "AUTO", 1])
def test_other_values_are_refused_with_the_field_named(value):
    with pytest.raises(ConfigError, match="train.bf16 must be true, false or 'auto'"):
        precision.check(TrainConfig(bf16=value).bf16)


def test_auto_reads_from_yaml_and_overrides():
    assert load_config(None, ["train.bf16=auto"]).train.bf16 == "auto"
    assert load_config(None, ["train.bf16=true"]).train.bf16 is True

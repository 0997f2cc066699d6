"""The training progress bar: loss, learning rate, token throughput and MFU from the Trainer's logs."""

import time
from types import SimpleNamespace

from vlmkit.train.progress import ProgressBar


def test_throughput_is_shown_and_the_final_summary_log_does_not_zero_it():
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0, num_input_tokens_seen=0,
                            total_flos=0.0)
    args = SimpleNamespace(world_size=2)
    bar = ProgressBar(peak_flops=1e9)
    bar.on_train_begin(args, state, None)
    started = time.perf_counter()
    time.sleep(0.01)
    state.global_step, state.num_input_tokens_seen, state.total_flos = 5, 5000, 1e7
    bar.on_log(args, state, None, logs={"loss": 1.25, "learning_rate": 1e-3})
    elapsed = time.perf_counter() - started
    shown = bar.bar.postfix
    assert "loss=1.2500" in shown and "lr=1.00e-03" in shown
    rate = float(shown.split("tok/s=")[1].split(", ")[0].replace(",", ""))
    assert 5000 / elapsed <= rate <= 5000 / 0.01
    # 1e7 FLOPs in about 0.01 s over two processes of 1e9 FLOP/s each: at most 50%.
    utilisation = float(shown.split("MFU=")[1].split("%")[0]) / 100
    assert 1e7 / elapsed / 2e9 * 0.99 <= utilisation <= 0.5

    # The Trainer's last log (train_runtime, ...) comes with no new tokens.
    bar.on_log(args, state, None, logs={"train_runtime": 1.0})
    assert f"tok/s={rate:,.0f}" in bar.bar.postfix
    bar.on_train_end(args, state, None)
    assert bar.bar is None


def test_a_run_counts_its_training_flops_per_token_and_reports_its_mfu(synth_dir, tmp_path):
    import json

    from tests.train.helpers import make_config, quiet, run_module
    from vlmkit.train.mfu import flops_per_token

    out = tmp_path / "run"
    run_module.run(make_config(synth_dir, out, max_steps=3), log=quiet)
    metrics = json.loads((out / "train_summary.json").read_text())["metrics"]
    from vlmkit.serve.generation import load_for_inference

    model, _ = load_for_inference(out)
    lm = model.language_model.num_parameters(exclude_embeddings=True)
    counted = lm + sum(p.numel() for p in model.projector.parameters())
    model.requires_grad_(True)
    assert flops_per_token(model) == 6 * counted  # everything trained: PaLM's 6 per parameter
    model.language_model.requires_grad_(False)
    assert flops_per_token(model) == 6 * counted - 2 * lm  # a frozen LM's weights get no gradient
    per_token = 6 * counted  # the run above trained every module
    assert metrics["total_flos"] > 0 and metrics["total_flos"] % per_token == 0  # whole tokens, nothing else
    assert 0 < metrics["mfu"] < 1


def test_a_peak_measured_low_at_the_start_is_measured_again_once_a_step_outruns_it(monkeypatch):
    from vlmkit.train import mfu

    probes = iter([1e6, 4e9])  # the start-up probe under load, then the idle machine's
    monkeypatch.setattr(mfu, "measured_peak", lambda dtype, device: next(probes))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0, num_input_tokens_seen=0,
                            total_flos=0.0)
    args = SimpleNamespace(world_size=1, bf16=False, device="cpu")
    bar = ProgressBar()
    bar.on_train_begin(args, state, None)
    assert bar.peak_flops == 1e6
    time.sleep(0.01)
    state.global_step, state.num_input_tokens_seen, state.total_flos = 5, 5000, 1e7  # at least 1e9 FLOP/s shown
    bar.on_log(args, state, None, logs={"loss": 1.0})
    assert bar.peak_flops == 4e9
    utilisation = float(bar.bar.postfix.split("MFU=")[1].split("%")[0]) / 100
    assert 0 < utilisation <= 1e7 / 0.01 / 4e9
    # A peak the user gave is theirs: never replaced.
    given = ProgressBar(peak_flops=1e6)
    given.on_train_begin(args, SimpleNamespace(**{**vars(state), "total_flos": 0.0, "num_input_tokens_seen": 0}), None)
    given.check_peak(1e9, args)
    assert given.peak_flops == 1e6
    bar.on_train_end(args, state, None)
    given.on_train_end(args, state, None)

"""Checkpoints are written atomically, and resuming skips one that is incomplete.

A kill while `checkpoint-N` was written used to leave it at its final path, half written, and every
later `--resume` failed on it. Now the Trainer writes into a staging folder renamed when complete;
`last_checkpoint` skips, with a warning, a `checkpoint-N` that is incomplete anyway (written in
place by an older vlmkit, or emptied by a power loss).
"""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TEST_TEXT, TEST_VISION, tiny_model_config
from vlmkit.config import load_config
from vlmkit.train.trainer import STAGING, VLMTrainer, checkpoint_problem, last_checkpoint

run_module = importlib.import_module("vlmkit.train.run")
SETTINGS = {"max_steps": 6, "save_steps": 3, "batch_size": 2}


class Killed(Exception):
    pass


def make_config(synth_dir, out, **train):
    cfg = load_config(None, ["train.report_to=[]", "train.warmup=0", "train.logging_steps=1"])
    cfg.data.train = str(synth_dir / "train.jsonl")
    cfg.train.output_dir = str(out)
    cfg.model = tiny_model_config()
    for key, value in (SETTINGS | train).items():
        setattr(cfg.train, key, value)
    return cfg


def quiet(*args, **kwargs):
    pass


@pytest.fixture
def trainers(monkeypatch):
    """The trainers `run` builds (`made`), in order; a save at a step in `kill_at` stops halfway through."""
    rec = SimpleNamespace(made=[], kill_at=set())

    class Trainer(VLMTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rec.made.append(self)

        def _save_rng_state(self, output_dir):  # the Trainer writes weights and optimizer before, its state after
            if self.state.global_step in rec.kill_at:
                raise Killed(f"killed while writing {output_dir}")
            super()._save_rng_state(output_dir)

    monkeypatch.setattr(run_module, "VLMTrainer", Trainer)
    return rec


def test_a_save_stopped_midway_leaves_no_checkpoint_and_the_resume_is_exact(synth_dir, tmp_path, trainers):
    run_module.run(make_config(synth_dir, tmp_path / "A"), log=quiet)
    unbroken = trainers.made[-1].model.state_dict()

    trainers.kill_at.add(6)
    with pytest.raises(Killed):
        run_module.run(make_config(synth_dir, tmp_path / "B"), log=quiet)
    out = tmp_path / "B"
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-6").exists()  # the half-written one stayed in its staging folder
    assert (out / f"{STAGING}checkpoint-6" / "checkpoint-6" / "optimizer.pt").is_file()
    assert last_checkpoint(out) == str(out / "checkpoint-3")

    trainers.kill_at.clear()
    run_module.run(make_config(synth_dir, out, resume=True), log=quiet)
    resumed = trainers.made[-1]
    assert resumed.state.global_step == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-6"]
    for name, weight in unbroken.items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_a_save_replaces_a_folder_of_its_step_and_clears_staging_leftovers(synth_dir, tmp_path, trainers):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)  # incomplete, as an older vlmkit left it when killed
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    (out / f"{STAGING}checkpoint-9" / "checkpoint-9").mkdir(parents=True)  # a save killed before the rename
    run_module.run(make_config(synth_dir, out, max_steps=3), log=quiet)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert checkpoint_problem(out / "checkpoint-3") is None
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def write_checkpoint(folder, step: int, files: dict[str, bytes], state: bool = True):
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_resume_skips_incomplete_checkpoints_with_a_warning_naming_each(tmp_path):
    full = {"model.safetensors": b"w" * 10, "optimizer.pt": b"o" * 10, "rng_state.pth": b"r" * 10}
    write_checkpoint(tmp_path / "checkpoint-2", 2, full)
    write_checkpoint(tmp_path / "checkpoint-10", 10, full)
    # What kills at the worst moment used to leave: empty files and no trainer state ...
    write_checkpoint(tmp_path / "checkpoint-40", 40, full | {"optimizer.pt": b"", "rng_state.pth": b""}, state=False)
    # ... a state file cut short, and files emptied by a power loss after the rename.
    write_checkpoint(tmp_path / "checkpoint-30", 30, full)
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text('{"global_st')
    write_checkpoint(tmp_path / "checkpoint-20", 20, full | {"processor_config.json": b""})
    write_checkpoint(tmp_path / f"{STAGING}checkpoint-50" / "checkpoint-50", 50, full)  # a staging folder
    (tmp_path / "checkpoint-99.txt").write_text("not a folder")

    warnings = []
    assert last_checkpoint(tmp_path, log=warnings.append) == str(tmp_path / "checkpoint-10")
    assert len(warnings) == 3
    for warning, (step, problem) in zip(warnings, [(40, "no trainer_state.json"), (30, "trainer_state.json is "
                                        "unreadable"), (20, "empty file(s): processor_config.json")]):
        assert warning.startswith(f"warning: skipping the incomplete checkpoint {tmp_path / f'checkpoint-{step}'} ")
        assert problem in warning

    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}" / "rng_state.pth").write_bytes(b"")
    assert last_checkpoint(tmp_path, log=quiet) is None
    assert last_checkpoint(tmp_path / "no-such-folder", log=quiet) is None


# --- kill -9 of a real `vlmkit train`, aimed at a checkpoint write -----------------------------------


def _train_args(data, out, *extra):
    return [sys.executable, "-m", "vlmkit", "train", "--train-data", str(data), "--output-dir", str(out),
            "--max-steps", "8", "--set", f"model.vision_config={json.dumps(TEST_VISION)}",
            f"model.text_config={json.dumps(TEST_TEXT)}", "model.vocab_size=400", "model.vision=null",
            "model.lm=null", "model.image_size=null", "lora.enabled=false", "train.batch_size=2", "train.save_steps=1", "train.save_total_limit=2",
            "train.warmup=0", "train.report_to=[]", "data.num_workers=0", *extra]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def uninterrupted(synth_dir, tmp_path_factory):
    """The weights of the run no kill touches, and how long it took from start to end."""
    out = tmp_path_factory.mktemp("uninterrupted")
    started = time.monotonic()
    subprocess.run(_train_args(synth_dir / "train.jsonl", out), check=True, env=ENV, capture_output=True, timeout=600)
    return load_file(out / "model.safetensors"), time.monotonic() - started


def _kill(process, out, aimed: bool, delay: float) -> None:
    """SIGKILL `process` the moment a checkpoint is being written after the first one (`aimed`),
    or `delay` seconds after it started; it may also have finished first."""
    deadline = time.monotonic() + (600 if aimed else delay)
    while process.poll() is None and time.monotonic() < deadline:
        names = [p.name for p in out.iterdir()] if aimed and out.is_dir() else []
        if any(n.startswith(STAGING) for n in names) and any(n.startswith("checkpoint-") for n in names):
            break
        time.sleep(0.0005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_kill_9_then_resume_ends_bitwise_equal(synth_dir, tmp_path, uninterrupted, trial):
    """Twenty kills of a real `vlmkit train`: the first ten aimed inside a checkpoint write, the
    others at a random moment of the run (start-up included); every `--resume` ends equal."""
    expected, seconds = uninterrupted
    aimed = trial < 10
    data, out = synth_dir / "train.jsonl", tmp_path / "run"
    process = subprocess.Popen(_train_args(data, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _kill(process, out, aimed, random.Random(trial).uniform(0.2, 1.1) * seconds)
    finally:
        if process.poll() is None:
            process.kill()
    if aimed:
        assert process.returncode == -signal.SIGKILL, "the run ended before a checkpoint write could be interrupted"
        assert not (out / "model.safetensors").exists()
    if out.is_dir():
        assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))  # only complete ones, if any

    resumed = subprocess.run(_train_args(data, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.name.startswith(STAGING) for p in out.iterdir())
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_weights(synth_dir, tmp_path):
    out = tmp_path / "run"
    run_module.run(make_config(synth_dir, out), log=quiet)
    finished = load_file(str(out / "model.safetensors"))
    assert not (out / "training_args.bin").exists()  # the model folder holds no pickle
    said = []
    run_module.run(make_config(synth_dir, out, resume=True), log=said.append)
    assert any("last step (6) of a finished run" in line for line in said)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6  # not 7, as transformers' loop did
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(finished[name], again[name]) for name in finished)
    # Asked for more steps, the same resume trains on.
    run_module.run(make_config(synth_dir, out, resume=True, max_steps=8), log=quiet)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 8


def test_resume_does_not_warn_about_the_tied_lm_head(synth_dir, tmp_path, caplog):
    out = tmp_path / "run"
    run_module.run(make_config(synth_dir, out, max_steps=4), log=quiet)
    with caplog.at_level("WARNING"):
        run_module.run(make_config(synth_dir, out, max_steps=6, resume=True), log=quiet)
    assert "missing keys" not in caplog.text


def test_a_finished_run_resumed_with_more_epochs_trains_on(synth_dir, tmp_path):
    out = tmp_path / "run"
    run_module.run(make_config(synth_dir, out, max_steps=-1, epochs=1.0, save_steps=4), log=quiet)
    one = json.loads((out / "train_summary.json").read_text())["steps"]
    run_module.run(make_config(synth_dir, out, max_steps=-1, epochs=2.0, save_steps=4, resume=True), log=quiet)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2 * one

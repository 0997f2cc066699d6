"""DDP from the ordinary command: `torchrun --nproc_per_node 2 -m vlmkit train ...` on this CPU (gloo).

Multi-process, so marked slow (`make test-slow`). Each process uses one thread.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.finetune.helpers import losses, vlmkit, write_config

pytestmark = pytest.mark.slow


def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(synth_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", str(synth_dir / "train.jsonl"), max_steps=5, save_steps=5)
    vlmkit(["train", str(config), "--output-dir", str(tmp_path / "two"), "--set", "train.batch_size=2"], processes=2)
    vlmkit(["train", str(config), "--output-dir", str(tmp_path / "one"), "--set", "train.batch_size=4"])

    two, one = losses(tmp_path / "two" / "checkpoint-5"), losses(tmp_path / "one" / "checkpoint-5")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]
    worst = max(abs(two[step] - one[step]) for step in one)
    print(f"DDP 2 x 2 vs 1 x 4: max loss difference over 5 steps {worst:.2e}")
    assert worst < 1e-5
    assert one[5] < one[1] - 0.05  # the curve is a real one: training moved it

    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _text_only(source: Path, target: Path, n: int) -> Path:
    """`n` records without images: the first user turn of caption records, their markers removed."""
    lines = []
    for i, line in enumerate(source.read_text().splitlines()[:n]):
        record = json.loads(line)
        turns = [{**t, "content": t["content"].replace("<image>\n", "")} for t in record["conversations"]]
        lines.append(json.dumps({"id": f"text-{i}", "conversations": turns}))
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.mark.parametrize("checkpointing", [False, True])
def test_text_only_batches_on_one_process_and_images_on_the_other_do_not_hang(synth_dir, tmp_path, checkpointing):
    text = _text_only(synth_dir / "captions.jsonl", tmp_path / "text.jsonl", 16)
    config = write_config(tmp_path / "run.yaml", [str(synth_dir / "val.jsonl"), str(text)], max_steps=6,
                          save_steps=6, batch_size=1, gradient_checkpointing=checkpointing)
    vlmkit(["train", str(config), "--output-dir", str(tmp_path / "mixed")], processes=2, timeout=120)
    assert sorted(losses(tmp_path / "mixed" / "checkpoint-6")) == [1, 2, 3, 4, 5, 6]


def test_a_two_process_run_resumes_on_one_process(synth_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", str(synth_dir / "train.jsonl"), save_steps=3, batch_size=2)
    out = str(tmp_path / "run")
    vlmkit(["train", str(config), "--output-dir", out, "--max-steps", "3"], processes=2)
    vlmkit(["train", str(config), "--output-dir", out, "--max-steps", "6", "--resume"])
    before, after = losses(tmp_path / "run" / "checkpoint-3"), losses(tmp_path / "run" / "checkpoint-6")
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert all(after[step] == before[step] for step in (1, 2, 3))  # steps 1-3 came from the 2-process run
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["steps"] == 6


def test_lora_dpo_on_two_processes(synth_dir, tmp_path):
    from vlmkit.data.preferences import make_preferences, write_preferences
    from vlmkit.data.records import read_records

    pairs = tmp_path / "pairs.jsonl"
    write_preferences(pairs, make_preferences(read_records(synth_dir / "test.jsonl")[0]))
    config = write_config(tmp_path / "run.yaml", str(pairs), max_steps=3, save_steps=3, batch_size=2,
                          lr={"lm": 1e-3, "projector": 1e-3})
    out = tmp_path / "dpo"
    vlmkit(["dpo", str(config), "--output-dir", str(out), "--set", "lora.enabled=true"], processes=2)
    assert (out / "adapter_config.json").is_file() and (out / "base" / "config.json").is_file()
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "rewards/margins" in e] == [1, 2, 3]

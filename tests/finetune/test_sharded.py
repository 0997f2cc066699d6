"""FSDP and DeepSpeed ZeRO-1, 2 and 3 on two CPU processes: a few steps, a checkpoint, a resume.

Slow (`make test-slow`). The DeepSpeed run needs `pip install 'vlmkit[finetune]'`, and its
first run on a machine compiles DeepSpeed's shared-memory communication op (a few minutes).
"""

import json
from importlib import resources

import pytest

from tests.finetune.helpers import losses, vlmkit, write_config
from vlmkit.model.modeling import VLMForConditionalGeneration

pytestmark = pytest.mark.slow
CONFIGS = resources.files("vlmkit") / "configs"


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"])
def test_sharded_training_runs_checkpoints_and_resumes(synth_dir, tmp_path, engine):
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        settings = {"deepspeed": str(CONFIGS / f"{engine}.json")}
    else:
        import yaml

        settings = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["train"]
    config = write_config(tmp_path / "run.yaml", str(synth_dir / "train.jsonl"), save_steps=3, batch_size=2,
                          **settings)
    out = tmp_path / "run"
    vlmkit(["train", str(config), "--output-dir", str(out), "--max-steps", "3"], processes=2, timeout=540)
    vlmkit(["train", str(config), "--output-dir", str(out), "--max-steps", "5", "--resume", "--set",
            "train.save_steps=5"], processes=2, timeout=300)

    first, resumed = losses(out / "checkpoint-3"), losses(out / "checkpoint-5")
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert all(resumed[step] == first[step] for step in (1, 2, 3))  # steps 1-3 were not run again
    assert resumed[5] < resumed[1]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 5
    model = VLMForConditionalGeneration.from_pretrained(out)  # the whole model was gathered and saved
    assert sum(p.numel() for p in model.parameters()) > 50_000

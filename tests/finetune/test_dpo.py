"""DPO end to end on the built-in preference set, and the preference records' checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TEST_TEXT, TEST_VISION
from tests.finetune.helpers import make_config
from vlmkit.cli import main
from vlmkit.data.preferences import make_preferences, read_preferences, write_preferences
from vlmkit.data.records import Record
from vlmkit.errors import DataError
from vlmkit.train.dpo import PairCollator, PreferenceDataset, preference_accuracy, score_pairs
from vlmkit.train.dpo_run import run_dpo
from vlmkit.train.lora import load


@pytest.fixture(scope="module")
def question_dir(tmp_path_factory):
    """Built-in single-question splits, large enough for every category to have several answers."""
    from vlmkit.data.synth import synth

    out = tmp_path_factory.mktemp("questions")
    synth(out, seed=1, sizes={"train": 0, "captions": 0, "val": 32, "test": 48, "compositional": 0}, image_size=32,
          workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def preference_files(question_dir, tmp_path_factory):
    """The built-in preference set: pairs from the test split to train on, from the val split held out."""
    from vlmkit.data.records import read_records

    out = tmp_path_factory.mktemp("preferences")
    for split, name in (("test", "train"), ("val", "eval")):
        write_preferences(out / f"{name}.jsonl", make_preferences(read_records(question_dir / f"{split}.jsonl")[0]))
    return out / "train.jsonl", out / "eval.jsonl"


def test_built_in_pairs_prefer_the_correct_answer_to_another_of_its_category(question_dir, preference_files):
    from vlmkit.data.records import read_records

    source = {r.id: r for r in read_records(question_dir / "test.jsonl")[0]}
    pairs, _ = read_preferences(preference_files[0])
    assert len(pairs) >= 40  # only a category whose records share one answer has no wrong answer to offer
    answers_by_category = {}
    for r in source.values():
        answers_by_category.setdefault(r.category, set()).add(r.conversations[-1]["content"])
    for pair in pairs:
        original = source[pair.id]
        assert pair.extra["chosen"] == original.conversations[-1]["content"] == pair.conversations[-1]["content"]
        assert pair.extra["rejected"] != pair.extra["chosen"]
        assert pair.extra["rejected"] in answers_by_category[original.category]
        assert [Path(p).resolve() for p in pair.images] == [Path(p).resolve() for p in original.images]


def test_pairs_supervise_only_the_final_reply(tiny, tmp_path):
    record = Record("p", [], [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"},
                              {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "blue"}],
                    extra={"chosen": "blue", "rejected": "green"})
    dataset = PreferenceDataset([record], tiny.processor, max_length=256)
    batch = PairCollator(dataset)([dataset[0]])
    decode = tiny.processor.tokenizer.decode
    chosen, rejected = (decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["completion_mask"]))
    assert chosen.startswith("blue") and rejected.startswith("green")  # "red" (an earlier turn) is prompt
    assert "red" not in chosen


@pytest.mark.parametrize(
    "change, message",
    [(lambda r: r.pop("rejected"), "field 'rejected' is missing"),
     (lambda r: r.update(chosen=""), "field 'chosen' is missing or empty"),
     (lambda r: r["conversations"].append({"role": "assistant", "content": "x"}), "must end with a user turn")],
)
def test_bad_preference_records_stop_dpo_before_training(preference_files, tmp_path, change, message):
    lines = preference_files[0].read_text().splitlines()
    bad = json.loads(lines[2])
    change(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    cfg = make_config(broken, tmp_path / "run", ["train.stage=dpo"])
    with pytest.raises(DataError, match=rf"broken.jsonl:3 .*{message}"):
        run_dpo(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()  # stopped before anything was built or written


def test_dpo_on_the_built_in_pairs_end_to_end(preference_files, tmp_path):
    train, held_out = preference_files
    settings = ["train.stage=dpo", "train.max_steps=16", "train.batch_size=4", "train.lr.lm=1e-2",
                "train.lr.projector=1e-2", "dpo.beta=0.5"]
    cfg = make_config(train, tmp_path / "dpo", settings)
    cfg.data.eval = str(held_out)
    out = run_dpo(cfg, log=lambda *a: None)
    summary = json.loads((out / "train_summary.json").read_text())["metrics"]
    print({k: round(v, 3) for k, v in summary.items() if "accuracy" in k})
    # Telling a right answer from a wrong one needs the image, which a 16-step tiny model barely uses:
    # DPO moves the pairs the right way, but not far (the held-out figures are in docs/finetuning.md).
    assert summary["train_reward_accuracy_after"] > 0.55
    assert summary["train_preference_accuracy_after"] > summary["train_preference_accuracy_before"]
    assert {"eval_preference_accuracy_before", "eval_preference_accuracy_after"} <= summary.keys()

    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # policy == reference
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    # That chosen answers were pulled above rejected ones is checked on every training pair by
    # train_reward_accuracy_after above; the margins of the last few 4-pair batches were too
    # noisy to say it (they flipped sign when the tokenizer learned the chat roles).
    model, processor = load(out)  # the saved model scores the pairs as the trained one did
    pairs = PreferenceDataset(read_preferences(train)[0], processor, max_length=1024)
    scores = score_pairs(model, pairs)
    assert preference_accuracy(scores) == pytest.approx(summary["train_preference_accuracy_after"])


@pytest.fixture
def text_pairs(tmp_path):
    """Text-only pairs whose preference needs no vision."""
    lines = [json.dumps({"id": str(i), "conversations": [{"role": "user", "content": f"Is the sky green? ({i})"}],
                         "chosen": "No.", "rejected": "Yes, it is."}) for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl"


TEXT_SETTINGS = ["train.stage=dpo", "train.max_steps=6", "train.batch_size=4", "train.lr.lm=1e-2"]


@pytest.mark.parametrize("reference", [[], ["dpo.precompute_ref_log_probs=false"],
                                       ["dpo.precompute_ref_log_probs=false", "lora.enabled=true"]],
                         ids=["precomputed", "frozen-copy", "lora-adapter-copy"])
def test_dpo_learns_a_preference_the_model_can_express(text_pairs, tmp_path, reference):
    """DPO's implicit reward ranks every pair right, whichever way TRL gets the reference."""
    out = run_dpo(make_config(text_pairs, tmp_path / "dpo", TEXT_SETTINGS + reference), log=lambda *a: None)
    summary = json.loads((out / "train_summary.json").read_text())["metrics"]
    assert summary["train_reward_accuracy_after"] == 1.0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["log_history"][0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert not (out / "ref").exists()  # TRL's reference copy of LoRA adapters is not saved with the model


def test_a_resumed_dpo_run_trains_as_one_that_never_stopped(text_pairs, tmp_path):
    settings = TEXT_SETTINGS + ["train.save_steps=3", "train.save_total_limit=3"]
    out = run_dpo(make_config(text_pairs, tmp_path / "dpo", settings), log=lambda *a: None)
    whole = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    shutil.rmtree(out / "checkpoint-6")
    cfg = make_config(text_pairs, tmp_path / "dpo", settings + ["train.resume=true"])
    run_dpo(cfg, log=lambda *a: None)  # from checkpoint-3, TRL's reference log-probs read from the cache
    resumed = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["loss"] for e in resumed if "loss" in e] == [e["loss"] for e in whole if "loss" in e]
    assert len(list((out / "dpo_data").glob("cache-*.arrow"))) == 1


def test_the_dpo_command_runs_the_dpo_stage(preference_files, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"vision_config": TEST_VISION, "text_config": TEST_TEXT,
                                                "vocab_size": 400},
                                      "train": {"report_to": [], "batch_size": 2}}))
    few = preference_files[0].with_name("few.jsonl")  # beside the original, whose relative image paths it keeps
    few.write_text("".join(preference_files[0].read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "run"
    assert main(["dpo", str(config), "--train-data", str(few), "--output-dir", str(out), "--max-steps", "1"]) == 0
    assert "stage: dpo" in (out / "vlmkit_run.yaml").read_text()
    assert "train_preference_accuracy_after" in json.loads((out / "train_summary.json").read_text())["metrics"]

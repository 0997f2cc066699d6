"""`vlmkit eval`: answers are compared after normalisation, batching never changes an answer, and the
majority baseline takes each category's most common answer."""

from __future__ import annotations

import pytest
import torch

from vlmkit.data.records import Record, read_records
from vlmkit.eval.vqa import Question, answer_questions, normalise_answer, questions_of, score


@pytest.mark.parametrize("raw, expected", [
    ("The two red circles.", "2 red circles"),
    ("  An   apple!! ", "apple"),
    ("THREE", "3"),
    ("ten, eleven", "10 eleven"),  # only zero to ten are spelled as digits
    ("theory of another", "theory of another"),  # articles are whole words only
    ("a", ""),
])
def test_normalise_answer(raw, expected):
    assert normalise_answer(raw) == expected


def _question(n: int, category: str | None, answer: str) -> Question:
    conversation = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": answer}]
    return Question(Record(f"r{n}", ["x.png"], conversation, category), turn=1, prompt={})


def test_score_and_majority_baseline_per_category():
    # Each category's most common answer is right 2 times in 3; any one answer for all is right 2 times in 6.
    answers = [("colour", "red"), ("colour", "Red."), ("colour", "blue"), ("count", "3"), ("count", "three"),
               ("count", "blue")]
    questions = [_question(n, category, answer) for n, (category, answer) in enumerate(answers)]
    predictions = ["the red", "blue", "blue", "3", "4", "blue"]
    metrics, rows = score(questions, predictions)
    assert metrics["majority_baseline"] == pytest.approx(4 / 6)
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["n"] == 6
    assert metrics["by_category"] == pytest.approx({"colour": 2 / 3, "count": 2 / 3})
    assert [r["correct"] for r in rows] == [True, False, True, True, False, True]
    assert rows[0]["question"] == "What is it?" and rows[1]["answer"] == "Red."


def test_score_without_category_counts_as_one():
    metrics, _ = score([_question(0, None, "yes"), _question(1, None, "no"), _question(2, None, "yes")],
                       ["no", "no", "no"])
    assert metrics["by_category"] == {"all": pytest.approx(1 / 3)}
    assert metrics["majority_baseline"] == pytest.approx(2 / 3)


@pytest.fixture
def talkative(tiny):
    """The tiny model with large random LM weights: at the usual init its tied embeddings make it repeat
    the prompt's last token (a newline), so every answer would be empty and any two would agree."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in tiny.model.language_model.parameters():
            if weight.ndim == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return tiny.model.eval(), tiny.processor


def test_batched_answers_equal_one_by_one(talkative, synth_dir):
    """Prompts of different lengths share a batch (left-padded by the tokenizer); each answer is the one
    the model gives the prompt alone, token for token."""
    model, processor = talkative
    records, _ = read_records(synth_dir / "test.jsonl")
    questions = questions_of(records[:4], processor)
    assert len({len(q.prompt["input_ids"]) for q in questions}) > 2  # padding really happens
    alone = answer_questions(model, processor, questions, batch_size=1, max_new_tokens=6, progress=False)
    together = answer_questions(model, processor, questions, batch_size=len(questions), max_new_tokens=6,
                                progress=False)
    assert len({a for a in alone if a}) > 1  # the random model says different, non-empty things
    assert together == alone, (alone, together)

"""`vlmkit eval`: answer every assistant turn of a JSONL split and score normalised exact match.

Each assistant turn is one question: the model sees the conversation up to it (earlier turns
with their reference answers) and generates greedily. Scores come overall and per
`category`, next to the "majority baseline" (always give each category's most common
answer). `blind=True` replaces every image by a blank one of the same size -- a constant
image at the normaliser's mean, i.e. all-zero pixel values -- to show how much the answers
depend on the image.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.data.records import Record
from vlmkit.files import write_text_atomic
from vlmkit.model.generation import generate_batch
from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.processing.images import blank_like, open_image
from vlmkit.processing.processor import VLMProcessor

ARTICLES = re.compile(r"\b(a|an|the)\b")
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def normalise_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, spell numbers as digits, squeeze spaces (VQA-style)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    words = [NUMBERS.get(w, w) for w in ARTICLES.sub(" ", text).split()]
    return " ".join(words)


@dataclass
class Question:
    record: Record
    turn: int  # index of the assistant turn in the conversation
    prompt: dict  # input_ids (1-D) and crops_per_image

    @property
    def answer(self) -> str:
        return self.record.conversations[self.turn]["content"]


def questions_of(records: list[Record], processor: VLMProcessor) -> list[Question]:
    out = []
    for record in records:
        if record.video:
            raise record.error("`vlmkit eval` scores image records only; this one has a video")
        images = [open_image(p, decode=False) for p in record.images]
        crops = [processor.image_processor.plan(image.size) for image in images]
        for turn, message in enumerate(record.conversations):
            if message["role"] != "assistant":
                continue
            history = record.conversations[:turn]
            # Only the images whose markers are already in the prompt are given to the model.
            shown = sum(m["content"].count(IMAGE_MARKER) for m in history)
            ids = processor.encode_text(history, crops[:shown], add_generation_prompt=True)["input_ids"]
            out.append(Question(record, turn, {"input_ids": ids, "n_images": shown}))
    return out


@torch.no_grad()
def answer_questions(model, processor: VLMProcessor, questions: list[Question], blind: bool = False,
                     batch_size: int = 32, max_new_tokens: int = 16, progress: bool = True) -> list[str]:
    """Greedy answers, batched by similar prompt length (fewer pad tokens per batch)."""
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].prompt["input_ids"]))
    answers: list[str] = [""] * len(questions)
    for start in tqdm(range(0, len(order), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = [questions[i] for i in order[start:start + batch_size]]
        images = [open_image(path) for q in batch for path in q.record.images[: q.prompt["n_images"]]]
        if blind:
            images = [blank_like(image, processor.image_processor.image_mean) for image in images]
        texts = generate_batch(model, processor.tokenizer, [q.prompt["input_ids"] for q in batch], max_new_tokens,
                               processor.image_inputs(images))
        for i, text in zip(order[start:start + batch_size], texts):
            answers[i] = text.strip()
    return answers


def score(questions: list[Question], predictions: list[str]) -> tuple[dict, list[dict]]:
    """Metrics (accuracy, n, by_category, majority_baseline) and one prediction row per question."""
    by_category, rows = defaultdict(list), []
    answers_by_category = defaultdict(Counter)
    for q, prediction in zip(questions, predictions):
        correct = normalise_answer(prediction) == normalise_answer(q.answer)
        category = q.record.category or "all"
        by_category[category].append(correct)
        answers_by_category[category][normalise_answer(q.answer)] += 1
        question_text = q.record.conversations[q.turn - 1]["content"].replace(IMAGE_MARKER, "").strip()
        rows.append({"id": q.record.id, "turn": q.turn, "category": category, "question": question_text,
                     "answer": q.answer, "prediction": prediction, "correct": correct})
    n = len(questions)
    majority = sum(c.most_common(1)[0][1] for c in answers_by_category.values()) / n if n else 0.0
    metrics = {
        "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
        "n": n,
        "by_category": {k: sum(v) / len(v) for k, v in sorted(by_category.items())},
        "majority_baseline": majority,
    }
    return metrics, rows


def evaluate(model, processor: VLMProcessor, records: list[Record], blind: bool = False, batch_size: int = 32,
             max_new_tokens: int = 16, progress: bool = True) -> tuple[dict, list[dict]]:
    questions = questions_of(records, processor)
    predictions = answer_questions(model, processor, questions, blind, batch_size, max_new_tokens, progress)
    metrics, rows = score(questions, predictions)
    metrics["blind"] = blind
    return metrics, rows


def write_results(metrics: dict, rows: list[dict], metrics_path: Path) -> Path:
    """metrics.json and, beside it, metrics.predictions.jsonl; both written atomically."""
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    predictions_path = metrics_path.with_suffix(".predictions.jsonl")
    write_text_atomic(predictions_path, "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return predictions_path

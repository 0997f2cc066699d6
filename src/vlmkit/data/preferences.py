"""Preference records for DPO: reading and checking them, and making them from the built-in data.

One record per line:

    {"id": "...", "images": ["img/0001.png"],
     "conversations": [{"role": "user", "content": "<image>\\nWhat colour is the circle?"}],
     "chosen": "red", "rejected": "blue"}

`conversations` holds the prompt turns and ends with a user turn; `chosen` and `rejected`
are the two candidate replies. Each is checked like an ordinary record with the chosen
reply as its last turn, so images, markers and ids follow the same rules.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from vlmkit.data.records import Record, normalise, read_records
from vlmkit.errors import DataError

REPLIES = ("chosen", "rejected")


def normalise_preference(raw: dict, base_dir: Path, path: Path | str = "<memory>", line: int | None = None) -> Record:
    """A checked Record whose last turn is the chosen reply; `extra` keeps `chosen` and `rejected`."""
    record_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(raw, dict):
        raise DataError(f"expected a JSON object, got {type(raw).__name__}", path, line)
    for key in REPLIES:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"field {key!r} is missing or empty; a preference record needs 'chosen' and 'rejected' "
                            "replies (strings) after its prompt turns", path, line, record_id)
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        raise DataError("field 'conversations' must be a non-empty list of prompt turns", path, line, record_id)
    if turns[-1].get("role", turns[-1].get("from")) not in ("user", "human"):
        raise DataError("the prompt ('conversations') must end with a user turn; the replies are 'chosen' and "
                        "'rejected'", path, line, record_id)
    return normalise({**raw, "conversations": [*turns, {"role": "assistant", "content": raw["chosen"]}]},
                     base_dir, path, line)


def read_preferences(path: Path | str, skip_bad: bool = False) -> tuple[list[Record], list[DataError]]:
    """Every preference record of a JSONL file; like `read_records`, bad lines raise unless `skip_bad`."""
    return read_records(path, skip_bad, parse=normalise_preference, kind="preference records")


def make_preferences(records: list[Record], seed: int = 0) -> list[dict]:
    """Preference records from question records: the correct answer is chosen, another answer of the same
    category (taken from the other records) rejected. Only records with one question and a category count."""
    single = [r for r in records if r.category and sum(t["role"] == "user" for t in r.conversations) == 1]
    answers: dict[str, list[str]] = {}
    for record in single:
        answers.setdefault(record.category, [])
        if record.conversations[-1]["content"] not in answers[record.category]:
            answers[record.category].append(record.conversations[-1]["content"])
    rng = random.Random(seed)
    out = []
    for record in single:
        chosen = record.conversations[-1]["content"]
        wrong = [a for a in answers[record.category] if a != chosen]
        if not wrong:
            continue
        prompt = [t for t in record.conversations if t["role"] != "assistant"]
        out.append({"id": record.id, "images": record.images, "conversations": prompt, "chosen": chosen,
                    "rejected": rng.choice(wrong), "category": record.category})
    return out


def write_preferences(path: Path | str, preferences: list[dict]) -> None:
    """Write preference records as JSONL, image paths relative to the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    with path.open("w", encoding="utf-8") as handle:
        for p in preferences:
            images = [os.path.relpath(Path(i).resolve(), base) for i in p["images"]]
            handle.write(json.dumps({**p, "images": images}, ensure_ascii=False) + "\n")

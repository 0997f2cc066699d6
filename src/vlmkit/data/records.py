"""The conversation record format: reading, normalising and checking JSONL files.

One record per line:

    {"id": "...", "images": ["img/0001.png"],
     "conversations": [{"role": "user", "content": "<image>\\nWhat colour is the circle?"},
                       {"role": "assistant", "content": "red"}],
     "category": "colour"}

LLaVA's form (`"image"` plus `{"from": "human"|"gpt", "value": ...}` turns) is accepted too.
Image paths are resolved relative to the JSONL file. Each image has exactly one `<image>`
marker; a record with images but no markers gets them before its first user turn.

A record may also hold one video, `"video": "clips/0001.mp4"` (relative like images), with
exactly one `<video>` marker (added before the first user turn when missing, ahead of any
added image markers). At load time the marker becomes one `<image>` marker per sampled
frame (`vlmkit.processing.video`), so everything after the dataset sees only images.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlmkit.errors import DataError
from vlmkit.processing.markers import IMAGE_MARKER, VIDEO_MARKER

ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    """One training or evaluation example, normalised."""

    id: str
    images: list[str]
    conversations: list[dict]
    category: str | None = None
    path: str = ""  # where the record came from, for error messages
    line: int | None = None
    extra: dict = field(default_factory=dict)  # other fields, kept for later stages (e.g. DPO)
    video: str | None = None  # path of the record's one video, if any

    def error(self, problem: str) -> DataError:
        return DataError(problem, self.path, self.line, self.id)

    def to_json(self, relative_to: Path | None = None) -> dict:
        """The record as written to JSONL, image paths relative to `relative_to` when given."""
        images = [os.path.relpath(p, relative_to) if relative_to else p for p in self.images]
        out = {"id": self.id, "images": images, "conversations": self.conversations}
        if self.video is not None:
            out["video"] = os.path.relpath(self.video, relative_to) if relative_to else self.video
        if self.category is not None:
            out["category"] = self.category
        out.update(self.extra)
        return out


def count_markers(conversations: list[dict], marker: str = IMAGE_MARKER) -> int:
    return sum(turn["content"].count(marker) for turn in conversations)


def turn_order_problem(conversations: list[dict]) -> str | None:
    """What is wrong with the order of a record's turns, or None: an optional system turn first,
    then user and assistant by turns, ending on a non-empty assistant answer. Chat templates
    assume that order; a model trained on two user turns in a row learns a chat nobody has."""
    turns = conversations[1:] if conversations[0]["role"] == "system" else conversations
    for i, turn in enumerate(turns):
        index = i + len(conversations) - len(turns)
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return (f"conversations[{index}] has role {turn['role']!r} where {expected!r} belongs (after an "
                    "optional system turn, user and assistant take turns, starting with the user)")
        if expected == "assistant" and not turn["content"].strip():
            return f"conversations[{index}] is an empty assistant turn; give the answer, or drop the turn"
    if turns[-1]["role"] != "assistant":
        return "conversations ends on a user turn; it must end on the assistant's answer (what is learnt or scored)"
    return None


def normalise(raw: dict, base_dir: Path, path: Path | str = "<memory>", line: int | None = None) -> Record:
    """Turn one parsed JSON object into a checked Record, or raise DataError naming the problem."""

    def fail(problem: str):
        raise DataError(problem, path, line, raw.get("id") if isinstance(raw, dict) else None)

    if not isinstance(raw, dict):
        fail(f"expected a JSON object, got {type(raw).__name__}")
    record_id = raw.get("id", f"{Path(str(path)).stem}-{line}")
    if not isinstance(record_id, (str, int)):
        fail("field 'id' must be a string")

    images = raw.get("images", raw.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        fail("field 'images' must be a list of non-empty path strings")
    video = raw.get("video")
    if video is not None and not (isinstance(video, str) and video):
        fail("field 'video' must be one non-empty path string (a record holds at most one video)")
    given = [str(record_id), *images, video or ""]  # checked as text below, before base_dir joins them
    images = [str(p if Path(p).is_absolute() else base_dir / p) for p in images]
    video = str(video if Path(video).is_absolute() else base_dir / video) if video else None

    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        fail("field 'conversations' must be a non-empty list of turns")
    conversations = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            fail(f"conversations[{i}] must be an object with 'role' and 'content'")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = _LLAVA_ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            fail(f"conversations[{i}] has no valid role (use one of {', '.join(ROLES)}, or LLaVA's human/gpt)")
        if not isinstance(content, str):
            fail(f"conversations[{i}] ({role}) must have a string 'content'")
        conversations.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in conversations):
        fail("conversations has no assistant turn, so there is nothing to learn or score")
    if not any(t["role"] == "user" for t in conversations):
        fail("conversations has no user turn")
    problem = turn_order_problem(conversations)
    if problem:
        fail(problem)

    markers = count_markers(conversations)
    if markers == 0 and images:
        first_user = next(t for t in conversations if t["role"] == "user")
        first_user["content"] = (IMAGE_MARKER + "\n") * len(images) + first_user["content"]
    elif markers != len(images):
        fail(f"has {markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s); use one marker per image")
    video_markers = count_markers(conversations, VIDEO_MARKER)
    if video and video_markers == 0:
        first_user = next(t for t in conversations if t["role"] == "user")
        first_user["content"] = VIDEO_MARKER + "\n" + first_user["content"]
    elif video_markers != (1 if video else 0):
        fail(f"has {video_markers} {VIDEO_MARKER} marker(s) but {1 if video else 0} video(s); a record "
             f"with a 'video' field needs exactly one {VIDEO_MARKER} marker, one without needs none")

    category = raw.get("category")
    if category is not None and not isinstance(category, str):
        fail("field 'category' must be a string")
    if not all(_is_unicode(text) for text in [*given, category or "", *(t["content"] for t in conversations)]):
        fail("holds a lone surrogate escape (\\ud800-\\udfff), which is not text in any encoding; "
             "fix the tool that wrote the file")
    known = {"id", "images", "image", "video", "conversations", "category"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return Record(str(record_id), images, conversations, category, str(path), line, extra, video)


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows the escape): the tokenizer and the file
    system both refuse one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (line number, parsed object) for each non-blank line; a DataError in place of a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    with path.open("rb") as handle:  # bytes, decoded line by line: a bad byte spoils its line only
        for line_no, data in enumerate(handle, start=1):
            if not data.strip():
                continue
            try:
                item = parse_json_line(data.rstrip(b"\r\n"))
            except DataError as err:
                item = DataError(err.problem, path, line_no)
            yield line_no, item


def parse_json_line(data: bytes):
    """One line of UTF-8 JSON, parsed; every way it can fail is a DataError (without file or line)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 (byte 0x{data[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read") from None
    except ValueError:  # the one other failure: an integer over Python's limit on digits
        raise DataError(f"number too long to read (over {sys.get_int_max_str_digits()} digits)") from None


def read_records(path: Path | str, skip_bad: bool = False, parse=None,
                 kind: str = "records") -> tuple[list[Record], list[DataError]]:
    """Read and check every record of a JSONL file.

    Raises the first DataError unless `skip_bad`, in which case bad lines are left out and
    returned (so the caller can report how many were skipped). `parse(raw, base_dir, path,
    line)` turns one line into a Record (default `normalise`; preference data passes its own).
    """
    parse = parse or normalise
    path = Path(path)
    records, skipped, seen_ids = [], [], {}
    for line_no, item in iter_jsonl(path):
        try:
            if isinstance(item, DataError):
                raise item
            record = parse(item, path.parent, path, line_no)
            if record.id in seen_ids:
                raise DataError(f"duplicate id (first seen on line {seen_ids[record.id]})", path, line_no, record.id)
            seen_ids[record.id] = line_no
            records.append(record)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(err)
    if not records:
        raise DataError(f"no usable {kind}", path)
    return records, skipped


def read_record_files(paths: str | list[str], skip_bad: bool = False, reader=read_records):
    """Records of one JSONL or of several, concatenated in order (training shuffles them together)."""
    records, skipped = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        more, bad = reader(path, skip_bad=skip_bad)
        records += more
        skipped += bad
    return records, skipped


def prepare_all(items: list, prepare, skip_bad: bool,
                skipped: list[DataError] | None = None) -> tuple[list, list[DataError]]:
    """`prepare(item)` for each item (a record, or a record with what was made of it so far): the
    results, and the errors of the items skipped (with `skip_bad`; otherwise the first error is
    raised), added to `skipped` when an earlier pass gives its own. Raises if none is left."""
    prepared, skipped = [], [] if skipped is None else skipped
    for item in items:
        try:
            prepared.append(prepare(item))
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(err)
    if not prepared:
        raise DataError("no usable records left" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return prepared, skipped


def write_records(path: Path | str, records: list[Record]) -> None:
    """Write records as JSONL atomically (temporary file, then rename), image paths relative to the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(relative_to=path.parent.resolve()), ensure_ascii=False) + "\n")
    tmp.replace(path)

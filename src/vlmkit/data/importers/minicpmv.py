"""MiniCPM-V's fine-tuning JSON: a list of `{"id", "image", "conversations": [{"role", "content"}]}`.

`image` is one path (marked `<image>` in the text, or unmarked) or, for several images, a
mapping from named placeholders to paths, `{"<image_00>": "a.jpg", "<image_01>": "b.jpg"}`,
whose names appear in the turns. Named placeholders become `<image>` markers, and the
images are listed in the order their placeholders appear.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmkit.data.importers.source import field, load_json
from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.errors import DataError


def _named(item: dict, conversations: list[dict], source: Path, index: int) -> tuple[list[str], list[dict]]:
    """Images in placeholder order, and the turns with each named placeholder replaced by `<image>`."""
    names = item["image"]
    pattern = re.compile("|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)))
    found, turns = [], []
    for turn in conversations:
        content = turn.get("content", "")
        found += [m.group(0) for m in pattern.finditer(content)]
        turns.append({**turn, "content": pattern.sub(IMAGE_MARKER, content)})
    unused = [name for name in names if name not in found]
    if unused:
        raise DataError(f"image placeholder(s) {', '.join(unused)} never appear in the conversation", source,
                        index + 1, item.get("id"))
    return [names[name] for name in found], turns


def read(source: Path, images: Path, out_dir: Path) -> list[dict]:
    records = []
    for index, item in enumerate(load_json(source)):
        conversations = field(item, "conversations", source, index, list)
        image = item.get("image", [])
        if isinstance(image, dict):
            paths, conversations = _named(item, conversations, source, index)
        else:
            paths = [image] if isinstance(image, str) else image
        records.append({"id": str(item.get("id", f"minicpmv-{index}")), "images": paths,
                        "conversations": conversations})
    return records

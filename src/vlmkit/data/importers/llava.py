"""LLaVA's instruction JSON: a list of `{"id", "image", "conversations": [{"from", "value"}]}`.

`image` (absent for text-only samples, a list in some later releases) is relative to the
image folder given with `--images`. The turns and `<image>` markers are vlmkit's already.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.data.importers.source import field, load_json


def read(source: Path, images: Path, out_dir: Path) -> list[dict]:
    records = []
    for index, item in enumerate(load_json(source)):
        conversations = field(item, "conversations", source, index, list)
        image = item.get("image", [])
        images_of_item = [image] if isinstance(image, str) else image
        records.append({"id": str(item.get("id", f"llava-{index}")), "images": images_of_item,
                        "conversations": conversations})
    return records

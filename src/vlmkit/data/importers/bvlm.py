"""Basic-Visual-Language-Model's caption data: an image map and a captions file (both JSON).

- image map: `{key: {"path": "images/", "image_file": "0001.jpg", "ID": 17}}`; the image
  is `path + image_file`, relative to `--images`;
- captions (`--captions`): `{"17": {"q": "prompt", "a": ["caption", ...]}}`, keyed by ID;
  `a` may also be one string.

Each caption becomes one record (prompt -> caption) about its image; an empty prompt
becomes "Describe the image.".
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.data.importers.source import load_json
from vlmkit.errors import DataError

DEFAULT_PROMPT = "Describe the image."


def read(source: Path, images: Path, out_dir: Path, captions: Path | None = None) -> list[dict]:
    if captions is None:
        raise DataError("the bvlm format needs its captions file too: give --captions", source)
    image_map, texts = load_json(source, expect=dict), load_json(captions, expect=dict)
    records = []
    for line, (key, entry) in enumerate(image_map.items(), start=1):
        if not isinstance(entry, dict) or not all(k in entry for k in ("path", "image_file", "ID")):
            raise DataError(f"image map entry {key!r} needs 'path', 'image_file' and 'ID'", source, line)
        caption = texts.get(str(entry["ID"]))
        if not isinstance(caption, dict) or not caption.get("a"):
            raise DataError(f"no captions for ID {entry['ID']} (image map entry {key!r})", captions)
        answers = [caption["a"]] if isinstance(caption["a"], str) else caption["a"]
        prompt = caption.get("q") or DEFAULT_PROMPT
        for k, answer in enumerate(answers):
            records.append({"id": f"bvlm-{entry['ID']}-{k}", "images": [str(entry["path"]) + str(entry["image_file"])],
                            "conversations": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]})
    return records

"""minimind-v's data: JSONL with image file names, or parquet with the image bytes embedded.

- JSONL: one `{"conversations": [{"role", "content"}], "image": "a.jpg"}` per line, where
  `image` may name several files separated by commas; names are relative to `--images`.
- parquet: columns `conversations` (the same turns, as a list or a JSON string) and
  `image_bytes` (one encoded image or a list of them). The images are written to
  `images/` beside the output file, named after the record.

The turns mark images with `<image>`, as vlmkit does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmkit.data.importers.source import field
from vlmkit.data.records import iter_jsonl
from vlmkit.errors import DataError


def _from_jsonl(source: Path) -> list[dict]:
    records = []
    for index, (line, item) in enumerate(iter_jsonl(source)):
        if isinstance(item, DataError):
            raise item
        conversations = field(item, "conversations", source, line - 1, list)
        names = [name.strip() for name in item.get("image", "").split(",") if name.strip()]
        records.append({"id": str(item.get("id", f"minimind-{index}")), "images": names,
                        "conversations": conversations})
    return records


def _write_image(data: bytes, target: Path, source: Path, row: int) -> str:
    try:
        image_format = Image.open(io.BytesIO(data)).format or "PNG"
    except UnidentifiedImageError:
        raise DataError("image_bytes is not an image file's bytes", source, row + 1) from None
    path = target.with_suffix("." + image_format.lower().replace("jpeg", "jpg"))
    path.write_bytes(data)
    return str(path.resolve())


def _from_parquet(source: Path, out_dir: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install 'vlmkit[finetune]'", source) from None
    table = pq.read_table(source)
    missing = {"conversations", "image_bytes"} - set(table.column_names)
    if missing:
        raise DataError(f"parquet has no column(s) {', '.join(sorted(missing))}; found {table.column_names}", source)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for row, item in enumerate(table.to_pylist()):
        turns = item["conversations"]
        turns = json.loads(turns) if isinstance(turns, str) else turns
        blobs = item["image_bytes"] if isinstance(item["image_bytes"], list) else [item["image_bytes"]]
        record_id = str(item.get("id") or f"minimind-{row}")
        paths = [_write_image(blob, image_dir / f"{record_id}-{k}", source, row)
                 for k, blob in enumerate(blobs) if blob]
        records.append({"id": record_id, "images": paths, "conversations": turns})
    return records


def read(source: Path, images: Path, out_dir: Path) -> list[dict]:
    return _from_parquet(source, out_dir) if source.suffix == ".parquet" else _from_jsonl(source)

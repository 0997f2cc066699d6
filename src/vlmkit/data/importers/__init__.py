"""`vlmkit data import --from FORMAT`: other projects' training data -> vlmkit records (JSONL).

One module per source format, each a function `read(source, images) -> list[dict]` that
returns records in vlmkit's form with image paths relative to `images` (the source's folder
by default). Every record is then checked by `vlmkit.data.records.normalise`, exactly as
`vlmkit train` will check it, and written with image paths relative to the output file.
Formats whose images are embedded (minimind-v's parquet) write them beside the output.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from vlmkit.data.importers import bvlm, llava, minicpmv, minigpt4qwen, minimind_v
from vlmkit.data.records import Record, normalise, write_records
from vlmkit.errors import DataError

# format name -> reader; see each module's docstring for the layout it expects.
FORMATS = {
    "llava": llava.read,
    "minicpm-v": minicpmv.read,
    "minimind-v": minimind_v.read,
    "minigpt4qwen": minigpt4qwen.read,
    "bvlm": bvlm.read,
}


def import_records(source_format: str, source: Path, out: Path, images: Path | None = None, **options) -> list[Record]:
    """Convert `source` (in `source_format`) to checked records written to the JSONL `out`."""
    if source_format not in FORMATS:
        raise DataError(f"unknown format {source_format!r}; known: {', '.join(sorted(FORMATS))}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError("file not found", source)
    images = Path(images) if images else source.parent
    reader = FORMATS[source_format]
    unknown = sorted(set(options) - set(inspect.signature(reader).parameters))
    if unknown:
        raise DataError(f"format {source_format!r} takes no {', '.join(unknown)} option")
    raw = reader(source, images=images, out_dir=out.parent, **options)
    records, seen = [], set()
    for index, item in enumerate(raw):
        record = normalise(item, images, source, index + 1)  # the "line" is the item's position in the source
        if record.id in seen:
            raise DataError("duplicate id", source, index + 1, record.id)
        seen.add(record.id)
        records.append(record)
    if not records:
        raise DataError("no records to import", source)
    write_records(out, records)
    return records

"""Reading the source files of the importers, with errors that name the file and the item."""

from __future__ import annotations

import json
from pathlib import Path

from vlmkit.errors import DataError


def load_json(path: Path, expect: type = list):
    """The parsed JSON file, checked to be a list (or a mapping, with `expect=dict`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON ({err.msg} at line {err.lineno})", path) from None
    if not isinstance(data, expect):
        raise DataError(f"expected a JSON {'list' if expect is list else 'object'} at the top level", path)
    return data


def field(item, key: str, path: Path, index: int, kind: type = str):
    """`item[key]`, which must exist and be of `kind`."""
    if not isinstance(item, dict):
        raise DataError(f"expected a JSON object, got {type(item).__name__}", path, index + 1)
    value = item.get(key)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise DataError(f"field {key!r} is missing or not a {'string' if kind is str else kind.__name__}", path,
                        index + 1, item.get("id"))
    return value

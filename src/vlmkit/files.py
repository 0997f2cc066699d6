"""Writing a file so that it is never seen half-written: a temporary name beside it, then a rename.

A reader (or a run resumed after a kill) finds either the previous file or the complete new
one; `os.replace` is atomic on POSIX and Windows within one file system.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

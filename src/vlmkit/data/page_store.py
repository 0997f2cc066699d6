"""The page store: one HDF5 file (h5py) of document pages keyed by id.

Three parallel, growable datasets hold, row by row, the page id, the encoded image bytes
(PNG or JPEG, exactly as given) and a JSON object of metadata (source file, page number,
width, height, and the PDF's text layer when it has one).

Reading (`PageStore`) is by id, from any number of DataLoader workers: each process opens
the file itself on first use, because an HDF5 handle must not cross a fork.
Writing (`PageStoreWriter`) goes to a temporary file beside the store that replaces it only
when complete, so an interrupted job leaves the previous store as it was; a lock file keeps
a second writer out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from vlmkit.errors import DataError
from vlmkit.processing.images import open_image

FORMAT = "vlmkit-pages"
VERSION = 1
DATASETS = ("ids", "images", "meta")


class PageStore:
    """Read-only access to a store: `ids`, `image(id)`, `image_bytes(id)`, `meta(id)`, `text(id)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("page store not found; create it with `vlmkit docs render` or `add-images`", self.path)
        self._file, self._pid, self._index = None, None, None
        self._h5()  # fail now, in the main process, if it is not a store

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise DataError(f"not a readable HDF5 file ({err})", self.path) from None
            if self._file.attrs.get("format") != FORMAT or any(name not in self._file for name in DATASETS):
                raise DataError(f"not a vlmkit page store (no {FORMAT!r} format mark)", self.path)
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:  # DataLoader workers pickle the store: send the path, not the handle
        return {**self.__dict__, "_file": None, "_pid": None}

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {doc_id: row for row, doc_id in enumerate(self.ids)}
        return self._index

    @property
    def ids(self) -> list[str]:
        return [i.decode("utf-8") if isinstance(i, bytes) else i for i in self._h5()["ids"][:]]

    def __len__(self) -> int:
        return len(self._h5()["ids"])

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.index

    def _row(self, doc_id: str) -> int:
        if doc_id not in self.index:
            raise DataError("no page with this id in the store", self.path, record_id=doc_id)
        return self.index[doc_id]

    def image_bytes(self, doc_id: str) -> bytes:
        return self._h5()["images"][self._row(doc_id)].tobytes()

    def image(self, doc_id: str) -> Image.Image:
        try:
            return open_image(self.image_bytes(doc_id))
        except DataError as err:
            raise DataError(f"stored image: {err.problem}", self.path, record_id=doc_id) from None

    def meta(self, doc_id: str) -> dict:
        return json.loads(self._h5()["meta"][self._row(doc_id)])

    def text(self, doc_id: str) -> str:
        """The page's text layer; "" for a page without one (an image, a scanned page)."""
        text = self.meta(doc_id).get("text") or ""
        if not isinstance(text, str):
            raise DataError(f"the stored text layer is a {type(text).__name__}, not a string", self.path,
                            record_id=doc_id)
        return text

    def check_ids(self, ids, source) -> None:
        """Raise a DataError naming `source` and the first id that is not in the store."""
        for doc_id in ids:
            if doc_id not in self.index:
                raise DataError(f"page {doc_id!r} is not in the page store {self.path}", source, record_id=doc_id)

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class PageStoreWriter:
    """Adds pages to a new or existing store; `with PageStoreWriter(path) as w: w.add(...)`.

    The store is replaced on a clean exit of the `with` block (or `commit()`); on an
    exception the temporary file is removed and the store stays as it was.
    """

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = self.path.with_name(self.path.name + ".lock")
        self._take_lock()
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            if self.path.exists() and not overwrite:
                PageStore(self.path).close()  # refuse to append to something that is not a store
                shutil.copyfile(self.path, self.tmp)
                self.file = h5py.File(self.tmp, "a")
            else:
                self.file = h5py.File(self.tmp, "w")
                self.file.attrs.update({"format": FORMAT, "version": VERSION})
                self.file.create_dataset("ids", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
                self.file.create_dataset("images", (0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8),
                                         chunks=(64,))
                self.file.create_dataset("meta", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
            self.known = {i.decode("utf-8") if isinstance(i, bytes) else i for i in self.file["ids"][:]}
        except BaseException:
            self._cleanup()
            raise

    def _take_lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise DataError(f"is being written by process {pid} (lock file {self.lock}); wait for it to "
                                    "finish, or delete the lock file if that process is gone", self.path) from None
                # A crashed writer's lock, and the temporary file it left behind.
                self.path.with_name(f"{self.path.name}.tmp-{pid}").unlink(missing_ok=True)
                self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return
        raise DataError(f"could not take the lock file {self.lock}", self.path)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.known

    def __len__(self) -> int:
        return len(self.known)

    def add(self, doc_id: str, image: bytes, meta: dict | None = None) -> None:
        """Append one page: its id (unique in the store), encoded image bytes and metadata."""
        if not doc_id:
            raise DataError("a page id must not be empty", self.path)
        if doc_id in self.known:
            raise DataError("a page with this id is already in the store", self.path, record_id=doc_id)
        row = len(self.file["ids"])
        for name in DATASETS:
            self.file[name].resize((row + 1,))
        self.file["ids"][row] = doc_id
        self.file["images"][row] = np.frombuffer(image, dtype=np.uint8)
        self.file["meta"][row] = json.dumps(meta or {})
        self.known.add(doc_id)

    def commit(self) -> None:
        """Close the temporary file and move it into place."""
        self.file.close()
        os.replace(self.tmp, self.path)
        self.lock.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        if getattr(self, "file", None) is not None and self.file.id.valid:
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        self.lock.unlink(missing_ok=True)

    def __enter__(self) -> PageStoreWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self._cleanup()

"""The page store: round trip, atomic replacement, one writer at a time, and reads from DataLoader workers."""

import io
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlmkit.data.page_store import PageStore, PageStoreWriter
from vlmkit.errors import DataError


def _png(colour, size=(24, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "pages.h5"
    with PageStoreWriter(path) as writer:
        for i in range(10):
            writer.add(f"doc.pdf#{i}", _png((i * 20, 0, 0)), {"source": "doc.pdf", "page": i, "text": f"page {i}"})
    return path


def test_round_trip(store_path):
    store = PageStore(store_path)
    assert store.ids == [f"doc.pdf#{i}" for i in range(10)] and len(store) == 10
    assert store.image_bytes("doc.pdf#3") == _png((60, 0, 0))
    assert store.image("doc.pdf#3").getpixel((0, 0)) == (60, 0, 0)
    assert store.meta("doc.pdf#3") == {"source": "doc.pdf", "page": 3, "text": "page 3"}
    with pytest.raises(DataError, match=r"pages\.h5 \(id 'nope'\)"):
        store.image("nope")


def test_appending_keeps_pages_and_refuses_duplicate_ids(store_path):
    with PageStoreWriter(store_path) as writer:
        assert "doc.pdf#0" in writer
        writer.add("other.png", _png((0, 0, 255)))
        with pytest.raises(DataError, match="already in the store"):
            writer.add("doc.pdf#0", _png((0, 0, 0)))
    assert len(PageStore(store_path)) == 11


def test_interrupted_write_leaves_the_store_as_it_was(store_path):
    before = store_path.read_bytes()
    with pytest.raises(RuntimeError), PageStoreWriter(store_path) as writer:
        writer.add("new", _png((1, 2, 3)))
        raise RuntimeError("killed")
    assert store_path.read_bytes() == before
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["pages.h5"]  # no temp file, no lock


def test_a_crashed_writers_lock_and_temp_file_are_cleaned_up(store_path):
    before = store_path.read_bytes()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    (store_path.parent / "pages.h5.lock").write_text(str(dead))
    (store_path.parent / f"pages.h5.tmp-{dead}").write_bytes(b"half-written")
    assert store_path.read_bytes() == before
    with PageStoreWriter(store_path) as writer:  # the dead process's lock does not block
        writer.add("after-crash", _png((9, 9, 9)))
    assert "after-crash" in PageStore(store_path)
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["pages.h5"]


def test_a_second_writer_is_refused_with_a_clear_error(store_path):
    first = PageStoreWriter(store_path)
    try:
        with pytest.raises(DataError, match=rf"pages\.h5: is being written by process {os.getpid()}"):
            PageStoreWriter(store_path)
    finally:
        first.commit()
    PageStoreWriter(store_path).commit()  # free again once the first one is done


def test_not_a_store(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="bogus.h5: not a readable HDF5 file"):
        PageStore(bogus)
    with pytest.raises(DataError, match="page store not found"):
        PageStore(tmp_path / "missing.h5")


class _Reads(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return 40

    def __getitem__(self, index):
        doc_id = self.store.ids[index % 10]
        return doc_id, torch.tensor(list(self.store.image(doc_id).getpixel((0, 0)))), os.getpid()


def test_dataloader_workers_read_concurrently(store_path):
    store = PageStore(store_path)
    assert len(store.ids) == 10  # the parent has the file open: workers must open their own handle
    loader = DataLoader(_Reads(store), batch_size=4, num_workers=2, collate_fn=list)
    seen = [item for batch in loader for item in batch]
    assert len({pid for _, _, pid in seen} - {os.getpid()}) == 2
    for doc_id, pixel, _ in seen:
        assert pixel.tolist() == [int(doc_id.split("#")[1]) * 20, 0, 0]

"""write_text_atomic: the old file or the complete new one, never half of it, and no leftovers."""

import pytest

from vlmkit import files


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "train_summary.json"
    files.write_text_atomic(path, '{"steps": 1}')
    assert path.read_text() == '{"steps": 1}' and [p.name for p in tmp_path.iterdir()] == [path.name]

    def dies_midway(self, text, encoding=None):
        with open(self, "w") as handle:
            handle.write(text[:3])
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        files.write_text_atomic(path, '{"steps": 2}')
    monkeypatch.undo()
    assert path.read_text() == '{"steps": 1}'  # the reader still sees the old, complete file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # and the partial copy is gone

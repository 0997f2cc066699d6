"""JSONL lines that break the JSON reader itself (not just its grammar): each is a DataError naming
file and line, and `skip_bad` leaves the line out and reads on."""

import json

import pytest

from vlmkit.data.records import read_records
from vlmkit.errors import DataError

GOOD = {"id": "ok", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

BAD_LINES = {
    # bytes that are not UTF-8: a Latin-1 "é" in the middle of an otherwise good record
    "not-utf8": json.dumps(GOOD | {"id": "latin"}).replace("hello", "caf\u00e9").encode("latin-1"),
    # nested deeper than Python's recursion limit
    "deep": b"[" * 100_000 + b"]" * 100_000,
    # an integer over Python's limit on digits converted from a string
    "huge-int": json.dumps(GOOD | {"id": "big"}).replace('"big"', "1" * 5000).encode(),
}
PROBLEMS = {"not-utf8": r"not UTF-8 \(byte 0xe9 at column \d+\)", "deep": "nested too deeply",
            "huge-int": "number too long"}


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(record_id: str) -> bytes:
    return json.dumps(GOOD | {"id": record_id}).encode()


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_a_data_error_naming_file_and_line(tmp_path, case):
    path = write_lines(tmp_path / "d.jsonl", [good_line("a"), BAD_LINES[case], good_line("b")])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*" + PROBLEMS[case]) as caught:
        read_records(path)
    assert caught.value.line == 2 and str(caught.value.path).endswith("d.jsonl")


def test_skip_bad_leaves_out_every_such_line_and_keeps_the_rest(tmp_path):
    lines = [good_line("a"), *BAD_LINES.values(), good_line("b")]
    records, skipped = read_records(write_lines(tmp_path / "d.jsonl", lines), skip_bad=True)
    assert [r.id for r in records] == ["a", "b"]
    assert [(e.line, e.path.name) for e in skipped] == [(2, "d.jsonl"), (3, "d.jsonl"), (4, "d.jsonl")]


def test_windows_line_endings_still_read(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(good_line("a") + b"\r\n" + b"\r\n" + good_line("b") + b"\r\n")
    assert [r.id for r in read_records(path)[0]] == ["a", "b"]


@pytest.mark.parametrize("where", ["content", "id", "image"])
def test_a_lone_surrogate_escape_is_a_data_error(tmp_path, where):
    # Valid JSON, but no text: the tokenizer raises TypeError on it and open() UnicodeEncodeError.
    record = GOOD | {"id": "s"}
    if where == "content":
        record["conversations"] = [GOOD["conversations"][0], {"role": "assistant", "content": "a\ud800b"}]
    elif where == "id":
        record["id"] = "x\udfffy"
    else:
        record["images"] = ["img/\ud800.png"]
    path = write_lines(tmp_path / "d.jsonl", [good_line("a"), json.dumps(record).encode()])
    with pytest.raises(DataError, match=r"d\.jsonl:2.*lone surrogate"):
        read_records(path)
    assert [r.id for r in read_records(path, skip_bad=True)[0]] == ["a"]

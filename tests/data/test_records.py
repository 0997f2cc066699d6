import json

import pytest

from vlmkit.data.records import normalise, read_records, write_records
from vlmkit.errors import DataError


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_native_record_resolves_images_relative_to_the_file(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"id": "a", "images": ["img/1.png"], "category": "colour",
                                               "conversations": [{"role": "user", "content": "<image>\nQ?"},
                                                                 {"role": "assistant", "content": "red"}]}])
    (record,), skipped = read_records(path)
    assert skipped == []
    assert record.images == [str(tmp_path / "img/1.png")]
    assert record.category == "colour" and record.line == 1


def test_llava_record_is_converted():
    raw = {"id": 7, "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                        {"from": "gpt", "value": "a cat"}]}
    record = normalise(raw, base_dir=__import__("pathlib").Path("/data"))
    assert record.id == "7"
    assert record.images == ["/data/x.jpg"]
    assert [t["role"] for t in record.conversations] == ["user", "assistant"]


def test_markers_are_added_before_the_first_user_turn_when_missing():
    raw = {"images": ["a.png", "b.png"], "conversations": [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Compare."},
                                                           {"role": "assistant", "content": "first"}]}
    record = normalise(raw, base_dir=__import__("pathlib").Path("."))
    assert record.conversations[1]["content"] == "<image>\n<image>\nCompare."
    assert record.conversations[0]["content"] == "Be brief."


def video_record(content="<video>\nWhat happens?", **fields):
    turns = [{"role": "user", "content": content}, {"role": "assistant", "content": "it moves"}]
    return {"id": "v1", "video": "clips/1.mp4", **fields, "conversations": turns}


def turns(*roles: str) -> dict:
    return {"conversations": [{"role": role, "content": f"{role} {i}"} for i, role in enumerate(roles)]}


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"images": ["a.png"], "conversations": [{"role": "user", "content": "<image><image>"},
                                                 {"role": "assistant", "content": "x"}]}, "2 <image> marker(s) but 1"),
        ({"conversations": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"conversations": [{"role": "robot", "content": "hi"}]}, "no valid role"),
        ({"conversations": "hello"}, "non-empty list"),
        ({"images": [3], "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "list of non-empty path strings"),
        (video_record(content="<video><video>"), "2 <video> marker(s) but 1 video(s)"),
        ({**video_record(), "video": None, "id": "x"}, "1 <video> marker(s) but 0 video(s)"),
        (video_record(video=["a.mp4", "b.mp4"]), "field 'video' must be one non-empty path string"),
        (video_record(video=""), "field 'video' must be one non-empty path string"),
        # The order of the turns: an optional system turn, then user and assistant by turns,
        # ending on a non-empty answer.
        (turns("user", "user", "assistant"), "conversations[1] has role 'user' where 'assistant' belongs"),
        (turns("assistant", "user", "assistant"), "conversations[0] has role 'assistant' where 'user' belongs"),
        (turns("user", "assistant", "user"), "ends on a user turn"),
        (turns("system", "user", "assistant", "system", "user", "assistant"),
         "conversations[3] has role 'system' where 'user' belongs"),
        ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"}]},
         "conversations[1] is an empty assistant turn"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path, raw, problem):
    path = write_lines(tmp_path / "bad.jsonl", [raw])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert problem in str(err.value)
    assert f"{path}:1" in str(err.value)


def test_malformed_json_line_is_reported_with_its_line_number(tmp_path):
    good = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_lines(tmp_path / "d.jsonl", [good, "{not json", good])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        read_records(path)


def test_skip_bad_leaves_out_and_returns_the_bad_lines(tmp_path):
    good = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_lines(tmp_path / "d.jsonl", [good, "{not json", {**good, "id": "x"}, {"conversations": []}])
    records, skipped = read_records(path, skip_bad=True)
    assert len(records) == 2
    assert [e.line for e in skipped] == [2, 4]


def test_duplicate_ids_are_rejected(tmp_path):
    good = {"id": "same", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_lines(tmp_path / "d.jsonl", [good, good])
    with pytest.raises(DataError, match="duplicate id"):
        read_records(path)


def test_write_then_read_round_trips(tmp_path):
    raw = {"id": "r1", "images": ["img/1.png"], "category": "count", "conversations": [
        {"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "2"}]}
    original = normalise(raw, tmp_path, tmp_path / "in.jsonl", 1)
    write_records(tmp_path / "out.jsonl", [original])
    (again,), _ = read_records(tmp_path / "out.jsonl")
    assert (again.id, again.images, again.conversations, again.category) == (
        original.id, original.images, original.conversations, original.category)


def test_video_path_is_resolved_relative_to_the_file_and_kept_apart_from_images(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [video_record(images=["a.png"], content="<image>\n<video>\nSame?")])
    (record,), _ = read_records(path)
    assert record.video == str(tmp_path / "clips/1.mp4")
    assert record.images == [str(tmp_path / "a.png")] and "video" not in record.extra


def test_a_video_marker_is_added_before_the_first_user_turn_when_missing():
    record = normalise(video_record(content="What happens?", images=["a.png"]), __import__("pathlib").Path("/d"))
    assert record.conversations[0]["content"] == "<video>\n<image>\nWhat happens?"


def test_video_records_round_trip_with_a_relative_path(tmp_path):
    original = normalise(video_record(), tmp_path, tmp_path / "in.jsonl", 1)
    write_records(tmp_path / "out.jsonl", [original])
    assert json.loads((tmp_path / "out.jsonl").read_text())["video"] == "clips/1.mp4"
    (again,), _ = read_records(tmp_path / "out.jsonl")
    assert (again.video, again.conversations) == (original.video, original.conversations)
    plain = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert "video" not in normalise(plain, tmp_path).to_json()  # image-only records are written as before

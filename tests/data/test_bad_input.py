"""Bad training input: every problem is a DataError naming file, line and problem; skip_bad counts them.

Reading-level problems of single records (malformed JSON, wrong fields, marker/image counts in
a JSONL file, duplicate ids) are covered in test_records.py; here are the problems found when
the examples are prepared (images, lengths, the processor's own marker check), skip_bad across
both levels, and the `vlmkit train` command line.
"""

import json

import pytest
from PIL import Image

from tests.conftest import TEST_TEXT, TEST_VISION
from vlmkit.cli import main
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.records import Record, read_records
from vlmkit.errors import DataError

MAX_LENGTH = 200
MAX_PIXELS = 4000  # data.max_pixels, lowered so that a small file can be "too large"


@pytest.fixture
def images(tmp_path, good):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"these bytes are not an image " * 8)
    truncated = tmp_path / "truncated.png"
    data = open(good[0]["images"][0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])  # a valid PNG header, then the pixel data stops
    tiny, huge = tmp_path / "tiny.png", tmp_path / "huge.png"
    Image.new("RGB", (3, 40)).save(tiny)  # a side under the 4-pixel minimum
    Image.new("RGB", (64, 64)).save(huge)  # 4,096 pixels: over the MAX_PIXELS the tests set
    return {"missing": tmp_path / "no_such_image.png", "garbage": garbage, "truncated": truncated, "tiny": tiny,
            "huge": huge}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def with_image(record: dict, image, record_id: str) -> dict:
    return {**record, "id": record_id, "images": [str(image)]}


def too_long(record: dict) -> dict:
    turns = [dict(t) for t in record["conversations"]]
    turns[1]["content"] = " ".join(["the red circle is above the blue square"] * 30)
    return {**record, "id": "long", "conversations": turns}


def test_good_records_fit_the_length_limit(processor, good):
    # The premise of the other tests: only the record made too long is over MAX_LENGTH.
    lengths = [len(processor.encode_text(r["conversations"], [1])["input_ids"]) for r in good]
    assert max(lengths) < MAX_LENGTH


@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", "image file not found"),
        ("garbage", "not a readable image"),
        ("tiny", "each side must be at least 4 pixels"),
        ("huge", "over the limit of 4000; downscale it or raise max_pixels"),
        ("too_long", "tokens long, over max_length 200"),
    ],
)
def test_each_problem_names_file_line_id_and_problem(processor, good, images, tmp_path, case, problem):
    bad = too_long(good[1]) if case == "too_long" else with_image(good[1], images[case], case)
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], good[2], bad])
    with pytest.raises(DataError) as err:
        ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH, max_pixels=MAX_PIXELS)
    message = str(err.value)
    assert message.startswith(f"{path}:3 (id '{bad['id']}'): ")
    assert problem in message
    assert (err.value.path, err.value.line, err.value.record_id) == (str(path), 3, bad["id"])
    if case in images:
        assert str(images[case]) in message  # which image, too
    if case == "too_long":
        n = len(processor.encode_text(bad["conversations"], [1])["input_ids"])
        assert f"is {n} tokens long" in message and "never truncates" in message


def test_marker_count_mismatch_in_a_record_built_in_code_names_its_origin(processor, good, tmp_path):
    # normalise() checks JSONL records (test_records.py); a Record made in code reaches the processor's check.
    turns = [{"role": "user", "content": "<image>\n<image>\nCompare."}, {"role": "assistant", "content": "same"}]
    record = Record("pair", [good[0]["images"][0]], turns, path=str(tmp_path / "made.jsonl"), line=12)
    with pytest.raises(DataError) as err:
        ConversationDataset([record], processor, max_length=MAX_LENGTH)
    assert str(err.value).startswith(f"{tmp_path / 'made.jsonl'}:12 (id 'pair'): ")
    assert "2 <image> marker(s) but 1 image(s)" in str(err.value)


def test_skip_bad_leaves_out_and_counts_every_kind_of_bad_record(processor, good, images, tmp_path):
    mismatch = {**good[0], "id": "markers", "conversations": [
        {"role": "user", "content": "<image> <image> Compare."}, {"role": "assistant", "content": "x"}]}
    lines = [
        good[0],                                            # 1
        '{"id": "cut", "images": ["a.png"], "conversa',     # 2 malformed JSON
        with_image(good[1], images["missing"], "missing"),  # 3
        with_image(good[1], images["garbage"], "garbage"),  # 4
        good[1],                                            # 5
        mismatch,                                           # 6 two markers, one image
        too_long(good[2]),                                  # 7
        "",                                                 # 8 blank: ignored, not an error
        good[2],                                            # 9
        {**good[0]},                                        # 10 duplicate id of line 1
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)

    records, bad_lines = read_records(path, skip_bad=True)
    assert [r.line for r in records] == [1, 3, 4, 5, 7, 9]
    assert [e.line for e in bad_lines] == [2, 6, 10]

    dataset = ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH, skip_bad=True)
    assert [e.record.line for e in dataset.examples] == [1, 5, 9]
    assert len(dataset) == 3
    assert sorted(e.line for e in dataset.skipped) == [2, 3, 4, 6, 7, 10]
    problems = {e.line: str(e) for e in dataset.skipped}
    for line, expected in {2: "malformed JSON", 3: "image file not found", 4: "not a readable image",
                           6: "2 <image> marker(s) but 1 image(s)", 7: "over max_length", 10: "duplicate id"}.items():
        assert problems[line].startswith(f"{path}:{line}"), problems[line]
        assert expected in problems[line]
    item = dataset[0]  # the kept records still load
    assert item["pixel_values"].shape[0] == 1 and len(item["input_ids"]) < MAX_LENGTH

    # Without skip_bad the first problem found while preparing examples stops everything.
    with pytest.raises(DataError, match=r"mixed\.jsonl:3 \(id 'missing'\): .*image file not found"):
        ConversationDataset(records, processor, max_length=MAX_LENGTH)


def test_a_truncated_image_is_reported_with_file_and_line(processor, good, images, tmp_path):
    # Found when the examples are prepared or, at the latest, when the example is fetched for a batch.
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], with_image(good[1], images["truncated"], "cut")])
    with pytest.raises(DataError) as err:
        dataset = ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH)
        [dataset[i] for i in range(len(dataset))]
    assert str(err.value).startswith(f"{path}:2 (id 'cut'): image {images['truncated']}: ")
    assert "corrupt or truncated" in str(err.value)


def test_skip_bad_also_skips_a_truncated_image(processor, good, images, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], with_image(good[1], images["truncated"], "cut")])
    dataset = ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH, skip_bad=True)
    assert [e.line for e in dataset.skipped] == [2]
    assert len(dataset) == 1


def test_malformed_json_reports_the_column_within_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"id": "a", "conversations": ['])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "at column 31)" in str(err.value)  # just past the last character, where the JSON stops


# --- the command line --------------------------------------------------------------------------------


def _cli_args(path, out):
    return ["train", "--train-data", str(path), "--output-dir", str(out), "--max-steps", "1", "--set",
            f"model.vision_config={json.dumps(TEST_VISION)}", f"model.text_config={json.dumps(TEST_TEXT)}",
            "model.vocab_size=400", "train.batch_size=2", "train.report_to=[]"]


def test_cli_train_stops_with_status_2_on_a_bad_line_and_skips_it_with_skip_bad(good, tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [good[0], good[1], '{"id": "broken", "images": [', good[2]])
    out = tmp_path / "model"

    assert main(_cli_args(path, out)) == 2
    captured = capsys.readouterr()
    assert f"vlmkit: error: {path}:3: malformed JSON" in captured.err
    assert "Traceback" not in captured.err
    assert not (out / "model.safetensors").exists()

    assert main(_cli_args(path, out) + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped 1 bad record(s) (--skip-bad); the first: {path}:3: malformed JSON" in captured.out
    assert (out / "model.safetensors").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_records"] == 1 and summary["n_train"] == 3 and summary["steps"] == 1


def test_when_nothing_is_left_the_error_counts_the_records_skipped_in_every_pass(processor, good, images, tmp_path):
    # One record fails on its image (found from headers), the other on its length (found once tokenised).
    lines = [with_image(good[0], images["missing"], "missing"), too_long(good[1])]
    path = write_jsonl(tmp_path / "all-bad.jsonl", lines)
    with pytest.raises(DataError, match=r"no usable records left \(2 skipped\)"):
        ConversationDataset.from_jsonl(path, processor, max_length=MAX_LENGTH, skip_bad=True)

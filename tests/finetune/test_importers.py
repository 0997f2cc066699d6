"""`vlmkit data import --from FORMAT`: each format's fixture (tests/finetune/fixtures) becomes records
that read back, encode and train."""

import json
import shutil
from pathlib import Path

import pytest

from tests.finetune.helpers import make_config, run
from vlmkit.cli import main
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.importers import import_records
from vlmkit.data.records import read_records
from vlmkit.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"


def _parquet(tmp_path: Path) -> Path:
    """minimind-v's parquet form of the JSONL fixture: the images embedded as bytes (one or a list)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in (FIXTURES / "minimind_v.jsonl").read_text().splitlines()]
    images = [[(FIXTURES / name.strip()).read_bytes() for name in row["image"].split(",")] for row in rows]
    table = pa.table({"conversations": [json.dumps(row["conversations"]) for row in rows], "image_bytes": images})
    path = tmp_path / "sft.parquet"
    pq.write_table(table, path)
    return path


def _imported(name, tmp_path) -> list:
    out = tmp_path / "out" / f"{name}.jsonl"
    sources = {"llava": ("llava", FIXTURES / "llava.json", {}),
               "minicpm-v": ("minicpm-v", FIXTURES / "minicpmv.json", {}),
               "minimind-v": ("minimind-v", FIXTURES / "minimind_v.jsonl", {}),
               "minimind-v-parquet": ("minimind-v", None, {}),
               "minigpt4qwen": ("minigpt4qwen", FIXTURES / "minigpt4qwen.json", {}),
               "bvlm": ("bvlm", FIXTURES / "bvlm_image_map.json", {"captions": FIXTURES / "bvlm_captions.json"})}
    source_format, source, options = sources[name]
    source = source or _parquet(tmp_path)
    import_records(source_format, source, out, images=FIXTURES, **options)
    return read_records(out)[0]  # read back exactly as `vlmkit train` reads them


def _users(record) -> list[str]:
    return [t["content"] for t in record.conversations if t["role"] == "user"]


def test_llava(tmp_path):
    records = _imported("llava", tmp_path)
    assert [r.id for r in records] == ["llava-1", "llava-2", "llava-3"]
    assert [len(r.images) for r in records] == [1, 1, 0]  # the third is text-only
    assert records[0].conversations[-1] == {"role": "assistant", "content": "Yes."}
    assert _users(records[1])[0].startswith("<image>\n")  # an unmarked image gets its marker


def test_minicpmv_named_placeholders_become_markers_in_order(tmp_path):
    single, multi = _imported("minicpm-v", tmp_path)
    assert Path(single.images[0]).name == "green.png"
    assert _users(multi) == ["Which is redder, <image> or <image>?"]
    assert [Path(p).name for p in multi.images] == ["blue.png", "red.png"]  # <image_01> is mentioned first


def test_minimind_jsonl_and_parquet_give_the_same_records(tmp_path):
    from_jsonl, from_parquet = _imported("minimind-v", tmp_path), _imported("minimind-v-parquet", tmp_path)
    assert [len(r.images) for r in from_jsonl] == [len(r.images) for r in from_parquet] == [1, 2]
    assert [r.conversations for r in from_jsonl] == [r.conversations for r in from_parquet]
    for a, b in zip(from_jsonl, from_parquet):  # the embedded bytes were written out unchanged
        assert [Path(p).read_bytes() for p in a.images] == [Path(p).read_bytes() for p in b.images]


def test_minigpt4qwen_images_and_video_frames(tmp_path):
    image, folder, frames = _imported("minigpt4qwen", tmp_path)
    assert _users(image) == ["<image> Describe this image in detail."]
    assert [Path(p).name for p in folder.images] == ["0000.png", "0001.png", "0002.png"]  # frames in order
    assert _users(folder)[0] == "<image><image><image>\nWhich way does the square move?"
    assert [Path(p).name for p in frames.images] == ["0002.png", "0000.png"]
    assert _users(frames)[0].count("<image>") == 2


def test_bvlm_one_record_per_caption(tmp_path):
    records = _imported("bvlm", tmp_path)
    assert [r.id for r in records] == ["bvlm-7-0", "bvlm-7-1", "bvlm-8-0"]
    assert records[2].conversations[0]["content"] == "<image>\nDescribe the image."  # empty prompt: the default
    assert [Path(r.images[0]).name for r in records] == ["red.png", "red.png", "green.png"]


def test_every_imported_format_trains(tmp_path, tiny, trainers):
    names = ["llava", "minicpm-v", "minimind-v", "minimind-v-parquet", "minigpt4qwen", "bvlm"]
    for name in names:
        dataset = ConversationDataset(_imported(name, tmp_path), tiny.processor, max_length=1024)
        assert len(dataset) > 0 and not dataset.skipped
    cfg = make_config(tmp_path, tmp_path / "run", ["train.max_steps=2", "train.batch_size=4"])
    cfg.data.train = [str(tmp_path / "out" / f"{name}.jsonl") for name in names]  # all formats in one mix
    run(cfg)
    (trainer,) = trainers
    assert len(trainer.train_dataset) == 3 + 2 + 2 + 2 + 3 + 3
    assert trainer.state.global_step == 2 and all(e["loss"] > 0 for e in trainer.state.log_history if "loss" in e)


def test_the_command_line_imports_and_moves_with_its_images(tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path / "src")
    out = tmp_path / "converted" / "llava.jsonl"
    assert main(["data", "import", str(tmp_path / "src" / "llava.json"), "--from", "llava", "--out", str(out)]) == 0
    assert "wrote 3 records" in capsys.readouterr().out
    line = json.loads(out.read_text().splitlines()[0])
    assert line["images"] == ["../src/images/red.png"]  # relative to the output file


@pytest.mark.parametrize(
    "source_format, content, message",
    [("minicpm-v", [{"id": "x", "image": {"<image_00>": "images/red.png", "<image_01>": "images/blue.png"},
                     "conversations": [{"role": "user", "content": "<image_00> what?"},
                                       {"role": "assistant", "content": "red"}]}], "<image_01> never appear"),
     ("minigpt4qwen", [{"video": "clip.mp4", "instruction": "what?", "output": "x"}], "extract them first"),
     ("minigpt4qwen", [{"image": "images/red.png", "output": "x"}], "'instruction' is missing"),
     ("llava", {"not": "a list"}, "expected a JSON list"),
     ("bvlm", {"0": {"path": "images/", "image_file": "red.png", "ID": 7}}, "needs its captions file")],
)
def test_bad_sources_name_the_problem(tmp_path, source_format, content, message):
    source = tmp_path / "source.json"
    source.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        import_records(source_format, source, tmp_path / "out.jsonl", images=FIXTURES)

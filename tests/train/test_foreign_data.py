"""Training on data the built-in generator did not write: LLaVA-format records, odd image
sizes, several images per record, through the CLI with the default recipe and flags only."""

import json

from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmkit.cli import main
from vlmkit.train.trainer import SUMMARY_FILE


def _write_llava_style_data(folder):
    (folder / "pics").mkdir()
    lines = []
    for i in range(12):
        size = (37 + 9 * i, 90 - 4 * i)  # neither square nor the model's input size
        Image.new("RGB", size, (20 * i, 255 - 20 * i, 90)).save(folder / "pics" / f"{i}.jpg")
        record = {"id": f"ext-{i}", "image": f"pics/{i}.jpg",
                  "conversations": [{"from": "human", "value": "<image>\nWhat is the main colour?"},
                                    {"from": "gpt", "value": f"colour number {i % 3}"}]}
        if i % 4 == 0:  # two images, no markers: they go before the first user turn
            record = {"id": f"ext-{i}", "images": [f"pics/{i}.jpg", f"pics/{(i + 1) % 12}.jpg"],
                      "conversations": [{"role": "user", "content": "Are these the same?"},
                                        {"role": "assistant", "content": "no"}]}
        lines.append(json.dumps(record))
    path = folder / "external.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_default_recipe_trains_on_foreign_llava_format_data(tmp_path):
    data = _write_llava_style_data(tmp_path)
    out = tmp_path / "model"
    small = '"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2'
    tiny = [f"model.vision_config={{{small}}}", f'model.text_config={{{small}, "num_key_value_heads": 2}}',
            "model.vocab_size=300", "train.batch_size=4", "train.report_to=[]"]
    status = main(["train", "--train-data", str(data), "--output-dir", str(out), "--max-steps", "3", "--set", *tiny])
    assert status == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and summary["n_train"] == 12 and summary["skipped_records"] == 0

    import vlmkit.auto  # noqa: F401 -- registers the Auto classes

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "VLMForConditionalGeneration"
    assert type(processor).__name__ == "VLMProcessor"

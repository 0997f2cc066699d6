"""The shapes example's vision stage (examples/shapes/vision_tags.py): a tower pre-trained on
caption word tags, then composed into a VLM."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TEST_TEXT
from examples.shapes.vision_tags import (HEAD_FILE, TAGS_FILE, TagDataset, TowerTagger, caption_words,
                                         load_tag_config, run_vision_stage as run, tag_vocabulary)
from vlmkit.config import ModelConfig
from vlmkit.data.records import Record, normalise
from vlmkit.errors import ConfigError, DataError
from vlmkit.model.build import build, build_vision_tower, tower_image_processor

TEST_REGNET = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1],
               "groups_width": 8, "layer_type": "y"}


def _config(synth_dir, out, *overrides):
    return load_tag_config(None, ["train.report_to=[]", "train.batch_size=4", "train.warmup=0",
                              f"data.train={synth_dir / 'captions.jsonl'}", f"train.output_dir={out}",
                              "model.image_size=32", *overrides])


def _tagger_loss(directory, synth_dir) -> float:
    """Mean tag loss over the caption images of a tower saved by the vision stage (with its head)."""
    from types import SimpleNamespace

    from vlmkit.data.records import read_records

    cfg = ModelConfig(vision=str(directory), image_size=32)
    tower, _ = build_vision_tower(cfg)
    encode_config = SimpleNamespace(vision_config=tower.config, vision_feature_layer=-1, image_size=32)
    vocabulary = json.loads((directory / TAGS_FILE).read_text())  # the loss below leaves out positive weights
    tagger = TowerTagger(tower, encode_config, len(vocabulary))
    tagger.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    records, _ = read_records(synth_dir / "captions.jsonl")
    dataset = TagDataset(records, vocabulary, tower_image_processor(cfg, encode_config), 10**8)
    batch = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        out = tagger(torch.stack([b["pixel_values"] for b in batch]), torch.stack([b["tags"] for b in batch]))
    return out["loss"].item()


def test_tags_are_the_assistant_words_seen_often_enough():
    record = Record(id="a", images=["x.png"], conversations=[
        {"role": "user", "content": "<image>\nDescribe the square."},
        {"role": "assistant", "content": "A red Square, top left."}])
    assert caption_words(record) == {"a", "red", "square", "top", "left"}
    other = Record(id="b", images=["y.png"], conversations=[
        {"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "red circle"}])
    vocabulary, positive_weight = tag_vocabulary([record, other, other, other])
    assert vocabulary == ["circle", "red"]  # "square" is in 1 caption of 4
    # Positives weigh as much as the negatives they are outnumbered by, and never less than one.
    assert positive_weight.tolist() == [1.0, 1.0]
    blue = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "blue"}]
    many = [other] * 3 + [Record(id=str(i), images=["z.png"], conversations=blue) for i in range(9)]
    vocabulary, positive_weight = tag_vocabulary(many)
    assert vocabulary == ["blue", "circle", "red"] and positive_weight.tolist() == [1.0, 3.0, 3.0]
    with pytest.raises(DataError, match="no word occurs"):
        tag_vocabulary([record])


def test_vision_stage_learns_tags_and_composes_into_a_vlm(synth_dir, tmp_path):
    torch.manual_seed(0)
    untrained = tmp_path / "untrained"
    run(_config(synth_dir, untrained, "train.max_steps=1", "train.lr.vision=1e-9",
                *[f"model.vision_config.{k}={json.dumps(v)}" for k, v in TEST_REGNET.items()]))
    trained = tmp_path / "trained"
    run(_config(synth_dir, trained, "train.max_steps=60", "train.lr.vision=3e-3",
                *[f"model.vision_config.{k}={json.dumps(v)}" for k, v in TEST_REGNET.items()]))
    assert _tagger_loss(trained, synth_dir) < 0.7 * _tagger_loss(untrained, synth_dir)

    # The saved tower is a transformers checkpoint: model.vision composes it with a from-scratch LM, unchanged.
    cfg = ModelConfig(vision=str(trained), image_size=32, text_config=dict(TEST_TEXT), vocab_size=400)
    texts = ["red circle", "blue square"] * 20
    built = build(cfg, training_texts=lambda: texts)
    assert "vision" not in built.random_modules
    saved = load_file(str(trained / "model.safetensors"))
    for name, value in built.model.vision_tower.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert built.processor.image_processor.image_mean == [0.5, 0.5, 0.5]


def test_vision_stage_refuses_records_with_several_images(synth_dir, tmp_path):
    two = normalise({"id": "pair", "images": ["a.png", "b.png"], "conversations": [
        {"role": "user", "content": "<image><image>\nDescribe."}, {"role": "assistant", "content": "red"}]},
        tmp_path, tmp_path / "c.jsonl", 7)
    with pytest.raises(DataError, match=r"c\.jsonl.*7|7.*c\.jsonl") as err:
        TagDataset([two], ["red"], None, 10**8)
    assert "one image per caption record" in str(err.value)


def test_vision_stage_needs_no_language_model_and_refuses_what_it_would_ignore(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="vision encoder alone"):
        run(_config(synth_dir, tmp_path / "x", "model.init_from=somewhere"))
    with pytest.raises(ConfigError, match="does not support data.eval, train.packing"):
        run(_config(synth_dir, tmp_path / "x", "data.eval=x.jsonl", "train.packing=true"))


def test_a_missing_image_names_its_record_or_is_skipped_and_counted(synth_dir, tmp_path):
    from vlmkit.data.records import read_records

    records, _ = read_records(synth_dir / "captions.jsonl")
    lost = normalise({"id": "lost", "images": ["nowhere.png"], "conversations": records[0].conversations},
                     tmp_path, tmp_path / "lost.jsonl", 3)
    with pytest.raises(DataError, match=r"lost\.jsonl.*3.*image file not found|image file not found.*lost\.jsonl"):
        TagDataset([*records, lost], ["red"], None, 10**8)
    dataset = TagDataset([*records, lost], ["red"], None, 10**8, skip_bad=True)
    assert len(dataset) == len(records) and len(dataset.skipped) == 1


def test_vision_stage_trains_a_vit_tower_too(synth_dir, tmp_path):
    # A CLIP tower drops its CLS token (vision_feature_select_strategy "default") and is saved with its normalisation.
    out = tmp_path / "vit"
    run(_config(synth_dir, out, "train.max_steps=2"))  # the default tower: a tiny CLIP ViT
    built = build(ModelConfig(vision=str(out), text_config=dict(TEST_TEXT), vocab_size=400),
                  training_texts=lambda: ["red circle"] * 40)
    assert built.model.config.vision_config.model_type == "clip_vision_model" and "vision" not in built.random_modules
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == list(built.processor.image_processor.image_mean)


def test_channel_shuffle_permutes_colours_and_leaves_out_the_colour_tags(synth_dir):
    from vlmkit.data.records import read_records

    records, _ = read_records(synth_dir / "captions.jsonl")
    vocabulary, _ = tag_vocabulary(records)
    colours = [word for word in ("red", "green", "blue") if word in vocabulary]
    keep_pil = lambda images: {"pixel_values": [images[0]]}  # items then carry the PIL image itself
    plain = TagDataset(records[:8], vocabulary, keep_pil, 10**8)
    shuffled = TagDataset(records[:8], vocabulary, keep_pil, 10**8, channel_shuffle=1.0, colour_words=colours)
    torch.manual_seed(0)
    for i in range(8):
        original, item = plain[i], shuffled[i]
        assert torch.equal(original["tags"], item["tags"])  # the caption's words, as they are
        left_out = {vocabulary[k] for k in torch.nonzero(item["trained_tags"] == 0).flatten().tolist()}
        assert left_out == set(colours) and original["trained_tags"].all()
        before, after = original["pixel_values"].convert("RGB").split(), item["pixel_values"].split()
        assert sorted(c.tobytes() for c in before) == sorted(c.tobytes() for c in after)  # same channels...
        assert [c.tobytes() for c in before] != [c.tobytes() for c in after]  # ...in another order

    # The loss is the mean over the (image, tag) pairs left in.
    from types import SimpleNamespace

    tower, _ = build_vision_tower(ModelConfig(vision_config=dict(TEST_REGNET), image_size=32))
    tagger = TowerTagger(tower, SimpleNamespace(vision_config=tower.config, vision_feature_layer=-1, image_size=32), 3)
    tags, trained = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    out = tagger.eval()(torch.randn(2, 3, 32, 32), tags, trained)
    kept = trained.bool()
    assert torch.allclose(out["loss"], torch.nn.functional.binary_cross_entropy_with_logits(out["logits"][kept], tags[kept]))


def test_channel_shuffle_settings_are_checked(synth_dir, tmp_path):
    with pytest.raises(ConfigError, match="needs tags.colour_words"):
        run(_config(synth_dir, tmp_path / "x", "tags.channel_shuffle=0.5"))
    with pytest.raises(ConfigError, match="teal not among the tags"):
        run(_config(synth_dir, tmp_path / "x", "tags.channel_shuffle=0.5", "tags.colour_words=[red,teal]"))
    with pytest.raises(ConfigError, match="from 0 to 1"):
        run(_config(synth_dir, tmp_path / "x", "tags.channel_shuffle=1.5", "tags.colour_words=[red]"))


def test_the_library_knows_no_tag_settings(synth_dir):
    # The tag section belongs to the example's config; `vlmkit train` refuses it as an unknown section.
    from vlmkit.config import load_config

    with pytest.raises(ConfigError, match="tags"):
        load_config(None, [f"data.train={synth_dir / 'train.jsonl'}", "tags.channel_shuffle=0.5"])

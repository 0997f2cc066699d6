"""The tag_groups projector: each token reads its own group's word scores; the vision stage's head, loaded and frozen."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from tests.conftest import TEST_TEXT
from vlmkit.config import load_config
from vlmkit.data.scenes import COLOURS
from vlmkit.errors import ConfigError
from vlmkit.model.modeling import VLMForConditionalGeneration
from vlmkit.model.projectors.tag_groups import HEAD_FILE, TAGS_FILE, TagGroupProjector, group_indices
from vlmkit.train.run import run

TAGS = ("a", "b", "c", "d", "e", "f")
ARGS = {"tags": TAGS, "groups": [["b", "d"], ["a"]], "factor": 2}
TEST_REGNET = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1],
               "groups_width": 8, "layer_type": "y"}


def test_tokens_are_each_groups_pooled_scores_projected_cell_by_cell():
    torch.manual_seed(0)
    projector = TagGroupProjector(8, 16, ARGS, (4, 4), 0).eval()
    assert group_indices(ARGS) == [[1, 3], [0]]
    features = torch.randn(2, 16, 8)
    with torch.no_grad():
        out = projector(features, (4, 4))
        assert out.shape == (2, 4 * 2, 16) and TagGroupProjector.output_tokens((4, 4), 0, ARGS) == 8
        scores = torch.nn.functional.linear(features, projector.head_weight, projector.head_bias).reshape(2, 4, 4, -1)
        for cell in range(4):
            r, c = divmod(cell, 2)
            pooled = scores[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(2, 4, -1).logsumexp(1)  # (crop, tag)
            for g, group in enumerate(group_indices(ARGS)):
                expected = (projector.proj[g](pooled[:, group]) + projector.group_embedding[g]
                            + projector.positions.embedding[cell])
                torch.testing.assert_close(out[:, 2 * cell + g], expected)


def test_with_features_each_cell_starts_with_its_pixel_shuffle_token():
    torch.manual_seed(0)
    projector = TagGroupProjector(8, 16, {**ARGS, "features": True}, (4, 4), 0).eval()
    features = torch.randn(2, 16, 8)
    with torch.no_grad():
        out = projector(features, (4, 4)).reshape(2, 4, 3, 16)  # (crop, cell, token of the cell)
        torch.testing.assert_close(out[:, :, 0], projector.features(features, (4, 4)))
        alone = TagGroupProjector(8, 16, ARGS, (4, 4), 0).eval()
        alone.load_state_dict({k: v for k, v in projector.state_dict().items() if not k.startswith("features.")})
        torch.testing.assert_close(out[:, :, 1:], alone(features, (4, 4)).reshape(2, 4, 2, 16))


def test_a_groups_tokens_do_not_see_the_other_words():
    """The point of the projector: change what the head says about "a" (group 1), or about "c" (no group),
    and the tokens of group 0 and of the features stay as they were."""
    torch.manual_seed(0)
    projector = TagGroupProjector(8, 16, {**ARGS, "features": True}, (4, 4), 0).eval()
    features = torch.randn(3, 16, 8)
    with torch.no_grad():
        before = projector(features, (4, 4)).reshape(3, 4, 3, 16)
        for row in (TAGS.index("a"), TAGS.index("c")):
            projector.head_weight[row].normal_()
            projector.head_bias[row] += 5.0
        after = projector(features, (4, 4)).reshape(3, 4, 3, 16)
    assert torch.equal(before[:, :, :2], after[:, :, :2])  # the features' token and the group of b and d
    assert not torch.allclose(before[:, :, 2], after[:, :, 2])


def test_bad_groups_are_refused_by_name():
    with pytest.raises(ConfigError, match="zebra not among the tower's tags"):
        group_indices({**ARGS, "groups": [["a", "zebra"]]})
    with pytest.raises(ConfigError, match="a group is empty"):
        group_indices({**ARGS, "groups": [["a"], []]})
    with pytest.raises(ConfigError, match="needs projector_args.groups"):
        group_indices({"tags": TAGS})
    with pytest.raises(ConfigError, match="a list of lists of words"):
        group_indices({**ARGS, "groups": ["a", "b"]})  # one flat list, not read letter by letter
    with pytest.raises(ConfigError, match="features must be true or false"):
        group_indices({**ARGS, "features": "yes"})


@pytest.fixture(scope="module")
def tagging_tower(synth_dir, tmp_path_factory):
    """A tower saved by the vision stage, with its tag head and tags, after a few steps."""
    out = tmp_path_factory.mktemp("tower")
    torch.manual_seed(0)
    run(load_config(None, ["train.stage=vision", "train.report_to=[]", "train.batch_size=4", "train.max_steps=3",
                           f"data.train={synth_dir / 'captions.jsonl'}", f"train.output_dir={out}", "model.image_size=32",
                           *[f"model.vision_config.{k}={json.dumps(v)}" for k, v in TEST_REGNET.items()]]))
    return out


def _align(synth_dir, tower, out, *overrides):
    tags = json.loads((tower / TAGS_FILE).read_text())
    colours = [tag for tag in tags if tag in COLOURS]
    assert colours, "the tiny captions name some colours"
    run(load_config(None, ["train.stage=align", "train.report_to=[]", "train.batch_size=4", "train.max_steps=3",
                           f"data.train={synth_dir / 'captions.jsonl'}", f"train.output_dir={out}",
                           f"model.vision={tower}", "model.image_size=32", "model.projector=tag_groups",
                           f"model.projector_args={json.dumps({'factor': 2, 'groups': [colours], 'features': True})}",
                           "model.vocab_size=400", *[f"model.text_config.{k}={json.dumps(v)}" for k, v in TEST_TEXT.items()],
                           *overrides]))
    return tags


def test_align_with_tag_groups_keeps_the_vision_stages_head_frozen_and_reloads_without_the_tower(
        synth_dir, tagging_tower, tmp_path):
    tower = tmp_path / "tower"
    shutil.copytree(tagging_tower, tower)
    head = load_file(str(tower / HEAD_FILE))
    tags = _align(synth_dir, tower, tmp_path / "align")
    shutil.rmtree(tower)  # the saved model must hold all it needs
    model = VLMForConditionalGeneration.from_pretrained(tmp_path / "align").eval()
    assert model.config.projector_args["tags"] == tags
    # Trained for 3 steps, and still exactly the vision stage's head: it is not a parameter at all.
    assert torch.equal(model.projector.head_weight, head["weight"]) and torch.equal(model.projector.head_bias, head["bias"])
    assert not any("head" in name for name, _ in model.projector.named_parameters())
    assert model.tokens_per_crop == 2 * 2 * 2  # a 4x4 grid in cells of 2x2: the features, then the colours
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "align").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels), auto.get_image_features(pixels))


def test_tag_groups_refuses_a_tower_it_cannot_read(synth_dir, tagging_tower, tmp_path):
    base = ["train.stage=align", "train.report_to=[]", "train.max_steps=1", f"data.train={synth_dir / 'captions.jsonl'}",
            f"train.output_dir={tmp_path / 'out'}", "model.image_size=32", "model.projector=tag_groups"]
    untagged = [*base, f"model.projector_args={json.dumps({'groups': [['red']]})}",
                *[f"model.vision_config.{k}={json.dumps(v)}" for k, v in TEST_REGNET.items()]]
    with pytest.raises(ConfigError, match=HEAD_FILE):  # a tower from a config: no tag head at all
        run(load_config(None, untagged))
    with pytest.raises(ConfigError, match="zebra not among the tower's tags.*tags.json"):
        run(load_config(None, [*base, f"model.vision={tagging_tower}",
                               f"model.projector_args={json.dumps({'groups': [['zebra']]})}"]))
    with pytest.raises(ConfigError, match="filled in from the tower's tags.json"):
        run(load_config(None, [*base, f"model.vision={tagging_tower}",
                               f"model.projector_args={json.dumps({'groups': [['red']], 'tags': ['red']})}"]))
    with pytest.raises(ConfigError, match="vision_feature_layer -1, but model.vision_feature_layer is -2"):
        _align(synth_dir, tagging_tower, tmp_path / "layer", "model.vision_feature_layer=-2")
    other = tmp_path / "other"
    shutil.copytree(tagging_tower, other)
    head = load_file(str(other / HEAD_FILE))
    save_file({"weight": head["weight"][:-1].contiguous(), "bias": head["bias"][:-1].contiguous()}, str(other / HEAD_FILE))
    with pytest.raises(ConfigError, match="different runs: re-run the vision stage"):
        _align(synth_dir, other, tmp_path / "short")

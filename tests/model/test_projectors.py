"""Projectors: token counts agree with `output_tokens`, padding never leaks, pixel shuffle layout, tiny VLMs."""

import copy
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmkit.errors import ConfigError, ImageTokenMismatchError
from vlmkit.model.projectors import PROJECTORS, GridPositions, projector_class
from vlmkit.model.projectors.linear import average_pool
from vlmkit.model.projectors.pixel_shuffle import pixel_shuffle
from vlmkit.model.tokens import grid_multiple, image_token_spec, num_image_tokens

VISION_DIM, TEXT_DIM = 8, 16
# Small args so each projector stays tiny; every other arg keeps its default.
ARGS = {"resampler": {"num_queries": 5}, "qformer": {"num_queries": 6}, "pixel_shuffle": {}, "mlp": {},
        "linear": {}, "layernorm_mlp": {}}
VARIANTS = [(name, ARGS.get(name, {})) for name in PROJECTORS] + [
    ("mlp", {"pos_embed": True}),  # learned positions, resized for grids other than the config's
    ("mlp", {"pool": 2, "pos_embed": True}),  # positions on the pooled grid
    ("linear", {"pool": 3}),
    ("pixel_shuffle", {"factor": 3, "hidden_size": 12}),
    ("qformer", {"hidden_size": 24, "heads": 2, "depth": 1, "cross_attention_frequency": 1}),
]
VARIANT_IDS = [f"{name}-{'-'.join(map(str, args.values())) or 'default'}" for name, args in VARIANTS]


def test_every_registered_projector_has_small_test_args():
    assert set(ARGS) == set(PROJECTORS), "add the new projector to ARGS so every test covers it"


@cache
def _projector(name: str, args: tuple, prefix: int):
    """A projector in eval mode with every parameter random (zero-initialised ones included)."""
    torch.manual_seed(0)
    args = dict(args)
    side = 2 * projector_class(name).grid_multiple(args)
    projector = projector_class(name)(VISION_DIM, TEXT_DIM, args, (side, side), prefix).eval()
    with torch.no_grad():
        for p in projector.parameters():
            if not p.any():
                p.normal_()
    return projector


def _features(grids, prefix, pad=0.0):
    """Random features for crops of `grids`, padded to the longest with `pad`."""
    longest = prefix + max(h * w for h, w in grids)
    features = torch.full((len(grids), longest, VISION_DIM), pad)
    for i, (h, w) in enumerate(grids):
        features[i, : prefix + h * w] = torch.randn(prefix + h * w, VISION_DIM)
    return features


@st.composite
def grid_lists(draw, multiple):
    sides = st.integers(1, 4).map(lambda k: k * multiple)
    return draw(st.lists(st.tuples(sides, sides), min_size=1, max_size=3))


@pytest.mark.parametrize(("name", "args"), VARIANTS, ids=VARIANT_IDS)
def test_output_shape_matches_output_tokens(name, args):
    cls = projector_class(name)

    @settings(max_examples=20, deadline=None)
    @given(data=st.data(), prefix=st.sampled_from([0, 1]))
    def check(data, prefix):
        grids = data.draw(grid_lists(cls.grid_multiple(args)))
        projector = _projector(name, tuple(args.items()), prefix)
        with torch.no_grad():
            out = projector(_features(grids, prefix), grids)
            shared = projector(_features(grids[:1] * 2, prefix), grids[0])
        counts = [cls.output_tokens(grid, prefix, args) for grid in grids]
        assert out.shape == (len(grids), max(counts), TEXT_DIM)
        assert shared.shape == (2, counts[0], TEXT_DIM)

    check()


@pytest.mark.parametrize(("name", "args"), VARIANTS, ids=VARIANT_IDS)
def test_scale_output_multiplies_every_token(name, args):
    projector = copy.deepcopy(_projector(name, tuple(args.items()), 1))
    m = projector_class(name).grid_multiple(args)
    grids = [(m, m), (2 * m, m)]
    features = _features(grids, 1)
    with torch.no_grad():
        before = projector(features, grids)
        projector.scale_output_(2.5)
        torch.testing.assert_close(projector(features, grids), 2.5 * before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "args"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_a_crops_tokens_do_not_depend_on_the_crops_batched_with_it(name, args, prefix):
    cls = projector_class(name)
    m = cls.grid_multiple(args)
    grids = [(m, m), (2 * m, 3 * m), (3 * m, 2 * m), (m, 4 * m), (2 * m, 2 * m)]
    projector = _projector(name, tuple(args.items()), prefix)
    torch.manual_seed(1)
    features = _features(grids, prefix, pad=float("nan"))  # padding must not reach any token, not even as NaN
    with torch.no_grad():
        batched = projector(features, grids)
        for i, (h, w) in enumerate(grids):
            alone = projector(features[i : i + 1, : prefix + h * w], (h, w))[0]
            n = cls.output_tokens((h, w), prefix, args)
            assert alone.shape[0] == n
            torch.testing.assert_close(batched[i, :n], alone, atol=1e-6, rtol=0)


def test_pixel_shuffle_equals_an_explicit_loop():
    for (h, w), f in [((4, 6), 2), ((6, 3), 3), ((2, 2), 1)]:
        patches = torch.randn(2, h * w, 3)
        grid = patches.reshape(2, h, w, 3)
        expected = torch.stack([
            torch.stack([torch.cat([grid[c, i * f + a, j * f + b] for a in range(f) for b in range(f)])
                         for i in range(h // f) for j in range(w // f)])
            for c in range(2)
        ])
        assert torch.equal(pixel_shuffle(patches, (h, w), f), expected)


def test_pixel_shuffle_rejects_a_grid_its_factor_does_not_divide():
    cls = projector_class("pixel_shuffle")
    assert cls.output_tokens((6, 4), 1, {}) == 6 and cls.grid_multiple({"factor": 3}) == 3
    with pytest.raises(ConfigError, match="factor 2 needs a patch grid divisible by it, but got a 5x4 grid"):
        cls.output_tokens((5, 4), 0, {})
    with pytest.raises(ConfigError, match="factor 3 needs a patch grid divisible by it, but got a 6x4 grid"):
        cls(VISION_DIM, TEXT_DIM, {"factor": 3}, (6, 4), 0)
    projector = cls(VISION_DIM, TEXT_DIM, {}, (4, 4), 0)
    with pytest.raises(ConfigError, match="3x4 grid"):
        projector(_features([(4, 4), (3, 4)], 0), [(4, 4), (3, 4)])
    with pytest.raises(ConfigError, match="factor must be a positive integer"):
        cls.grid_multiple({"factor": 0})


def test_pooling_averages_each_block_and_keeps_the_prefix():
    for (h, w), f in [((4, 6), 2), ((6, 3), 3), ((2, 2), 1)]:
        patches = torch.randn(2, h * w, 3)
        grid = patches.reshape(2, h, w, 3)
        expected = torch.stack([
            torch.stack([grid[c, i * f : (i + 1) * f, j * f : (j + 1) * f].mean(dim=(0, 1))
                         for i in range(h // f) for j in range(w // f)])
            for c in range(2)
        ])
        torch.testing.assert_close(average_pool(patches, (h, w), f), expected)
    projector = projector_class("linear")(VISION_DIM, TEXT_DIM, {"pool": 2}, (4, 4), 1).eval()
    features = _features([(4, 4)], 1)
    pooled = torch.cat([features[:, :1], average_pool(features[:, 1:], (4, 4), 2)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(projector(features, (4, 4)), projector.linear(pooled))
    cls = projector_class("mlp")
    assert cls.output_tokens((8, 4), 1, {"pool": 4}) == 3 and cls.grid_multiple({"pool": 4}) == 4
    with pytest.raises(ConfigError, match="pool 2 needs a patch grid divisible by it, but got a 5x4 grid; .*args.pool"):
        cls(VISION_DIM, TEXT_DIM, {"pool": 2}, (5, 4), 1)
    with pytest.raises(ConfigError, match="pool must be a positive integer"):
        cls.output_tokens((4, 4), 1, {"pool": 0})


def test_bad_projector_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown projector_type 'nope'; choose one of"):
        projector_class("nope")
    with pytest.raises(ConfigError, match="heads = 3 must be a positive integer dividing"):
        projector_class("resampler")(VISION_DIM, TEXT_DIM, {"heads": 3}, (2, 2), 0)
    with pytest.raises(ConfigError, match="num_queries must be a positive integer"):
        projector_class("qformer").output_tokens((2, 2), 0, {"num_queries": 0})
    with pytest.raises(ConfigError, match="divisible by 4"):
        projector_class("resampler")(VISION_DIM, 18, {}, (2, 2), 0)
    with pytest.raises(ImageTokenMismatchError, match="2 patch grids for 3 image crops"):
        _projector("linear", (), 0)(torch.zeros(3, 4, VISION_DIM), [(2, 2), (2, 2)])
    with pytest.raises(ImageTokenMismatchError, match="4 rows per crop"):
        _projector("linear", (), 0)(torch.zeros(1, 4, VISION_DIM), [(2, 3)])


def test_an_argument_the_projector_does_not_read_is_refused(train_records):
    # YAML's `{factor:2}` (no space) is a key "factor:2" with no value: it once built a model silently.
    from tests.conftest import tiny_model_config
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    cfg = tiny_model_config(projector="pixel_shuffle", projector_args={"factor:2": None, "pos_embed": True})
    with pytest.raises(ConfigError, match=r"\['factor:2'\] mean nothing to the pixel_shuffle projector; it reads"):
        build(cfg, training_texts=lambda: _texts(train_records))


def test_linear_and_mlp_keep_their_parameter_names_and_positions():
    """Saved checkpoints of the first two projectors must keep loading, with the same outputs."""
    names = {n for n, _ in projector_class("linear")(4, 6, {}, (2, 2), 1).named_parameters()}
    assert names == {"linear.weight", "linear.bias"}
    mlp = projector_class("mlp")(4, 6, {"layernorm": True}, (2, 2), 1)
    assert {n for n, _ in mlp.named_parameters()} == {"norm.weight", "norm.bias", "linear_1.weight",
                                                      "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert not dict(projector_class("mlp")(4, 6, {}, (2, 2), 1).named_parameters()).keys() & {"norm.weight"}
    positions = GridPositions((2, 3), 1, 4, enabled=True)
    tokens = torch.randn(2, 7, 4)
    assert torch.equal(positions(tokens, [(2, 3)] * 2), tokens + positions.embedding)


@pytest.mark.parametrize("name", ["linear", "mlp", "pixel_shuffle"])
def test_positions_join_normalised_features_before_the_projection(name):
    """With `pos_embed`, a LayerNorm fixes the features' scale and the positions are added at the
    vision width, so they stay as loud as the content however large a from-scratch tower's
    features grow (added after the projection, they were drowned out)."""
    projector = projector_class(name)(4, 6, {"pos_embed": True}, (2, 2), 0)
    assert {n for n, _ in projector.named_parameters()} >= {"norm.weight", "positions.embedding"}
    assert projector.positions.embedding.shape[-1] == projector.norm.normalized_shape[0]
    assert 0.5 < float(projector.positions.embedding.std()) < 2, "positions start at the normalised features' scale"
    features = torch.randn(1, 4, 4)
    assert torch.allclose(projector(features * 1000, [(2, 2)]), projector(features, [(2, 2)]), atol=1e-4)
    if name != "pixel_shuffle":  # (its one output token covers all four patches)
        same = torch.randn(4).expand(1, 4, 4)
        out = projector(same, [(2, 2)])
        assert not torch.allclose(out[0, 0], out[0, 3]), "identical features at two places must differ"


def test_token_count_helpers_follow_the_projector():
    spec = {"projector_type": "pixel_shuffle", "projector_args": {"factor": 2}, "grid": [4, 4], "prefix": 1,
            "input_size": 32}
    assert num_image_tokens(spec) == 4 and num_image_tokens(spec, (6, 2)) == 3 and grid_multiple(spec) == 2
    spec = {**spec, "projector_type": "mlp", "projector_args": {}}
    assert num_image_tokens(spec) == 17 and num_image_tokens(spec, (2, 3)) == 7 and grid_multiple(spec) == 1
    spec = {**spec, "projector_type": "resampler", "projector_args": {"num_queries": 9}}
    assert num_image_tokens(spec, (5, 7)) == 9


@pytest.fixture(scope="module")
def tokenizer(train_records):
    from tests.conftest import tiny_model_config
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    return build(tiny_model_config(), training_texts=lambda: _texts(train_records)).processor.tokenizer


@pytest.mark.parametrize(("name", "args"), [("layernorm_mlp", {}), ("pixel_shuffle", {}), ("mlp", {"pool": 2}),
                                            ("resampler", {"num_queries": 8}), ("qformer", {"num_queries": 8})])
def test_a_tiny_vlm_with_each_new_projector_trains_and_reloads(name, args, tokenizer, tmp_path):
    from tests.conftest import tiny_model_config
    from vlmkit.model.build import build

    torch.manual_seed(0)
    built = build(tiny_model_config(projector=name, projector_args=args), tokenizer=tokenizer)
    model, processor = built.model.train(), built.processor
    assert model.tokens_per_crop == processor.tokens_per_crop == num_image_tokens(image_token_spec(model.config))
    images = [Image.new("RGB", (32, 32), (200, 30, 10)), Image.new("RGB", (32, 32), (10, 30, 200))]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n<image>\nWhich is red?"}],
                                                   tokenize=False, add_generation_prompt=True)
    inputs = dict(processor(text=text, images=images))
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 2 * model.tokens_per_crop  # native size: one crop each
    loss = model(**inputs, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.any() for g in grads)

    model.eval().save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)

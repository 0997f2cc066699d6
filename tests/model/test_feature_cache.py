"""The frozen encoder's feature cache: exact keys, bounded and detached storage, and when training attaches it."""

import pytest
import torch

from vlmkit.config import TrainConfig
from vlmkit.model.feature_cache import FeatureCache
from vlmkit.train.trainer import cache_frozen_vision


class Model:
    feature_cache = None


def test_the_same_bytes_in_another_shape_are_another_crop():
    crop = torch.arange(24.0).reshape(3, 2, 4)
    assert FeatureCache.key(crop) == FeatureCache.key(crop.clone())
    assert FeatureCache.key(crop) != FeatureCache.key(crop.reshape(3, 4, 2))
    assert FeatureCache.key(crop) != FeatureCache.key(crop.double())


def test_features_are_computed_once_and_stored_as_copies_within_the_bound():
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return pixels.flatten(1).repeat(1, 4)  # 4x the crop's values: 96 floats a crop

    crops = torch.randn(3, 3, 2, 4)
    cache = FeatureCache(max_bytes=2 * 96 * 4)  # room for two crops' features
    first = cache.encode(encode, crops)
    second = cache.encode(encode, crops)
    assert torch.equal(first, encode(crops)) and torch.equal(second, first)
    assert calls[:2] == [3, 1]  # the third crop did not fit, so it is encoded again
    assert cache.stored_bytes == 2 * 96 * 4 and len(cache.features) == 2
    for features in cache.features.values():  # not views holding the whole batch alive
        assert features.untyped_storage().nbytes() == features.nbytes
    cache.clear()
    assert (cache.stored_bytes, len(cache.features)) == (0, 0)


@pytest.mark.parametrize(("settings", "cached"), [
    ({}, True), ({"vision_feature_cache_gb": 0}, False), ({"fsdp": "full_shard auto_wrap"}, False),
    ({"deepspeed": "deepspeed-zero3"}, False), ({"deepspeed": "deepspeed-zero2"}, True)])
def test_training_caches_a_frozen_encoder_unless_its_parameters_are_sharded(settings, cached):
    model = Model()
    cache_frozen_vision(model, {"vision": 0}, TrainConfig(**settings), log=lambda _: None)
    assert (model.feature_cache is not None) == cached
    trained = Model()
    cache_frozen_vision(trained, {"vision": 10}, TrainConfig(), log=lambda _: None)
    assert trained.feature_cache is None

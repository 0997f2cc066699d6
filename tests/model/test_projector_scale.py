"""A new projector's tokens are scaled to the LM's word-embedding norm before training."""

import pytest
import torch

from vlmkit.data.dataset import ConversationDataset
from vlmkit.errors import ConfigError
from vlmkit.model.projector_scale import check_mode, match_word_embedding_norm
from vlmkit.processing.image_processing import concat_image_inputs


def test_image_tokens_get_the_word_embeddings_mean_norm(tiny, train_records):
    model, processor = tiny.model, tiny.processor
    sample = ConversationDataset(train_records[:4], processor, max_length=1024)
    inputs = concat_image_inputs([sample[i] for i in range(len(sample))])
    words = model.get_input_embeddings().weight.norm(dim=-1).mean()
    before, after = match_word_embedding_norm(model, inputs)
    with torch.no_grad():
        tokens = model.get_image_features(**inputs).norm(dim=-1).mean()
    assert abs(before - float(words)) > 0.1 * float(words)  # the default init was off, or this proves nothing
    assert after == pytest.approx(float(words), rel=1e-4) and float(tokens) == pytest.approx(float(words), rel=1e-4)


def test_an_unknown_mode_is_refused():
    check_mode("none")
    with pytest.raises(ConfigError, match="train.projector_init"):
        check_mode("xavier")

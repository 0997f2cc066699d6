"""The embedding model: pooling, normalisation, prefixes, bidirectional attention, MaxSim, save/load."""

import pytest
import torch
from PIL import Image

from tests.retrieval.conftest import make_retriever
from vlmkit.errors import ConfigError
from vlmkit.model import pooling
from vlmkit.model.retriever import VLMRetriever, encode_inputs, score
from vlmkit.processing.processor import VLMProcessor

TEXTS = ["red header with a blue circle", "page with a green bar chart at the top left", "purple"]


def test_pooling_reads_only_real_tokens_whatever_the_padding_side():
    hidden = torch.randn(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left_hidden = torch.stack([torch.cat([hidden[0, 3:], hidden[0, :3]]), hidden[1]])  # row 0 left-padded
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for name, pool in pooling.POOLINGS.items():
        assert torch.allclose(pool(hidden, right), pool(left_hidden, left), atol=1e-6), name
    assert torch.equal(pooling.last(hidden, right)[0], hidden[0, 2])
    weighted = (hidden[0, :3] * torch.tensor([[1.0], [2.0], [3.0]])).sum(0) / 6
    assert torch.allclose(pooling.weighted_mean(hidden, right)[0], weighted)
    with pytest.raises(ConfigError, match="pooling 'max' is not one of"):
        pooling.get_pooling("max")


@pytest.fixture(scope="module")
def page_images():
    return [Image.new("RGB", (24, 32), colour) for colour in ("red", "green", "blue")]


@pytest.mark.parametrize("options", [{}, {"pooling": "mean", "bidirectional": True}, {"pooling": "weighted_mean"},
                                     {"multi_vector_dim": 8}])
def test_embeddings_are_unit_vectors_and_batch_independent(pairs, page_images, options):
    model, processor = make_retriever(TEXTS)
    model = VLMRetriever.from_vlm(model.vlm, **options).eval()
    batch = model(**_inputs(processor, model, queries=TEXTS))
    alone = model(**_inputs(processor, model, queries=TEXTS[2:]))
    if model.config.multi_vector_dim:
        real = batch[2].abs().sum(-1) > 0
        assert torch.allclose(batch[2][real], alone[0][: int(real.sum())], atol=1e-5)
        norms = batch.norm(dim=-1)
        assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    else:
        assert torch.allclose(batch[2], alone[0], atol=1e-5)  # padding never leaks into an embedding
        assert torch.allclose(batch.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model(**_inputs(processor, model, images=page_images)).shape[0] == 3


def _inputs(processor, model, **kwargs):
    return {k: v for k, v in encode_inputs(processor, model.config, **kwargs).items() if k != "crops_per_row"}


def test_bidirectional_attention_lets_early_tokens_see_later_ones():
    model, processor = make_retriever(TEXTS)
    inputs = _inputs(processor, model, queries=["red header", "red circle"])
    causal = model.hidden_states(**inputs)
    assert torch.allclose(causal[0, :2], causal[1, :2])  # "query: red" is shared, and causal
    both = VLMRetriever.from_vlm(model.vlm, bidirectional=True).hidden_states(**inputs)
    assert not torch.allclose(both[0, :2], both[1, :2], atol=1e-4)


def test_prefixes_are_part_of_the_input():
    model, processor = make_retriever(TEXTS)
    plain = _inputs(processor, model, queries=["x"])["input_ids"]
    other = VLMRetriever.from_vlm(model.vlm, query_prefix="Find the page: ")
    assert _inputs(processor, other, queries=["x"])["input_ids"].shape[1] > plain.shape[1]


def test_maxsim_by_hand():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # last query token is padding
    d = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(score(q, d), torch.tensor([[1.0 + 0.8, -1.0 + 0.0]]))  # page padding never wins a max


def test_save_and_load_with_a_convolutional_tower(tmp_path, page_images):
    from tests.conftest import tiny_model_config
    from vlmkit.model.build import build

    torch.manual_seed(0)
    regnet = {"model_type": "regnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
              "groups_width": 8, "layer_type": "y"}
    built = build(tiny_model_config(vision_config=regnet, image_size=32), training_texts=lambda: TEXTS)
    weights = {k: v.clone() for k, v in built.model.state_dict().items()}
    model = VLMRetriever.from_vlm(built.model, pooling="mean", multi_vector_dim=4).eval()
    assert all(torch.equal(weights[k], v) for k, v in model.vlm.state_dict().items())  # wrapping keeps the VLM
    model.save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    loaded, processor = VLMRetriever.from_pretrained(tmp_path).eval(), VLMProcessor.from_pretrained(tmp_path)
    assert loaded.config.pooling == "mean" and loaded.config.multi_vector_dim == 4
    inputs = _inputs(processor, loaded, images=page_images)
    assert torch.allclose(loaded(**inputs), model(**inputs), atol=1e-6)


def test_a_page_can_carry_the_start_of_its_text_layer(tmp_path, page_images):
    from vlmkit.data.page_store import PageStore, PageStoreWriter
    from vlmkit.eval.retrieval import encode_pages

    model, processor = make_retriever(TEXTS)
    reader = VLMRetriever.from_vlm(model.vlm, page_text_tokens=4).eval()
    tokenizer = processor.tokenizer
    texts = ["red header with a blue circle and more words than four", "", "purple <image> <|im_end|> purple"]
    with pytest.raises(ConfigError, match="pass the 3 pages' texts"):
        encode_inputs(processor, reader.config, images=page_images)
    inputs = encode_inputs(processor, reader.config, images=page_images, page_texts=texts)
    image_only = encode_inputs(processor, model.config, images=page_images)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    added = [int(n) for n in mask.sum(1) - image_only["attention_mask"].sum(1)]
    assert added[1] == 0  # a page without a text layer is its image alone
    assert 1 + 4 - 1 <= added[0] <= 1 + 4 + 1  # "\n" and 4 tokens (re-tokenised: give or take one)
    # Markers and control tokens in a text layer are plain words, never a placeholder or an end of turn.
    specials = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens} - {tokenizer.eos_token_id}
    tail = ids[2][mask[2]][-(added[2] + 1):-1].tolist()
    assert tail and not set(tail) & specials
    assert (ids[2] == tokenizer.eos_token_id).sum() == (image_only["input_ids"][2] == tokenizer.eos_token_id).sum()

    # The text changes the page's embedding, and an index built from a store reads the store's texts.
    with_text = reader(**{k: v for k, v in inputs.items() if k != "crops_per_row"})
    without = reader(**_inputs(processor, reader, images=page_images, page_texts=[""] * 3))
    assert not torch.allclose(with_text[0], without[0], atol=1e-4) and torch.allclose(with_text[1], without[1], atol=1e-5)
    store_path = tmp_path / "pages.h5"
    with PageStoreWriter(store_path) as writer:
        for i, (image, text) in enumerate(zip(page_images, texts)):
            image.save(tmp_path / "p.png")
            writer.add(f"p{i}", (tmp_path / "p.png").read_bytes(), {"text": text} if text else {})
    _, indexed = encode_pages(reader, processor, PageStore(store_path), batch_size=2, progress=False)
    assert torch.allclose(indexed, with_text, atol=1e-5)

    reader.save_pretrained(tmp_path / "model")
    assert VLMRetriever.from_pretrained(tmp_path / "model").config.page_text_tokens == 4
    with pytest.raises(ConfigError, match="page_text_tokens must be a whole number"):
        VLMRetriever.from_vlm(model.vlm, page_text_tokens=-1)


def test_a_text_layer_is_clipped_in_the_original_string_with_its_white_space_collapsed():
    from vlmkit.model.retriever import clip_to_tokens, plain_text

    _, processor = make_retriever(TEXTS)
    tokenizer = processor.tokenizer
    for text in ["日本語のテキストです", "red  header\n\n\n  with a blue circle", "é" * 50, ""]:
        words = plain_text(text, tokenizer)
        assert "  " not in words and "\n" not in words
        for n in (1, 3, 7):
            clipped = clip_to_tokens(words, tokenizer, n)
            assert words.startswith(clipped) and "\ufffd" not in clipped
            assert len(tokenizer(clipped, add_special_tokens=False)["input_ids"]) <= n
    assert clip_to_tokens(plain_text("  \n\n real words here", tokenizer), tokenizer, 2).startswith("r")  # white space is no budget
    with pytest.raises(ConfigError, match="page_text_tokens must be a whole number"):
        make_retriever(TEXTS, page_text_tokens=True)

"""VLMProcessor: which tokens are supervised, how many image placeholders, save/load round trip."""

import pytest
import torch
from PIL import Image

from tests.conftest import TEST_VISION, tiny_model_config
from vlmkit.model.tokens import num_image_tokens
from vlmkit.processing.processor import IGNORE_INDEX, VLMProcessor

END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def built(train_records):
    from vlmkit.model.build import build
    from vlmkit.train.run import _texts

    torch.manual_seed(0)
    return build(tiny_model_config(), training_texts=lambda: _texts(train_records))


@pytest.fixture(scope="module")
def processor(built):
    return built.processor


def _images(n):
    return [Image.new("RGB", (24 + 9 * i, 32 - 3 * i), (40 * i, 200, 90)) for i in range(n)]


def _supervised_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of consecutive supervised positions."""
    runs, start = [], None
    for i, supervised in enumerate((labels != IGNORE_INDEX).tolist() + [False]):
        if supervised and start is None:
            start = i
        elif not supervised and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _multi_turn(record):
    """A synth train record's turns, with a system turn in front and a user turn that repeats a reply."""
    turns = [dict(t) for t in record.conversations]
    first_reply = next(t["content"] for t in turns if t["role"] == "assistant")
    return ([{"role": "system", "content": "You answer questions about shapes. Be brief."}] + turns
            + [{"role": "user", "content": first_reply}, {"role": "assistant", "content": "Yes, " + first_reply}])


def test_labels_cover_exactly_the_assistant_replies_and_their_end_of_turn(processor, train_records):
    record = next(r for r in train_records if len(r.images) == 1 and len(r.conversations) >= 6)
    conversation = _multi_turn(record)
    tokenizer = processor.tokenizer
    encoded = processor.encode_conversation(conversation, _images(1))
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids.shape == labels.shape and ids.dtype == labels.dtype == torch.long

    supervised = labels != IGNORE_INDEX
    # Where a label is set it is the input token itself (the LM shifts internally).
    assert torch.equal(labels[supervised], ids[supervised])

    # One contiguous run per assistant turn; each decodes to exactly the reply followed by <|im_end|>
    # (the template's generation block ends after <|im_end|>, so the end-of-turn token is learned,
    # while the "\n" after it and the "<|im_start|>assistant\n" header before it are not).
    replies = [t["content"] for t in conversation if t["role"] == "assistant"]
    runs = _supervised_runs(labels)
    assert [tokenizer.decode(ids[a:b]) for a, b in runs] == [reply + END_OF_TURN for reply in replies]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert all(int(ids[b - 1]) == end_id for _, b in runs)
    assert all(tokenizer.decode(ids[b:b + 1]) == "\n" for _, b in runs)
    assert all(tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n") for a, _ in runs)

    # Nothing else is supervised: the unsupervised remainder holds every system and user text,
    # the image placeholders and every other template token.
    image_id = processor.image_token_id
    assert not supervised[ids == image_id].any()
    assert int((ids == image_id).sum()) == processor.tokens_per_crop
    # The user turn that repeats the first reply word for word stays unsupervised: masking is by
    # position, not by content.
    rest = tokenizer.decode(torch.where(supervised, torch.full_like(ids, tokenizer.pad_token_id), ids))
    for turn in conversation:
        if turn["role"] in ("system", "user"):
            text = turn["content"].replace("<image>", processor.image_text(1))
            assert f"<|im_start|>{turn['role']}\n{text}<|im_end|>" in rest


def test_image_placeholders_inside_an_assistant_turn_are_never_supervised(processor):
    conversation = [{"role": "user", "content": "Show me the picture again."},
                    {"role": "assistant", "content": "Here: <image> that is the one."}]
    encoded = processor.encode_conversation(conversation, _images(1))
    ids, labels = encoded["input_ids"], encoded["labels"]
    placeholders = ids == processor.image_token_id
    assert int(placeholders.sum()) == processor.tokens_per_crop
    assert (labels[placeholders] == IGNORE_INDEX).all()
    supervised_text = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert supervised_text == "Here:  that is the one." + END_OF_TURN


def test_a_generation_prompt_supervises_nothing_and_ends_with_the_assistant_header(processor):
    conversation = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]
    encoded = processor.encode_conversation(conversation, _images(1), add_generation_prompt=True)
    assert (encoded["labels"] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(encoded["input_ids"]).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def full_strategy(built):
    """Same tokenizer, but the vision CLS token is kept ('full'), so one crop is one token more."""
    from vlmkit.model.build import build

    torch.manual_seed(0)
    return build(tiny_model_config(vision_feature_select_strategy="full"), tokenizer=built.processor.tokenizer)


@pytest.mark.parametrize("strategy, prefix", [("default", 0), ("full", 1)])
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_placeholder_count_is_tokens_per_crop_times_images(built, full_strategy, strategy, prefix, n_images):
    model_and_processor = built if strategy == "default" else full_strategy
    processor, model = model_and_processor.processor, model_and_processor.model
    spec = processor.image_token_spec
    per_crop = num_image_tokens(spec)
    # Derived independently of vlmkit: a (32/8)^2 patch grid, plus the CLS token with 'full'.
    assert per_crop == (TEST_VISION["image_size"] // TEST_VISION["patch_size"]) ** 2 + prefix
    # Images spread over several turns, markers in the middle of text.
    conversation = [{"role": "user", "content": "Look: <image> and" + " <image>" * (n_images - 1) + " ok?"},
                    {"role": "assistant", "content": "yes"},
                    {"role": "user", "content": "Count them."}, {"role": "assistant", "content": str(n_images)}]
    encoded = processor.encode_conversation(conversation, _images(n_images))
    ids = encoded["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == per_crop * n_images
    assert encoded["pixel_values"].shape[0] == n_images
    # The model consumes exactly these placeholders (it raises ImageTokenMismatchError otherwise).
    with torch.no_grad():
        out = model.eval()(input_ids=ids[None], pixel_values=encoded["pixel_values"], labels=encoded["labels"][None])
    assert torch.isfinite(out.loss)


def test_save_pretrained_from_pretrained_round_trip_gives_identical_encodings(processor, train_records, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VLMProcessor
    assert loaded.image_token_spec == processor.image_token_spec
    assert loaded.tokens_per_crop == processor.tokens_per_crop
    assert loaded.chat_template == processor.chat_template
    assert loaded.image_token_id == processor.image_token_id
    compare = [r for r in train_records if len(r.images) == 2][:2] + [r for r in train_records if len(r.images) == 1][:3]
    assert len(compare) == 5
    for record in compare:
        images = [Image.open(p).convert("RGB") for p in record.images]
        before = processor.encode_conversation(_multi_turn(record), images)
        after = loaded.encode_conversation(_multi_turn(record), images)
        assert torch.equal(before["input_ids"], after["input_ids"]), record.id
        assert torch.equal(before["labels"], after["labels"]), record.id
        assert torch.equal(before["pixel_values"], after["pixel_values"]), record.id
        assert (before["labels"] != IGNORE_INDEX).any()
    # The transformers-style call (prompt text with markers, images) agrees too.
    prompt = processor.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat?"}], tokenize=False,
                                                     add_generation_prompt=True)
    a, b = processor(text=prompt, images=_images(1)), loaded(text=prompt, images=_images(1))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_data_set_tokenised_in_chunks_equals_each_record_encoded_alone(processor, train_records, monkeypatch):
    import vlmkit.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "TOKENIZE_CHUNK", 3)  # several chunks, one of them short
    records = train_records[:8]
    dataset = dataset_module.ConversationDataset(records, processor, max_length=1024)
    assert [e.record.id for e in dataset.examples] == [r.id for r in records]
    for example, record in zip(dataset.examples, records):
        alone = processor.encode_text(record.conversations, processor.plans(
            [Image.open(path) for path in record.images]))
        assert torch.equal(example.input_ids, alone["input_ids"]) and torch.equal(example.labels, alone["labels"])

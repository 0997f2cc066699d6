"""Assistant masks from chat templates: generation markers detected, prefix rendering for templates without them."""

from __future__ import annotations

import pytest

from vlmkit.errors import ConfigError
from vlmkit.processing.chat_template import assistant_spans, has_generation_markers, tokenize_with_assistant_mask
from vlmkit.processing.tokenizer_training import chat_template, train_tokenizer

# A template without generation markers that, like SmolLM2's, writes a default system line when
# the conversation has none, and a newline after each end-of-turn token.
PLAIN = ("{% if messages[0]['role'] != 'system' %}<|system|>Be brief.<end>\n{% endif %}"
         "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<end>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The same rendering, with the assistant's part marked the way transformers reads it.
MARKED = ("{% if messages[0]['role'] != 'system' %}<|system|>Be brief.<end>\n{% endif %}"
          "{% for m in messages %}<|{{ m['role'] }}|>"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<end>{% endgeneration %}"
          "{% else %}{{ m['content'] }}<end>{% endif %}{{ '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# Renders the last user turn differently, so a prompt is not a prefix of the whole conversation.
LAST_TURN_DIFFERS = ("{% for m in messages %}{% if loop.last and m['role'] == 'user' %}[latest] {% endif %}"
                     "<|{{ m['role'] }}|>{{ m['content'] }}<end>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CHAT = [{"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "And the square?"},
        {"role": "assistant", "content": "Blue, I think."}]
SYSTEM = {"role": "system", "content": "You answer in one sentence."}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [PLAIN, *(turn["content"] for turn in CHAT), SYSTEM["content"]] * 4
    return train_tokenizer(texts, vocab_size=300)


def test_generation_markers_are_detected():
    assert has_generation_markers(MARKED)
    assert has_generation_markers("{%- generation -%}{{ x }}{%- endgeneration -%}")
    assert has_generation_markers(chat_template())  # vlmkit's ChatML marks its replies itself
    assert not has_generation_markers(PLAIN)
    assert not has_generation_markers("{{ 'generation' }} {# generation #}")


@pytest.mark.parametrize("system", [False, True])
def test_spans_cover_each_reply_and_its_end_of_turn_only(tokenizer, system):
    messages = [SYSTEM, *CHAT] if system else CHAT
    text, spans = assistant_spans(tokenizer, PLAIN, messages)
    assert text == tokenizer.apply_chat_template(messages, chat_template=PLAIN, tokenize=False)
    assert [text[start:end] for start, end in spans] == ["It is red.<end>", "Blue, I think.<end>"]
    assert text.endswith("Blue, I think.<end>\n")  # the newline after the last turn is rendered, not supervised


def test_no_assistant_turn_gives_no_spans(tokenizer):
    assert assistant_spans(tokenizer, PLAIN, CHAT[:1])[1] == []


def test_prefix_rendering_masks_what_generation_markers_mark(tokenizer):
    conversations = [CHAT, [SYSTEM, *CHAT], CHAT[:2]]
    ours = tokenize_with_assistant_mask(tokenizer, PLAIN, conversations)
    marked = tokenizer.apply_chat_template(conversations, chat_template=MARKED, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert ours["input_ids"] == marked["input_ids"]
    assert ours["assistant_masks"] == marked["assistant_masks"]
    ids, mask = ours["input_ids"][0], ours["assistant_masks"][0]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "It is red.<end>Blue, I think.<end>"


def test_a_template_that_is_not_prefix_consistent_is_refused(tokenizer):
    with pytest.raises(ConfigError, match=r"growing prefix .*\{% generation %\}"):
        assistant_spans(tokenizer, LAST_TURN_DIFFERS, CHAT)
    with pytest.raises(ConfigError, match="growing prefix"):
        tokenize_with_assistant_mask(tokenizer, LAST_TURN_DIFFERS, [CHAT])

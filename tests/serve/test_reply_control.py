"""StopText, the stop-string cut of a streamed reply: whatever the pieces, the text shown is the
reply up to the stop string that ends first, and nothing past it is ever shown."""

from hypothesis import given, settings
from hypothesis import strategies as st

from vlmkit.serve.openai_schema import MAX_STOP_CHARS, MAX_STOPS
from vlmkit.serve.reply_control import StopText

TEXT = st.text(alphabet="ab \n", max_size=40)


def cut(text: str, stops: list[str]) -> str:
    """`text` up to the start of the stop string that ends first (the longest of those that end there)."""
    for end in range(len(text) + 1):
        if starts := [end - len(s) for s in stops if s and text[:end].endswith(s)]:
            return text[: min(starts)]
    return text


@settings(max_examples=300, deadline=None)
@given(text=TEXT, stops=st.lists(TEXT, max_size=MAX_STOPS), data=st.data())
def test_any_split_into_pieces_shows_exactly_the_text_before_the_first_stop(text, stops, data):
    ends = sorted(data.draw(st.sets(st.integers(0, len(text)))) | {len(text)})
    pieces = [text[start:end] for start, end in zip([0] + ends, ends)]
    stop_text, shown = StopText(stops), ""
    for piece in pieces:
        shown += stop_text.feed(piece)
        assert cut(text, stops).startswith(shown), "text shown that the full reply would cut"
    if not stop_text.hit:
        shown += stop_text.flush()
    assert shown == cut(text, stops)
    assert stop_text.hit == (cut(text, stops) != text)


def test_the_longest_stop_strings_allowed_hold_back_less_than_one_stop_string():
    # What is held back is all that each piece is checked against again: it stays shorter than
    # the longest stop string, whatever the reply's length.
    stops = ["a" * (MAX_STOP_CHARS - 1) + c for c in "bcde"][:MAX_STOPS]
    stop_text, shown = StopText(stops), ""
    for _ in range(2000):
        shown += stop_text.feed("aaaa")
        assert len(stop_text._pending) < MAX_STOP_CHARS
    assert shown + stop_text.flush() == "a" * 8000

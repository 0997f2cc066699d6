"""Controls on one reply: end it early (a stop string, a client that left, Ctrl-C), count its tokens,
and keep `<image>` placeholders out of it.

`stream_reply` runs `generate` in a worker thread; breaking out of its text stream would
leave that thread generating. Settings that carry a `Watch` make `generate` itself stop at
the next token once the watch is cancelled, and the watch counts the tokens on the way.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlmkit.config import GenerationSettings


class Watch(StoppingCriteria):
    """A stopping criterion that counts generated tokens and stops generation once cancelled."""

    def __init__(self):
        self.tokens = 0
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.tokens += 1  # generate() asks once per new token
        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


@dataclass
class ReplySettings(GenerationSettings):
    """Decoding settings for one reply, with the watch that can stop it and the tokens it may not produce."""

    watch: Watch = field(default_factory=Watch)
    # A generated <image> token would be taken for a placeholder on the next step, which has
    # no pixels for it (ImageTokenMismatchError); random or high-temperature models do emit it.
    suppressed: tuple[int, ...] = ()

    @classmethod
    def of(cls, settings: GenerationSettings, processor) -> ReplySettings:
        fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GenerationSettings)}
        return cls(**fields, suppressed=(processor.image_token_id,))

    def generate_kwargs(self) -> dict:
        return super().generate_kwargs() | {"stopping_criteria": StoppingCriteriaList([self.watch]),
                                            "suppress_tokens": list(self.suppressed)}


class StopText:
    """Cuts streamed text before the first stop string, holding back any tail that may start one.

    Not transformers' `generate(stop_strings=...)`: its StopStringCriteria only ends generation,
    leaving the stop string (and the rest of the token that completes it) in the text, and its
    streamer holds nothing back, so this class would stay all the same. It also builds a table
    over the whole vocabulary for each new set of stop strings (SmolLM2's 49k tokens: 0.2 to
    0.8 s and up to about 60 MiB, eight sets kept in a module-level cache), a cost a server
    cannot take from every request. vLLM too matches stop strings in the decoded text.
    Its own cost per piece grows with the square of a stop string's length, hence the API's limit.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hit = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        """The part of the text so far that is safe to show now."""
        if self.hit:
            return ""
        text = self._pending + piece
        # The stop string that ends first wins, as if generation had been checked at every character,
        # so that where the pieces were split does not change the reply.
        found = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            self.hit, self._pending = True, ""
            return text[: min(found)[1]]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._pending = text[len(text) - keep:]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest

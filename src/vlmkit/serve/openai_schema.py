"""OpenAI's chat-completions request format: checked strictly, then turned into a vlmkit `Job`.

The `openai` package describes requests only as TypedDicts for its client, with none of the
ranges and none of the limits a server must enforce, so requests are checked against the
pydantic models here; responses are built with the package's own types (`vlmkit.serve.api`).
Every problem becomes an `ApiError` in OpenAI's error shape, with a 4xx status. Images come
only as data: URLs: a server that fetched http(s) addresses for its clients could be steered
at internal services (server-side request forgery), so it refuses them with a clear message.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Literal

from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlmkit.config import GenerationSettings
from vlmkit.data.records import parse_json_line
from vlmkit.errors import DataError, VlmkitError
from vlmkit.processing.images import open_image
from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.serve.engine import Job

DEFAULT_MAX_TOKENS = 256  # when a request names none (and the context has room)
MAX_IMAGES = 8  # per request
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # per stop string: far beyond any real end marker, and the held-back text stays short
# Characters one token may stand for, at most, as far as the prompt-length check is concerned. Real
# text averages 3 to 5 per token; a prompt over context x 16 characters is refused before it is
# tokenised, since tokenising takes hundreds of bytes per character (10 MB of text: 3.6 GB).
MAX_CHARS_PER_TOKEN = 16


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        error = ErrorObject(message=self.message, type=self.kind, param=self.param, code=self.code)
        return {"error": error.model_dump(exclude_unset=True)}


class _Strict(BaseModel):
    # strict: "0.5" is not a number and "true" not a boolean; unknown fields are ignored, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_slices: int | None = Field(None, ge=1)  # vlmkit's own: fewer image slices (extra_body={"max_slices": 2})
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64
    dimensions: int | None = None


MAX_EMBEDDING_INPUTS = 256


def parse(body: bytes, schema: type[_Strict]) -> _Strict:
    """The request body as `schema`, or a 400 that says what is wrong and where."""
    try:
        data = parse_json_line(body)  # every way JSON can fail to read (depth, digits, bytes) is a DataError
        # JSON may escape half of a UTF-16 pair ("\ud800"), which is no text: refused here, not by the tokenizer.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except DataError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err.problem}", code="invalid_json") from None
    except UnicodeEncodeError as err:
        raise ApiError(400, f"the request body holds a lone surrogate ({err.object[err.start:err.end]!a}), "
                            "which is not Unicode text", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = [f"{_where(e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:3]]
        raise ApiError(400, "; ".join(problems), param=_where(err.errors()[0]["loc"]) or None) from None


def _where(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def decode_image(url: str, param: str, max_pixels: int):
    """The PIL image of a data: URL; http(s) and anything else unreadable is a 400."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        raise ApiError(400, "this server does not fetch images from http(s) URLs; send the image inline as "
                            "data:image/png;base64,...", param, code="image_url_not_allowed")
    header, comma, payload = url.partition(",")
    if scheme != "data" or not comma or not header.endswith(";base64"):
        raise ApiError(400, "image_url must be a base64 data: URL such as data:image/png;base64,...", param,
                       code="invalid_image_url")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: URL's payload is not valid base64", param, code="invalid_image_url") from None
    try:
        return open_image(raw, max_pixels=max_pixels)
    except VlmkitError as err:
        raise ApiError(400, str(err), param, code="invalid_image") from None


def checked_text(text: str, special_tokens: set[str], param: str) -> str:
    """`text`, unless it spells a special token (an <image> placeholder, a chat-turn marker)."""
    if found := [t for t in special_tokens if t in text]:
        raise ApiError(400, f"text may not contain the special token {found[0]!r}; send images as image_url parts",
                       param, code="special_token_in_text")
    return text


def check_length(chars: int, context: int, param: str, what: str) -> None:
    """A 400 for text whose characters alone show that it cannot fit the context (no tokenising needed)."""
    if chars > context * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"{what} {chars} characters, more than this model's context of {context} tokens can "
                            f"hold (at most {context * MAX_CHARS_PER_TOKEN}, {MAX_CHARS_PER_TOKEN} per token)", param,
                       code="context_length_exceeded")


def text_chars(message: Message) -> int:
    """The characters of a message's text (image parts not counted)."""
    if isinstance(message.content, str):
        return len(message.content)
    return sum(len(part.text) for part in message.content if isinstance(part, TextPart))


def to_job(request: ChatRequest, special_tokens: set[str], max_pixels: int, context: int) -> Job:
    """vlmkit messages (image parts become `<image>` markers in place), decoded images and stop strings."""
    stop = stop_strings(request)  # before any image is decoded
    check_length(sum(map(text_chars, request.messages)), context, "messages", "the messages hold")  # before tokenising
    messages, images = [], []
    for i, message in enumerate(request.messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        text = ""
        for j, part in enumerate(parts):
            param = f"messages[{i}].content" + ("" if isinstance(message.content, str) else f"[{j}]")
            if isinstance(part, TextPart):
                text += checked_text(part.text, special_tokens, param)
                continue
            if message.role != "user":
                raise ApiError(400, "only user messages may carry images", param)
            if len(images) == MAX_IMAGES:
                raise ApiError(400, f"at most {MAX_IMAGES} images per request", param)
            images.append(decode_image(part.image_url.url, param, max_pixels))
            text += IMAGE_MARKER + "\n"  # as vlmkit's training data places markers
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", f"messages[{len(messages) - 1}].role")
    return Job(messages, images, settings(request), stop)


def stop_strings(request: ChatRequest) -> list[str]:
    """The request's stop strings: at most MAX_STOPS, each at most MAX_STOP_CHARS long, or a 400 naming the one."""
    single = isinstance(request.stop, str)
    stop = [request.stop] if single else list(request.stop or [])
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop sequences, not {len(stop)}", "stop")
    for i, text in enumerate(stop):
        if len(text) > MAX_STOP_CHARS:
            param = "stop" if single else f"stop[{i}]"
            message = f"a stop sequence may have at most {MAX_STOP_CHARS} characters; {param} has {len(text)}"
            raise ApiError(400, message, param, code="stop_too_long")
    return stop


def settings(request: ChatRequest) -> GenerationSettings:
    """OpenAI semantics: temperature 0 is greedy; temperature and top_p default to 1 (plain sampling)."""
    temperature = 1.0 if request.temperature is None else request.temperature
    return GenerationSettings(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS,
        do_sample=temperature > 0, temperature=temperature or 1.0, top_p=request.top_p or 1.0, top_k=0,
        seed=request.seed, max_slices=request.max_slices,
    )


def embedding_texts(request: EmbeddingRequest, special_tokens: set[str], context: int) -> list[str]:
    """The texts to embed, checked: 1 to MAX_EMBEDDING_INPUTS non-empty strings, none beyond the context."""
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} texts, not {len(texts)}", "input")
    for i, text in enumerate(texts):
        check_length(len(text), context, f"input[{i}]", "the input has")
        if not text.strip():
            raise ApiError(400, "an input text is empty", f"input[{i}]")
        checked_text(text, special_tokens, f"input[{i}]")
    return texts

"""The OpenAI wire format: request schemas, response bodies (the ``openai`` package's own types) and errors.

Requests are parsed leniently (OpenAI clients send fields this server does not use) but range-checked: a bad value
is an HTTP 400 naming the field, as OpenAI answers. Responses are built from ``openai.types`` and written with only
the fields set here (:func:`to_json`), so a newer ``openai`` release adding optional fields changes nothing on the
wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChatChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

FinishReason = Literal["stop", "length"]

# ----------------------------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class StreamOptions(_Lenient):
    include_usage: bool = False
    """Send a last chunk with ``usage`` (and no choices) before ``[DONE]``."""


class SamplingRequest(_Lenient):
    """Fields shared by completion and chat requests: sampling, streaming and the edlm decoding extensions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """OpenAI's range [0, 2] (the library would take any t >= 0); 0 is greedy."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    """edlm extension: confidence a token needs to be committed."""
    block_size: int | None = Field(None, ge=1)
    """edlm extension: decoding block size (a multiple or divisor of the training block)."""
    mode: Literal["diffusion", "ar", "speculative"] | None = None
    """edlm extension: decoding mode; ``speculative`` gives the ``ar`` output (greedy) in fewer forwards."""


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Lenient):
    type: str = "text"
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ----------------------------------------------------------------------------------------------- responses


class CompletionChunkChoice(CompletionChoice):
    finish_reason: FinishReason | None = None  # type: ignore[assignment]
    """None until the last text chunk: OpenAI streams ``null`` here, which the SDK's ``CompletionChoice`` omits."""


class CompletionChunk(Completion):
    """A streamed ``/v1/completions`` event (the SDK parses it as a :class:`openai.types.Completion`)."""

    choices: list[CompletionChunkChoice]  # type: ignore[assignment]


def to_json(payload: BaseModel) -> dict[str, Any]:
    """A response body: the fields that were set, nested models included (None values kept)."""
    return payload.model_dump(mode="json", exclude_unset=True)


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def model_list(model_id: str, created: int) -> dict[str, Any]:
    """``GET /v1/models`` (OpenAI's list envelope around :class:`openai.types.Model` cards)."""
    card = Model(id=model_id, object="model", created=created, owned_by="edlm")
    return {"object": "list", "data": [to_json(card)]}


@dataclass
class CompletionBodies:
    """Bodies of one ``/v1/completions`` response: the whole one, or its stream of chunks."""

    id: str
    created: int
    model: str
    prefix: ClassVar[str] = "cmpl"
    chunk_type: ClassVar[type[BaseModel]] = CompletionChunk
    chunk_object: ClassVar[str] = "text_completion"

    def head(self) -> BaseModel | None:
        """The chunk sent before any text (none here)."""
        return None

    def chunk(self, text: str | None, finish: FinishReason | None) -> BaseModel:
        return self._chunk([CompletionChunkChoice(index=0, text=text or "", finish_reason=finish, logprobs=None)])

    def usage_chunk(self, counts: CompletionUsage) -> BaseModel:
        return self._chunk([], counts)

    def _chunk(self, choices: list, counts: CompletionUsage | None = None) -> BaseModel:
        return self.chunk_type(id=self.id, object=self.chunk_object, created=self.created, model=self.model,
                               choices=choices, usage=counts)

    def whole(self, text: str, finish: FinishReason, counts: CompletionUsage) -> BaseModel:
        choice = CompletionChoice(index=0, text=text, finish_reason=finish, logprobs=None)
        return Completion(id=self.id, object="text_completion", created=self.created, model=self.model,
                          choices=[choice], usage=counts)


@dataclass
class ChatBodies(CompletionBodies):
    """Bodies of one ``/v1/chat/completions`` response; a stream opens with the assistant's role."""

    prefix: ClassVar[str] = "chatcmpl"
    chunk_type: ClassVar[type[BaseModel]] = ChatCompletionChunk
    chunk_object: ClassVar[str] = "chat.completion.chunk"

    def head(self) -> BaseModel | None:
        return self.chunk("", None, role="assistant")

    def chunk(self, text: str | None, finish: FinishReason | None,
              role: Literal["assistant"] | None = None) -> BaseModel:
        delta = ChoiceDelta(role=role, content=text)
        return self._chunk([ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=None)])

    def whole(self, text: str, finish: FinishReason, counts: CompletionUsage) -> BaseModel:
        choice = ChatChoice(index=0, message=ChatCompletionMessage(role="assistant", content=text),
                            finish_reason=finish, logprobs=None)
        return ChatCompletion(id=self.id, object="chat.completion", created=self.created, model=self.model,
                              choices=[choice], usage=counts)


# ----------------------------------------------------------------------------------------------- errors


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "server_unavailable"}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error body."""
    return {"error": to_json(ErrorObject(message=message, type=kind, param=param, code=code))}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


class ApiError(Exception):
    """An error answered in the OpenAI format ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

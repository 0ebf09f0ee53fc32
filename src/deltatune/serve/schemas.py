"""The request bodies the server reads (OpenAI's and vLLM's field names) and OpenAI's error shape.

A field the server cannot honour (n > 1, logprobs, echo, penalties) is refused with a 400 naming it rather
than silently ignored; fields that change nothing here (user, metadata ...) are accepted and ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answer: HTTP status, message, the request field at fault (OpenAI's `param`)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> ApiError:
    """The first problem of a body, naming its field as a dotted path (`messages.0.role`)."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Decoding(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return stops

    @field_validator("n")
    @classmethod
    def _one(cls, value):
        if value != 1:
            raise ValueError("only n=1 is served (send the request again for another answer)")
        return value

    @field_validator("logprobs", "presence_penalty", "frequency_penalty")
    @classmethod
    def _not_served(cls, value):
        if value:
            raise ValueError("not served (leave it unset)")
        return value

    def sampling(self) -> tuple[float, float]:
        return (1.0 if self.temperature is None else self.temperature), (1.0 if self.top_p is None else self.top_p)


class CompletionRequest(_Decoding):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("at least one prompt")
        return prompts

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value):
        if value:
            raise ValueError("echo is not served")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Decoding):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class LoadLoraRequest(_Body):  # vLLM's /v1/load_lora_adapter body
    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Body):  # vLLM's /v1/unload_lora_adapter body
    lora_name: str

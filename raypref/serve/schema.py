"""The HTTP API's request / response bodies and the checks that need the served preferences.

Shape and range checks live in the pydantic models (FastAPI answers 422 naming the field);
the checks that depend on what is served (preference names, the weights' sum, the prompt's
token length) raise ``InvalidField``, which the app turns into a 422 of the same form.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from raypref.serve.soup_model import GREEDY_BELOW_TEMPERATURE

MAX_PROMPT_CHARS = 8000
MAX_TEMPERATURE = 2.0
MAX_PREFERENCE_KEYS = 64  # a request naming more preferences is refused before anything is looked up
MAX_BODY_BYTES = 128 * 1024  # request bodies over this are answered 413 unread
SUM_TOLERANCE = 1e-6
Weight = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class InvalidField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.field.split(".")], "msg": self.message, "type": "value_error"}]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user's prompt")
    preferences: dict[str, Weight] = Field(
        min_length=1, max_length=MAX_PREFERENCE_KEYS,
        description="soup weights by preference name; sum to 1 unless normalize")
    max_new_tokens: int | None = Field(None, ge=1, description="at most the server's limit (GET /v1/preferences); "
                                                               "default min(32, that limit)")
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=f"0 = greedy; below {GREEDY_BELOW_TEMPERATURE} also greedy")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed (same seed, same text)")
    normalize: bool = Field(False, description="divide the weights by their sum instead of requiring sum 1")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is blank")
        return v


class GenerateResponse(BaseModel):
    text: str
    weights: dict[str, float] = Field(description="the normalized weights used, every served preference")
    model_version: str
    served_by: str = Field(description="'soup' (per-request weights) or 'cache' (a materialized merge)")
    token_ids: list[int] = Field(description="the generated token ids (ending at eos if one came)")


class PreferencesResponse(BaseModel):
    preferences: list[str]
    run: str = Field(description="the served run (training key); no server paths are disclosed")
    model_version: str
    max_new_tokens: int
    max_prompt_tokens: int


def soup_weights(req: GenerateRequest, names: list[str]) -> tuple[float, ...]:
    """The request's weights ordered like ``names`` (absent names 0), normalized if asked."""
    unknown = sorted(set(req.preferences) - set(names))
    if unknown:  # name a few, not all: the echo stays small whatever was sent
        shown = [n[:40] for n in unknown[:5]] + (["..."] if len(unknown) > 5 else [])
        raise InvalidField("preferences", f"unknown preference(s) {shown}; served: {names}")
    try:
        total = math.fsum(req.preferences.values())
    except OverflowError:  # finite weights whose sum is not (e.g. 1e308 + 1e308)
        raise InvalidField("preferences", "weights are too large to sum; send weights of at most 1e300") from None
    if not math.isfinite(total) or total <= 0:
        raise InvalidField("preferences", f"weights must have a positive, finite sum, got {total}")
    if not req.normalize and abs(total - 1.0) > SUM_TOLERANCE:
        raise InvalidField("preferences", f"weights sum to {total!r}, not 1; send normalize=true to rescale")
    return tuple(req.preferences.get(n, 0.0) / total for n in names)


def check_lengths(req: GenerateRequest, prompt_tokens: int, max_new_tokens: int, max_prompt_tokens: int,
                  max_positions: int) -> None:
    """Limits of this server and of the model's context (prompt + new tokens)."""
    if req.max_new_tokens > max_new_tokens:
        raise InvalidField("max_new_tokens", f"{req.max_new_tokens} is over this server's limit {max_new_tokens}")
    if prompt_tokens > max_prompt_tokens:
        raise InvalidField("prompt", f"{prompt_tokens} tokens, over this server's limit {max_prompt_tokens}")
    if prompt_tokens + req.max_new_tokens > max_positions:
        raise InvalidField("max_new_tokens", f"prompt ({prompt_tokens} tokens) + max_new_tokens "
                                             f"({req.max_new_tokens}) exceeds the model's context {max_positions}")


# ------------------------------------------------------------ OpenAI-compatible chat completions

MAX_MESSAGES = 64


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completions request this server honours; other OpenAI fields
    are refused (422) rather than silently ignored. ``preferences`` (an extra body field: the
    ``openai`` client's ``extra_body``) are the soup weights, as in ``/v1/generate``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=255, description="a served run (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="as /v1/generate's max_new_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=f"OpenAI's default 1; 0 (or below {GREEDY_BELOW_TEMPERATURE}) is greedy")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, max_length=256)
    preferences: dict[str, Weight] | None = Field(
        None, min_length=1, max_length=MAX_PREFERENCE_KEYS,
        description="soup weights by preference name (default: equal weights over the served preferences)")
    normalize: bool = False

    def prompt(self) -> str:
        """The text the policies see. The tiny models have no chat template: the last user
        message is the prompt. (Integration point: with a tokenizer that has one, build it with
        raypref.models.chat from all the messages.)"""
        users = [m.content for m in self.messages if m.role == "user"]
        if not users:
            raise InvalidField("messages", "no message with role 'user'")
        return users[-1]

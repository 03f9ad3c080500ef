"""The request bodies of /v1/completions and /v1/chat/completions, read and checked.

A field of the wrong JSON type is a `TypeError` (the server answers 422); a value out of range
is a `ConfigError` (400); the sampling settings get `generate`'s checks once the model is known
(`Service.rows`).
Defaults are OpenAI's (temperature 1, top_p 1, n 1, 16 tokens for a completion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .chat import CHAT_STOP, chat_prompt


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's flags set them."""

    max_tokens: int = 512
    max_n: int = 8
    max_rows: int = 16  # prompts x n
    max_body: int = 1 << 20  # bytes
    max_stop: int = 4
    max_logprobs: int = 20


@dataclass
class Request:
    """A completion to make, from either endpoint: prompts (texts or token ids) and settings."""

    model: str | None
    prompts: list[str | list[int]]
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    chat: bool = False


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """`body[name]` if it is of JSON type `kind` (an int is a number too), `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise TypeError(f"{name} must be {_NAMES[kind]}, got {type(value).__name__} {value!r}"[:200])
    return value


def _prompts(value: Any) -> list[str | list[int]]:
    """A prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            return [list(v) for v in value]
    if isinstance(value, list) and not value:
        raise ConfigError("prompt must not be an empty list")
    raise TypeError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")


def _stop(value: Any, limits: Limits) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a string or a list of strings")
    if len(stops) > limits.max_stop:
        raise ConfigError(f"stop takes at most {limits.max_stop} strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ConfigError("stop strings must not be empty")
    return tuple(stops)


def _common(body: dict[str, Any], limits: Limits, prompts: list[str | list[int]]) -> Request:
    """The settings both endpoints share, checked."""
    stream_options = field(body, "stream_options", dict, {})
    req = Request(
        model=field(body, "model", str), prompts=prompts, max_tokens=field(body, "max_tokens", int),
        temperature=field(body, "temperature", float, 1.0), top_p=field(body, "top_p", float),
        top_k=field(body, "top_k", int), n=field(body, "n", int, 1),
        stop=_stop(body["stop"], limits) if body.get("stop") is not None else (),
        seed=field(body, "seed", int), stream=field(body, "stream", bool, False),
        include_usage=field(stream_options, "include_usage", bool, False))
    if req.max_tokens is not None:
        if req.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {req.max_tokens}")
        if req.max_tokens > limits.max_tokens:
            raise ConfigError(f"max_tokens is {req.max_tokens}, over this server's cap of {limits.max_tokens}")
    if not 1 <= req.n <= limits.max_n:
        raise ConfigError(f"n must be in [1, {limits.max_n}] (this server's cap), got {req.n}")
    if len(prompts) * req.n > limits.max_rows:
        raise ConfigError(f"{len(prompts)} prompts x n={req.n} is over this server's cap of "
                          f"{limits.max_rows} sequences per request")
    return req


def _logprobs(k: int | None, name: str, limits: Limits) -> int | None:
    if k is not None and not 0 <= k <= limits.max_logprobs:
        raise ConfigError(f"{name} must be in [0, {limits.max_logprobs}], got {k}")
    return k


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion(body: Any, limits: Limits) -> Request:
    """A /v1/completions body (`prompt`, `echo`, `logprobs` as a count, and the shared settings)."""
    body = _object(body)
    if body.get("prompt") is None:
        raise TypeError("prompt is required")
    req = _common(body, limits, _prompts(body["prompt"]))
    req.max_tokens = 16 if req.max_tokens is None else req.max_tokens
    req.logprobs = _logprobs(field(body, "logprobs", int), "logprobs", limits)
    req.echo = field(body, "echo", bool, False)
    return req


def parse_chat(body: Any, limits: Limits) -> Request:
    """A /v1/chat/completions body: `messages` turned into one prompt by the chat template."""
    body = _object(body)
    messages = field(body, "messages", list)
    if messages is None:
        raise TypeError("messages is required")
    req = _common(body, limits, [chat_prompt(messages)])
    req.chat = True
    req.stop = req.stop + CHAT_STOP
    if field(body, "logprobs", bool, False):
        req.logprobs = _logprobs(field(body, "top_logprobs", int, 0), "top_logprobs", limits)
    return req

"""OpenAI's response shapes: completions, chat completions, their stream chunks, usage, logprobs,
and the error object `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import time
import uuid
from typing import Any

import tiktoken

from .rows import Event, TokenInfo
from .schemas import Request

_ERRORS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
           404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
           413: ("invalid_request_error", "request_too_large"), 422: ("invalid_request_error", "invalid_type"),
           500: ("server_error", None), 503: ("server_error", "server_overloaded")}
PARAMS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "logprobs", "top_logprobs", "echo")


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The error object for an HTTP status; `param` is the request field the message starts with."""
    kind, default_code = _ERRORS.get(status, ("invalid_request_error", None))
    first = message.split(" ", 1)[0]
    return {"error": {"message": message, "type": kind, "param": first if first in PARAMS else None,
                      "code": code or default_code}}


class Reply:
    """Builds one request's response, or its stream chunks, from the engine's events."""

    def __init__(self, req: Request, model: str, tokenizer: tiktoken.Encoding, prompts: list[list[int]]) -> None:
        self.req, self.model, self.tokenizer, self.prompts = req, model, tokenizer, prompts
        self.id = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        n_rows = len(prompts) * req.n
        self.texts = [""] * n_rows
        self.infos: list[list[TokenInfo]] = [[] for _ in range(n_rows)]
        self.finish: list[str | None] = [None] * n_rows
        self.generated = [0] * n_rows
        self.started = [False] * n_rows  # chat: the reply's leading whitespace is dropped

    def prompt_text(self, row: int) -> str:
        return self.tokenizer.decode(self.prompts[row // self.req.n])

    def add(self, event: Event) -> str:
        """Record an event; the text it adds to its choice (with `echo`, the prompt comes first)."""
        i, text = event.row, event.text
        if self.req.chat and not self.started[i]:
            text = text.lstrip()
            self.started[i] = bool(text)
        if self.req.echo and not self.texts[i] and not self.infos[i]:
            text = self.prompt_text(i) + text
        self.texts[i] += text
        self.infos[i] += event.tokens
        if event.finish is not None:
            self.finish[i], self.generated[i] = event.finish, event.completion_tokens
        return text

    def usage(self) -> dict[str, int]:
        prompt = sum(map(len, self.prompts))
        completion = sum(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion" if self.req.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if chunk and self.req.chat else ""),
                "created": self.created, "model": self.model}

    def logprobs(self, infos: list[TokenInfo]) -> dict[str, Any] | None:
        """`logprobs` of a choice in the endpoint's format (None when not asked for)."""
        if self.req.logprobs is None:
            return None
        piece = self.tokenizer.decode_single_token_bytes
        if self.req.chat:
            def entry(token_id: int, lp: float | None) -> dict[str, Any]:
                raw = piece(token_id)
                return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}
            return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                                for t in infos]}
        def text(token_id: int) -> str:
            return piece(token_id).decode("utf-8", "replace")
        tokens = [text(t.token_id) for t in infos]
        offsets = [sum(map(len, tokens[:k])) for k in range(len(tokens))]
        top = [{text(i): lp for i, lp in t.top} if t.logprob is not None else None for t in infos]
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in infos],
                "top_logprobs": top if self.req.logprobs else None, "text_offset": offsets}

    def _choice(self, i: int, text: str, infos: list[TokenInfo], finish: str | None, chunk: bool) -> dict:
        if not self.req.chat:
            return {"index": i, "text": text, "logprobs": self.logprobs(infos), "finish_reason": finish}
        message = {"role": "assistant", "content": text} if not chunk else ({"content": text} if text else {})
        return {"index": i, ("delta" if chunk else "message"): message, "logprobs": self.logprobs(infos),
                "finish_reason": finish}

    def response(self) -> dict[str, Any]:
        choices = [self._choice(i, self.texts[i], self.infos[i], self.finish[i], chunk=False)
                   for i in range(len(self.texts))]
        return {**self._head(), "choices": choices, "usage": self.usage()}

    def chunk(self, event: Event, text: str) -> dict[str, Any]:
        """The stream chunk of one event (its new text, tokens and finish reason)."""
        return {**self._head(chunk=True), "choices": [self._choice(event.row, text, event.tokens, event.finish,
                                                                   chunk=True)]}

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role."""
        if not self.req.chat:
            return []
        return [{**self._head(chunk=True), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]}
                for i in range(len(self.texts))]

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._head(chunk=True), "choices": [], "usage": self.usage()}

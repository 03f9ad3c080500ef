"""Serving a GPTModel over HTTP: an OpenAI-compatible API with streaming and continuous batching,
and a browser playground. `python -m minigpt.serve` (`minigpt.cli.serve`) runs it.

`Engine` (no web dependency) decodes every request in flight as one batch on the KV cache;
`create_app` wraps a model in the Starlette app (the `serve` extra).
"""

from __future__ import annotations

from typing import Any

import tiktoken

from ..errors import require
from ..model import GPTModel
from .chat import CHAT_STOP, chat_prompt
from .engine import Engine
from .rows import RowSpec
from .schemas import Limits
from .service import Service


def create_app(model: GPTModel, tokenizer: tiktoken.Encoding, name: str = "minigpt", limits: Limits | None = None,
               max_batch: int = 8, api_key: str | None = None) -> Any:
    """The ASGI app serving `model` as `name`; `app.state.service.close()` stops its engine."""
    require("starlette", "serve", "the server")
    from .app import build_app  # the web stack is imported only when an app is made

    return build_app(Service(model, tokenizer, name, limits, max_batch, api_key))


__all__ = ["CHAT_STOP", "Engine", "Limits", "RowSpec", "Service", "chat_prompt", "create_app"]

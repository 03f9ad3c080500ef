"""The HTTP app (Starlette): OpenAI's routes, the playground page, errors in OpenAI's shape.

Routes: `GET /` (the playground), `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
`POST /v1/completions`, `POST /v1/chat/completions`, and `POST /v1/attention` (the
playground's heatmap). With an API key every `/v1` route wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .responses import Reply, error_body
from .schemas import Limits, Request, field, parse_chat, parse_completion
from .service import Service


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status)


async def _http_error(request: HTTPRequest, exc: Exception) -> Response:
    return _error(getattr(exc, "status_code", 500), str(getattr(exc, "detail", exc)))


async def _server_error(request: HTTPRequest, exc: Exception) -> Response:
    return _error(500, f"internal error: {type(exc).__name__}")


def _service(request: HTTPRequest) -> Service:
    """The app's service, once the request's API key (when one is set) is right."""
    service: Service = request.app.state.service
    if service.api_key is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
    return service


async def _body(request: HTTPRequest, service: Service) -> Any:
    """The JSON body, read no further than the size limit (413 beyond it)."""
    limit = service.limits.max_body
    too_large = f"request body is over this server's limit of {limit} bytes"
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, too_large)
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, too_large)
    try:
        return json.loads(data)
    except ValueError as e:
        raise HTTPException(400, f"the request body is not valid JSON: {e}") from None


Parser = Callable[[Any, Limits], Request]


def _checked(parse: Parser, body: Any, service: Service) -> Request:
    try:
        req = parse(body, service.limits)
    except TypeError as e:
        raise HTTPException(422, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    if req.model is not None and req.model != service.name:
        raise HTTPException(404, f"model {req.model!r} does not exist; this server serves {service.name!r}")
    return req


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _generate(request: HTTPRequest, parse: Parser) -> Response:
    service = _service(request)
    req = _checked(parse, await _body(request, service), service)
    try:
        encoded = service.rows(req)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    queued = service.submit(encoded.specs)
    if queued is None:
        raise HTTPException(503, "the server is busy: too many requests waiting; retry later")
    reply = Reply(req, service.name, service.tokenizer, encoded.prompts)
    events = service.events(*queued, request.is_disconnected)
    if req.stream:
        return StreamingResponse(_stream(reply, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    async for event in events:
        reply.add(event)
        if event.finish == "error":
            await events.aclose()
            return _error(500, "generation failed on the server; see its log")
    return JSONResponse(reply.response())


async def _stream(reply: Reply, events: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` per event, the usage if asked for, then `data: [DONE]`."""
    try:
        for chunk in reply.first_chunks():
            yield _sse(chunk)
        async for event in events:
            text = reply.add(event)
            if event.finish == "error":
                yield _sse(error_body(500, "generation failed on the server; see its log"))
                return
            if text or event.tokens or event.finish:
                yield _sse(reply.chunk(event, text))
        if reply.req.include_usage:
            yield _sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # frees the rows if the client went away


async def completions(request: HTTPRequest) -> Response:
    return await _generate(request, parse_completion)


async def chat_completions(request: HTTPRequest) -> Response:
    return await _generate(request, parse_chat)


def _model_card(service: Service) -> dict[str, Any]:
    return {"id": service.name, "object": "model", "created": 0, "owned_by": "minigpt",
            "context_length": service.model.cfg.context_length}


async def models(request: HTTPRequest) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(_service(request))]})


async def model(request: HTTPRequest) -> Response:
    service = _service(request)
    if request.path_params["model"] != service.name:
        raise HTTPException(404, f"model {request.path_params['model']!r} does not exist")
    return JSONResponse(_model_card(service))


async def health(request: HTTPRequest) -> Response:
    service: Service = request.app.state.service
    return JSONResponse({"status": "ok", "model": service.name, **service.engine.stats()})


async def attention(request: HTTPRequest) -> Response:
    """The playground's heatmap: `{"prompt", "layer", "head"}` to one head's attention map."""
    service = _service(request)
    body = await _body(request, service)
    try:
        if not isinstance(body, dict):
            raise TypeError("the request body must be a JSON object")
        prompt, layer, head = field(body, "prompt", str, ""), field(body, "layer", int, 0), field(body, "head", int, 0)
        return JSONResponse(await service.attention(prompt, layer, head))
    except TypeError as e:
        raise HTTPException(422, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


async def playground(request: HTTPRequest) -> Response:
    return HTMLResponse(resources.files(__package__).joinpath("static/playground.html").read_text("utf-8"))


def build_app(service: Service) -> Starlette:
    """The app serving `service` (whose owner closes it when the server stops)."""
    routes = [Route("/", playground), Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{model:path}", model),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/attention", attention, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    return app

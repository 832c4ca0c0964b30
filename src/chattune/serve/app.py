"""The HTTP side of ``chattune serve``: OpenAI's chat-completions shapes on FastAPI.

Routes: ``POST /v1/chat/completions`` (plain or server-sent events), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /`` (the chat page) and the arena's
battles, votes and leaderboard (``chattune.serve.arena_routes``). Every error is an OpenAI
error body ``{"error": {"message", "type", "param", "code"}}``; FastAPI's own 422
validation errors and 404s are rewritten into that shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from importlib import resources
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from chattune.engine import DEFAULTS, PromptTooLong
from chattune.serve.arena import Battles, VoteLog
from chattune.serve.arena_routes import arena_router
from chattune.serve.models import Served
from chattune.serve.protocol import FINISH, ApiError, Reply, engine_request, error_body
from chattune.serve.worker import Busy, Job, Worker

MAX_BODY = 1 << 20  # 1 MiB: a chat request is text; anything larger is a mistake or an attack


# -- request bodies ---------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    # OpenAI clients send fields this server has no use for (user, logprobs=False, ...)
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI allows up to 4
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


# -- the app ------------------------------------------------------------------------------------
def build_app(served: Served, worker: Worker, *, max_tokens: int, api_key: str | None = None,
              cors_origins: list[str] | None = None, votes: VoteLog | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` through ``worker``.

    Args:
        max_tokens: the server's cap on ``max_tokens`` (also its default).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        cors_origins: origins allowed to call the API from a browser; none by default.
        votes: where arena votes are appended; ``None`` keeps them in memory only.
    """
    app = FastAPI(title="chattune", docs_url=None, redoc_url=None, openapi_url=None)
    _errors(app)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    page = resources.files("chattune.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    created = int(time.time())

    def authorise(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           param=None, code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": served.names, "in_flight": worker.in_flight,
                "max_batch": worker.engine.max_batch, "capacity": worker.capacity}

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "chattune"}

    @app.get("/v1/models", dependencies=[Depends(authorise)])
    def models() -> dict:
        return {"object": "list", "data": [model_object(n) for n in served.names]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorise)])
    def model(model_id: str) -> dict:
        if model_id not in served.names:
            raise ApiError(404, f"model '{model_id}' is not served here; models: {', '.join(served.names)}",
                           param="model", code="model_not_found")
        return model_object(model_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorise)])
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        engine_request = _engine_request(body, served, max_tokens)
        try:
            worker.check(engine_request)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        try:
            job = worker.submit(engine_request)
        except Busy as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", "rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        reply = Reply(body.model)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(job, worker, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(job, worker, reply, http)

    app.include_router(arena_router(served, worker, Battles(served.names), votes or VoteLog(None),
                                    max_tokens=max_tokens, authorise=authorise))
    return app


def _engine_request(body: ChatRequest, served: Served, limit: int):
    if body.n != 1:
        raise ApiError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
    conversation = _conversation(body.messages)
    sampling = DEFAULTS.with_(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    wanted = body.max_completion_tokens or body.max_tokens or limit
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return engine_request(served, body.model, conversation, max_new_tokens=min(wanted, limit), sampling=sampling,
                          stop=stop)


def _conversation(messages: list[Message]) -> list[dict]:
    """OpenAI messages -> the user/assistant turns chattune renders.

    The runs were trained without a system turn, so system text is put in front of the
    first user message rather than rendered as a role the model never saw.
    """
    system = "\n\n".join(m.text for m in messages if m.role == "system")
    turns = [{"role": m.role, "content": m.text} for m in messages if m.role != "system"]
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "user":
        raise ApiError(400, "messages must start and end with a user message (after any system messages)",
                       param="messages")
    if system:
        turns[0] = {"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}
    return turns


async def _stream(job: Job, worker: Worker, reply: Reply, usage: bool):
    finished = False
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield reply.chunk({"content": value})
                continue
            finished = True
            if kind == "done":
                yield reply.chunk({}, FINISH[value.finish_reason])
                if usage:
                    yield reply.usage_chunk(value)
            else:  # the status line is already sent: report the error as an event, as OpenAI does
                status, message = value
                yield f"data: {json.dumps(error_body(status, message))}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:  # the client went away (starlette cancels this generator): free the slot
            worker.cancel(job)


async def _whole(job: Job, worker: Worker, reply: Reply, http: HttpRequest):
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                worker.cancel(job)
                return JSONResponse({}, status_code=499)  # nobody reads it
            continue
        if kind == "done":
            return reply.whole(value)
        if kind == "error":
            status, message = value
            return JSONResponse(error_body(status, message), status_code=status)


# -- errors ---------------------------------------------------------------------------------------
def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        where = f"'{param}': " if param else ""
        return ApiError(400, f"{where}{first['msg']}", param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def bug(_, e: Exception):  # the traceback goes to the server's log, never to the client
        return ApiError(500, f"internal error ({type(e).__name__})", "server_error").response()


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before the app reads them.

    Content-Length is checked up front; a chunked body is read (at most ``limit`` + 1
    bytes) and replayed to the app.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = ApiError(413, f"request body over {self.limit} bytes", param=None, code="request_too_large")
        await error.response()(scope, receive, send)

"""The one ASGI app: uvicorn serves it in one process, Ray Serve serves it in each replica (ray_serve.py).

Routes: POST /v1/chat/completions (OpenAI Chat Completions, SSE when `stream`), GET /v1/models, /health,
/metrics, /openapi.json and /docs (the API described, openapi.py). The pipeline is loaded and the batcher
started by the app's lifespan, so that every replica loads its own.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import json
import os
import socket
import threading
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from qwen2vl_edge.runtime import Qwen2VLPipeline
from qwen2vl_edge.runtime.errors import InputError

from . import openapi, protocol
from .batcher import Batcher, Job
from .errors import APIError, bad_request, too_large
from .metrics import Metrics
from .sessions import job_keys
from .settings import ServerSettings

REPLICA_HEADER = "x-qwen2vl-replica"
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs")
LINGER_S = 30.0  # how long the rest of an oversized body is read and dropped before the 413 (nginx's lingering_time)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Gate:
    """ASGI middleware: bearer-token check on /v1/*, the replica's name on every response, request counts.
    (Plain ASGI, not BaseHTTPMiddleware, so that streamed responses and disconnects pass untouched.)"""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, state):
        self.app, self.settings, self.metrics, self.state = app, settings, metrics, state

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.settings.api_key}".encode())  # constant time

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (REPLICA_HEADER.encode(), getattr(self.state, "replica", "starting").encode())]
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        if self.settings.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
            e = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await error_response(e)(scope, receive, send_tagged)
        await self.app(scope, receive, send_tagged)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted as it arrives (a chunked body has no Content-Length). One over `limit` is a 413,
    answered once the client has sent the rest, which is read and dropped (for up to LINGER_S): a server that
    answers and closes while the client still sends resets the connection, and the client never sees the 413."""
    declared = request.headers.get("content-length")
    parts, body = request.stream(), bytearray()
    if not (declared is not None and declared.isdigit() and int(declared) > limit):
        async for part in parts:
            body += part
            if len(body) > limit:
                break
        else:
            return bytes(body)
    try:
        await asyncio.wait_for(_drop(parts), LINGER_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass  # the client sends on, or has gone: answered (or not) all the same
    size = f" ({declared} bytes)" if declared and declared.isdigit() else ""
    raise too_large(f"the request body is over the {limit}-byte limit{size} (serve --max-body-mb)")


async def _drop(parts) -> None:
    async for _ in parts:
        pass


def parse_request(raw: bytes) -> protocol.ChatRequest:
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    except RecursionError:  # a "nesting bomb": [[[[...]]]] deeper than the parser's recursion limit
        raise bad_request("the body's JSON is nested too deeply") from None
    try:
        return protocol.ChatRequest.model_validate(payload)
    except ValidationError as e:
        raise protocol.validation_error(e.errors()) from None


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_event(job: Job, watch: asyncio.Task | None) -> tuple[str, object]:
    """The job's next event; ClientGone if the client disconnects first (then the job is cancelled)."""
    get = asyncio.ensure_future(job.events.get())
    if watch is None:
        return await get
    done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    if get not in done:
        get.cancel()
        job.cancelled.set()
        raise ClientGone()
    return get.result()


def as_api_error(error: Exception) -> APIError:
    """A job's error as the client sees it: the runtime's (an InputError) is the request's fault."""
    return error if isinstance(error, APIError) else bad_request(str(error))


def raise_if_error(event: tuple[str, object]) -> tuple[str, object]:
    kind, value = event
    if kind == "error":
        raise as_api_error(value)
    return event


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, request_id: str, model: str, first: tuple, include_usage: bool, metrics: Metrics):
    """SSE: a role chunk, text pieces and tool call deltas, the finish chunk, usage if asked, `data: [DONE]`.
    Starlette cancels this generator when the client disconnects; the finally then cancels the job."""
    try:
        yield _sse(protocol.chunk(request_id, model, {"role": "assistant", "content": ""}))
        kind, value = first
        while kind in ("delta", "call"):
            delta = {"content": value} if kind == "delta" else {"tool_calls": [value]}
            yield _sse(protocol.chunk(request_id, model, delta))
            kind, value = await job.events.get()
        if kind == "error":
            yield _sse(as_api_error(value).body())  # OpenAI's error body, as openapi.ErrorResponse describes
        else:
            extra = {"boxes": protocol.assistant_message(value)["boxes"]} if getattr(value, "boxes", None) else {}
            yield _sse(protocol.chunk(request_id, model, extra, value.finish_reason))
            metrics.count_tokens(value.usage)
            if include_usage:
                yield _sse(protocol.chunk(request_id, model, {}, usage_=protocol.usage(value)))
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()


def warm_constraints(pipe: Qwen2VLPipeline) -> None:
    """Build llguidance's tokenizer (about 2 s at Qwen's vocabulary) in the background once the server is up, so
    that the first constrained request does not wait for it; nothing without the agents extra."""
    if importlib.util.find_spec("llguidance") is not None:
        threading.Thread(target=lambda: pipe.grammars.tokenizer, name="qwen2vl-grammars", daemon=True).start()


def load_pipeline(settings: ServerSettings) -> Qwen2VLPipeline:
    return Qwen2VLPipeline.load(settings.artifact, backend=settings.backend, num_threads=settings.threads,
                                verify=settings.verify, session_cache=settings.session_cache,
                                tool_format=settings.tool_format)


def create_app(settings: ServerSettings, pipe: Qwen2VLPipeline | None = None) -> FastAPI:
    """The app; `pipe` may be given (tests, embedding), else the lifespan loads it from `settings.artifact`."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = pipe or await run_in_threadpool(load_pipeline, settings)
        app.state.pipe = loaded
        app.state.batcher = Batcher(loaded, settings.max_batch, settings.limits.max_queue, settings.batch_wait_s,
                                    metrics, settings.max_sessions, settings.max_session_bytes)
        app.state.replica = f"{socket.gethostname()}:{os.getpid()}"
        warm_constraints(loaded)
        yield
        await run_in_threadpool(app.state.batcher.close)

    app = FastAPI(title="qwen2vl-edge", summary="OpenAI-compatible Chat Completions for Qwen2-VL on edge devices",
                  lifespan=lifespan, redoc_url=None)
    app.add_middleware(Gate, settings=settings, metrics=metrics, state=app.state)

    def describe() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.add_schemas(get_openapi(title=app.title, version=app.version,
                                                                 summary=app.summary, routes=app.routes))
        return app.openapi_schema

    app.openapi = describe

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):  # a route's declared parameters
        return error_response(protocol.validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # logged by Starlette; the client gets JSON
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2vl-edge"}]}

    def _conversation(req: protocol.ChatRequest, opts) -> tuple[list, tuple[str | None, bool]]:
        """The runtime's conversation (images fetched and decoded) and its session keys (images hashed). Its
        constraint is compiled here (then cached by its text for the worker), so that one that cannot be
        enforced is refused naming its field, before the request is queued."""
        conversation = protocol.conversation(req, settings.limits, settings.allowed_media_dir)
        pipe = app.state.pipe
        _, plan = pipe.plan(conversation, opts)
        try:
            pipe.matchers([plan])
        except InputError as e:
            raise bad_request(str(e), protocol.constraint_param(req)) from None
        keys = job_keys(conversation, opts) if settings.max_sessions else (None, False)
        return conversation, keys

    async def new_job(req: protocol.ChatRequest) -> Job:
        """Checks that need no model run, images fetched and decoded (in a thread), then the job is queued."""
        if req.model != settings.served_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves "
                                f"{settings.served_name!r} (GET /v1/models)", "model", "model_not_found")
        pipe = app.state.pipe
        opts = protocol.generation_options(req, settings.limits, pipe.artifact.config.text.max_position_embeddings,
                                           pipe.sampling_defaults)
        try:
            conversation, (prefix_key, starts) = await run_in_threadpool(_conversation, req, opts)
        except InputError as e:
            raise bad_request(str(e)) from None
        job = Job(conversation, opts, asyncio.get_running_loop(), stream=req.stream, prefix_key=prefix_key,
                  starts=starts)
        app.state.batcher.submit(job)
        return job

    @app.post("/v1/chat/completions", **openapi.chat_route_docs())
    async def chat_completions(request: Request):
        """OpenAI's Chat Completions: images as `image_url` parts (data URIs, http(s) URLs, or files under
        `--allowed-media-dir`), video as the `video` extension part; `stream` for server-sent events."""
        req = parse_request(await read_body(request, settings.limits.max_body_bytes))
        job = await new_job(req)
        request_id, watch = f"chatcmpl-{uuid.uuid4().hex}", asyncio.ensure_future(_disconnected(request))
        try:
            event = raise_if_error(await next_event(job, watch))  # errors before any token keep their status
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                watch.cancel()  # from here Starlette listens for the disconnect itself
                return StreamingResponse(stream_events(job, request_id, settings.served_name, event, include_usage,
                                                       metrics), media_type="text/event-stream")
            while event[0] == "delta":
                event = raise_if_error(await next_event(job, watch))
            metrics.count_tokens(event[1].usage)
            return protocol.completion(request_id, settings.served_name, event[1])
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            watch.cancel()
            if not req.stream:
                job.cancelled.set()

    return app


def run_uvicorn(settings: ServerSettings, host: str, port: int, log_level: str = "info",
                graceful_timeout: float = 10.0) -> None:
    """uvicorn in this process. On SIGTERM / Ctrl-C the batcher answers what it holds 503 right away, so the
    connections close by themselves and uvicorn's graceful shutdown has nothing to cut off."""
    import uvicorn

    app = create_app(settings, load_pipeline(settings))  # a bad artifact fails here, as `run` fails, not in uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            batcher = getattr(app.state, "batcher", None)
            if batcher is not None:
                batcher.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout)
    Server(config).run()

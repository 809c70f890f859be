"""``holst serve``: an HTTP API, a stream of progressive previews and a web page over one pipeline.

Stack: FastAPI (Starlette) on uvicorn, with uvicorn's h11 protocol wrapped by
:mod:`holst.serve.guard` (request-header deadline, per-address connection caps). Request and
reply models are pydantic (:mod:`holst.serve.schemas`); ``/openapi.json`` is generated from them.
Bodies are read here with a size cap and a deadline and parsed with depth and digit limits before
pydantic sees them. One worker thread owns the pipeline (:mod:`holst.serve.worker`): requests that
arrive within ``batch_window_ms`` and share sampling settings are sampled as one batch, off the
event loop, so ``/health`` answers while a batch runs.

Endpoints: ``GET /`` (page), ``GET /health``, ``GET /openapi.json``, ``POST /v1/generate`` (JSON in,
JSON or PNG out), ``POST /v1/generate/stream`` (server-sent events), ``GET /v1/images/{id}.png``.
Every refusal is JSON ``{"error": ..., "status": ...}``. Binding anywhere but loopback needs a
bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from holst.config import ServeConfig
from holst.serve.guard import ConnectionStats, HolstUvicornConfig
from holst.serve.schemas import (
    ErrorReply,
    GenerateRequestBase,
    GenerateResult,
    Health,
    RequestError,
    dumps,
    parse_json_body,
    request_model,
    validate_request,
)
from holst.serve.worker import BatchWorker, ImageStore, Job, QueueFull, png_bytes
from holst.utils.runtime import get_logger

__all__ = ["HolstServer", "create_app", "make_server", "png_bytes"]

logger = get_logger("holst.serve")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
MAX_IMAGE_PROMPT_PIXELS = 4096 * 4096


class Reply(Response):
    """JSON reply whose encoding cannot fail (see :func:`holst.serve.schemas.dumps`)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_reply(status: int, message: str, config: ServeConfig, headers: dict[str, str] | None = None) -> Reply:
    """The one shape of every refusal, with the headers its status calls for."""
    headers = {"Cache-Control": "no-store", **(headers or {})}
    if status == 503:
        headers["Retry-After"] = str(config.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status in (408, 413):  # the rest of the body may still be on the wire
        headers["Connection"] = "close"
    return Reply({"error": message, "status": status}, status_code=status, headers=headers)


@dataclasses.dataclass
class AppState:
    """What the routes share: the pipeline, its worker and queue, stored images and counters."""

    pipe: Any
    config: ServeConfig
    store: ImageStore
    worker: BatchWorker
    model: type[GenerateRequestBase]
    stats: ConnectionStats
    started: float = dataclasses.field(default_factory=time.time)
    requests_served: int = 0
    rejected_busy: int = 0


class _Counting:
    """Pure ASGI middleware: count replies (503s separately) and add ``X-Content-Type-Options``."""

    def __init__(self, app: Any, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.state.requests_served += 1
                self.state.rejected_busy += message["status"] == 503
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, counted)


# --------------------------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------------------------


def check_token(request: Request, config: ServeConfig) -> None:
    """Raise 401 unless the request carries ``Authorization: Bearer <token>`` (when a token is set)."""
    if config.token is None:
        return
    given = request.headers.get("authorization", "")
    ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode("utf-8", "surrogateescape"),
                                                             config.token.encode())
    if not ok:
        raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")


async def read_body(request: Request, config: ServeConfig) -> bytes:
    """The body, at most ``max_body_bytes``, within ``body_timeout_s``; RequestError 400/408/413 otherwise."""
    limit = config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise RequestError(400 if not length.isdigit() else 413, f"Content-Length {length[:40]!r} is not valid")
        if int(length) > limit:
            raise RequestError(413, f"body of {length} bytes; this server accepts at most {limit}")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body over {limit} bytes; this server accepts at most {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout=config.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"request body not complete within {config.body_timeout_s} s") from None
    except ClientDisconnect:
        raise RequestError(400, "the client went away while sending the body") from None


def decode_image_prompt(text: str) -> Image.Image:
    """A base64 PNG/JPEG (optionally a data: URL) -> RGB image; RequestError 422 naming the field."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise ValueError(f"format {image.format} (send PNG, JPEG or WebP)")
        if image.width * image.height > MAX_IMAGE_PROMPT_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels is too large")
        return image.convert("RGB")
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise RequestError(422, f"field 'image_prompt' is not a readable base64 image: {e}") from None


async def make_job(state: AppState, request: GenerateRequestBase, stream: bool) -> Job:
    """Resolve settings and seeds (422 for what the pipeline refuses) into a queueable job."""
    from holst.pipeline import make_seeds

    pipe, config = state.pipe, state.config
    try:
        settings = pipe.resolve_settings(num_images=request.num_images, top_k=request.top_k, top_p=request.top_p,
                                         temperature=request.temperature, guidance_scale=request.guidance_scale,
                                         rerank=request.rerank, upscale=request.upscale, seed=request.seed)
        messages = pipe.check_prompts([request.prompt])
    except ValueError as e:
        raise RequestError(422, str(e)) from None
    if settings.num_images > config.max_images_per_request:
        raise RequestError(422, f"num_images={settings.num_images} exceeds this server's "
                                f"{config.max_images_per_request}")
    image_prompt = None
    if request.image_prompt is not None:
        D = pipe.dalle.config.image_tokens_per_dim
        rows = request.image_prompt_rows if request.image_prompt_rows is not None else D // 2
        if rows >= D:
            raise RequestError(422, f"field 'image_prompt_rows'={rows} must be < {D} (the model's rows of codes)")
        image_prompt = (await run_in_threadpool(decode_image_prompt, request.image_prompt), rows)
    return Job(request=request, settings=settings, seeds=make_seeds(settings.num_images, seed=settings.seed),
               loop=asyncio.get_running_loop(), stream=stream, image_prompt=image_prompt, warnings=messages)


async def wait_disconnect(request: Request) -> None:
    """Return when the client hangs up (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def next_event(job: Job) -> tuple[str, Any]:
    return await job.events.get()


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------

ERRORS = {400: "body is not a JSON object", 401: "missing or wrong bearer token", 408: "body too slow",
          413: "body too large", 422: "a field is invalid (the message names it)",
          503: "the queue is full; retry after the Retry-After header's seconds"}


def create_app(pipe: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app over ``pipe``; its worker thread starts and stops with the app's lifespan.

    Args:
        pipe: a loaded ``Text2ImagePipeline``.
        config: limits, batching, token (default ``ServeConfig()``).
    Returns:
        the app; ``app.state.holst`` is its :class:`AppState`.
    """
    import holst

    config = config or ServeConfig()
    store = ImageStore(config.max_stored_images)
    state = AppState(pipe=pipe, config=config, store=store, worker=BatchWorker(pipe, config, store),
                     model=request_model(config), stats=ConnectionStats())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        state.worker.start()
        try:
            yield {"holst_stats": state.stats}  # the connection guard counts into it
        finally:
            await run_in_threadpool(state.worker.stop)

    app = FastAPI(title="holst text-to-image", version=holst.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json", default_response_class=Reply,
                  description="Generate images from captions. Requests that arrive together share one batch.")
    app.state.holst = state
    app.add_middleware(_Counting, state=state)
    err = {code: {"model": ErrorReply, "description": text} for code, text in ERRORS.items()}
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}}

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> Reply:
        return error_reply(e.status, e.message, config)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Reply:
        method, path = request.method, request.url.path[:200]
        if e.status_code == 404:
            message = f"no route {method} {path}; see /openapi.json"
        elif e.status_code == 405:
            message = f"method {method} is not allowed on {path}; allowed: {(e.headers or {}).get('Allow', '')}"
        else:
            message = str(e.detail)
        return error_reply(e.status_code, message, config, dict(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> Reply:
        return error_reply(422, "; ".join(str(x.get("msg")) for x in e.errors()), config)

    # ------------------------------------------------------------------ pages
    static = {p.name: (p.read_bytes(), STATIC_TYPES.get(p.suffix, "application/octet-stream"))
              for p in STATIC_DIR.iterdir() if p.is_file()}

    def static_reply(name: str) -> Response:
        if name not in static:
            raise RequestError(404, f"no static file {name[:100]!r}")
        data, kind = static[name]
        return Response(data, media_type=kind, headers={"Cache-Control": "no-cache"})

    def get(path: str, **kwargs: Any) -> Any:
        """GET route (in the OpenAPI schema) plus the same route for HEAD (not listed)."""
        def register(fn: Any) -> Any:
            app.get(path, **kwargs)(fn)
            app.head(path, include_in_schema=False, response_class=kwargs.get("response_class", Reply))(fn)
            return fn
        return register

    @get("/", summary="the web page", response_class=Response)
    async def page() -> Response:
        return static_reply("index.html")

    @get("/index.html", include_in_schema=False, response_class=Response)
    async def index() -> Response:
        return static_reply("index.html")

    @get("/static/{name}", include_in_schema=False, response_class=Response)
    async def static_file(name: str) -> Response:
        return static_reply(name)

    @get("/health", response_model=Health, summary="liveness, queue depth, model and limits")
    async def health() -> Reply:
        c = pipe.config
        return Reply({
            "status": "ok", "model": getattr(pipe, "source", "memory"), "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""), "image_size": pipe.image_size,
            "components": list(c.components), "auth_required": config.token is not None,
            "queue_depth": state.worker.depth(), "queue_capacity": config.max_queue, "busy": state.worker.busy,
            "batches_run": state.worker.batches_run, "images_made": state.worker.images_made,
            "cancelled_batches": state.worker.cancelled_batches,
            "requests_served": state.requests_served, "rejected_busy": state.rejected_busy,
            "open_connections": state.stats.open, "uptime_s": round(time.time() - state.started, 1),
            "defaults": {"num_images": c.num_images, "top_k": c.top_k, "top_p": c.top_p,
                         "temperature": c.temperature, "guidance_scale": c.guidance_scale, "rerank": c.rerank,
                         "upscale": c.upscale},
            "limits": {"max_images_per_request": config.max_images_per_request,
                       "max_prompt_chars": config.max_prompt_chars, "max_upscale": config.max_upscale,
                       "max_batch_images": config.max_batch_images, "max_body_bytes": config.max_body_bytes},
        }, headers={"Cache-Control": "no-store"})

    @get("/v1/images/{image_id}.png", response_class=Response, summary="a generated image",
         responses={200: {"content": {"image/png": {}}, "description": "PNG"},
                    404: {"model": ErrorReply, "description": "unknown or expired"}})
    async def image(image_id: str) -> Response:
        data = state.store.get(image_id)
        if data is None:
            raise RequestError(404, "unknown or expired image id (the server keeps the most recent "
                                    f"{config.max_stored_images} images)")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------ generation
    async def accept(request: Request, stream: bool) -> tuple[Job, int]:
        check_token(request, config)
        body = await read_body(request, config)
        job = await make_job(state, validate_request(parse_json_body(body), state.model), stream)
        try:
            return job, state.worker.submit(job)
        except QueueFull:
            raise RequestError(503, f"the queue is full ({config.max_queue} requests); "
                                    f"retry after {config.retry_after_s} s") from None

    @app.post("/v1/generate", openapi_extra=body_schema, response_model=GenerateResult,
              summary="generate images; JSON result, or the best image as PNG with Accept: image/png",
              responses={200: {"content": {"image/png": {}}}, 504: {"model": ErrorReply,
                                                                  "description": "not finished in time"}, **err})
    async def generate(request: Request) -> Response:
        job, _ = await accept(request, stream=False)
        done = asyncio.ensure_future(job_done(job))
        gone = asyncio.ensure_future(wait_disconnect(request))
        finished, pending = await asyncio.wait({done, gone}, timeout=config.request_timeout_s,
                                               return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if done not in finished:
            job.cancelled = True
            if gone in finished:
                return Response(status_code=499)  # nobody reads it
            raise RequestError(504, f"not finished within {config.request_timeout_s} s")
        if job.error is not None:
            raise job.error
        accept_header = request.headers.get("accept", "")
        if "image/png" in accept_header and "application/json" not in accept_header:
            best = job.result["images"][0]
            return Response(job.best_png, media_type="image/png",
                            headers={"X-Seed": str(best["seed"]), "X-Image-Url": best["url"]})
        return Reply(job.result)

    @app.post("/v1/generate/stream", openapi_extra=body_schema, response_class=StreamingResponse,
              summary="server-sent events: queued, started, preview (partial images as PNG data URLs), result, "
                      "error", responses={200: {"content": {"text/event-stream": {}}}, **err})
    async def generate_stream(request: Request) -> StreamingResponse:
        job, position = await accept(request, stream=True)
        return StreamingResponse(event_stream(job, position, config.request_timeout_s),
                                 media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            models = components.setdefault("schemas", {})
            models["GenerateRequest"] = state.model.model_json_schema(ref_template="#/components/schemas/{model}")
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            if config.token:
                for path in ("/v1/generate", "/v1/generate/stream"):
                    schema["paths"][path]["post"]["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def job_done(job: Job) -> None:
    """Drain a plain job's events until it ends."""
    while (await job.events.get())[0] != "done":
        pass


def sse(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


async def event_stream(job: Job, position: int, timeout: float) -> Any:
    """Server-sent events until the job ends; a client that goes away cancels the job (see worker)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        yield sse("queued", {"position": position, "seeds": job.seeds})
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                job.cancelled = True
                yield sse("error", {"error": f"not finished within {timeout} s", "status": 504})
                return
            try:
                name, data = await asyncio.wait_for(job.events.get(), timeout=min(10.0, remaining))
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"  # at most 10 s between writes: a dead client is noticed
                continue
            if name == "done":
                if job.error is not None:
                    yield sse("error", {"error": job.error.message, "status": job.error.status})
                return
            yield sse(name, data)
    finally:
        if not job.done.is_set():
            job.cancelled = True


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def uvicorn_config(app: Any, config: ServeConfig, **kwargs: Any) -> HolstUvicornConfig:
    """uvicorn settings of ``holst serve`` (guarded h11 protocol, no access log, our logging)."""
    return HolstUvicornConfig(app, serve=config, host=config.host, port=config.port, log_config=None,
                              access_log=False, lifespan="on", timeout_keep_alive=5, timeout_graceful_shutdown=3,
                              proxy_headers=False, server_header=False, **kwargs)


def bind_socket(config: ServeConfig) -> socket.socket:
    """A listening TCP socket on ``config.host``/``port``.

    ``proto=IPPROTO_TCP`` matters: asyncio sets TCP_NODELAY only on sockets that say so, and without
    it a reply written in two parts waits ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)  # --workers processes share it
    return sock


class HolstServer:
    """A bound uvicorn server over one app; ``serve_forever`` in the foreground or ``start`` in a thread.

    Port 0 picks a free port: ``server.server_address[1]`` (or ``server.port``).
    """

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        import uvicorn

        self.config = config
        self.app = create_app(pipe, config)
        self.state: AppState = self.app.state.holst
        self.socket = bind_socket(config)
        self.server_address = self.socket.getsockname()
        self.uvicorn = uvicorn.Server(uvicorn_config(self.app, config))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    pipe = property(lambda self: self.state.pipe)
    worker = property(lambda self: self.state.worker)
    store = property(lambda self: self.state.store)
    port = property(lambda self: self.server_address[1])
    open_connections = property(lambda self: self.state.stats.open)

    def serve_forever(self) -> None:
        """Run until :meth:`shutdown` (or Ctrl-C in the main thread)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self, timeout: float = 30.0) -> HolstServer:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="holst-serve", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.uvicorn.started:
            if self._stopped.is_set() or time.monotonic() > end:
                raise RuntimeError("holst serve did not start")
            time.sleep(0.01)
        return self

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop serving (open streams get ``timeout_graceful_shutdown``) and wait for it."""
        self.uvicorn.should_exit = True
        if self._thread is not None or self.uvicorn.started:
            self._stopped.wait(timeout)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def close(self) -> None:
        """Stop serving, then close the listening socket."""
        self.shutdown()
        self.server_close()


def make_server(pipe: Any, config: ServeConfig | None = None) -> HolstServer:
    """Bind a server for ``pipe`` (call ``serve_forever`` or ``start``)."""
    return HolstServer(pipe, config or ServeConfig())


SPEC_ENV = "HOLST_SERVE_SPEC"


def app_from_env() -> FastAPI:
    """App factory of a ``--workers`` process: loads the pipeline named in ``$HOLST_SERVE_SPEC``."""
    from holst.cli_common import load_pipeline
    from holst.errors import HolstError
    from holst.utils.runtime import set_threads

    spec = json.loads(os.environ[SPEC_ENV])
    config = ServeConfig(**spec["config"])
    try:
        set_threads(spec["threads"])
        pipe = load_pipeline(spec["model"], config.device, config.dtype, cuda_graph=spec["cuda_graph"])
    except HolstError as e:
        print(f"holst serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return create_app(pipe, config)

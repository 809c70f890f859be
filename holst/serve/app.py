"""``holst serve``: an HTTP API, a stream of progressive previews and a web page over one pipeline.

Stack: the standard library's ``ThreadingHTTPServer`` (one thread per connection, zero extra
dependencies); the OpenAPI document is written by ``schemas.py`` from the same field table that
validates requests. One worker thread owns the pipeline: requests that arrive within
``batch_window_ms`` of each other and share sampling settings are sampled as one batch.

Endpoints: ``GET /`` (page), ``GET /health``, ``GET /openapi.json``, ``POST /v1/generate`` (JSON in,
JSON or PNG out), ``POST /v1/generate/stream`` (server-sent events), ``GET /v1/images/{id}.png``.
Limits: body size, prompt length, images per request, upscale factor, open connections, and a
bounded queue answered with 503 + Retry-After. Binding anywhere but loopback needs a bearer token.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import hmac
import io
import json
import os
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from PIL import Image

from holst.config import ServeConfig
from holst.serve.schemas import GenerateRequest, RequestError, openapi_schema, parse_generate_request
from holst.utils.images import make_grid
from holst.utils.runtime import get_logger

logger = get_logger("holst.serve")
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


class QueueFull(Exception):
    """The job queue holds ``max_queue`` jobs; the client should retry later (503)."""


def png_bytes(image: Image.Image) -> bytes:
    """Encode one PIL image as PNG bytes (deterministic, no metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Jobs, the bounded queue and the batching worker
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the queue. ``events`` (streaming only) receives (name, data)."""

    request: GenerateRequest
    settings: Any  # holst.pipeline.SamplingSettings
    seeds: list[int]
    events: collections.deque | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    wake: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    result: dict[str, Any] | None = None
    best_png: bytes | None = None
    error: RequestError | None = None
    cancelled: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.monotonic)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Queue an event for a streaming client (no-op for plain requests)."""
        if self.events is None:
            return
        with self.wake:
            self.events.append((name, data))
            self.wake.notify_all()

    def finish(self) -> None:
        with self.wake:
            self.done.set()
            self.wake.notify_all()


class ImageStore:
    """The last ``capacity`` images as PNG bytes under unguessable ids (bounded memory)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class BatchWorker:
    """Owns the pipeline; groups queued jobs with equal sampling settings into device batches."""

    def __init__(self, pipe: Any, config: ServeConfig, store: ImageStore) -> None:
        self.pipe = pipe
        self.config = config
        self.store = store
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.busy = False
        self.batches_run = 0
        self.images_made = 0
        self._thread = threading.Thread(target=self._loop, name="holst-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (0 = next). Raises QueueFull at ``max_queue`` jobs."""
        with self._cond:
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._cond.notify_all()
            return len(self._queue) - 1

    # ------------------------------------------------------------------ the loop
    def _next_batch(self) -> list[Job] | None:
        """Block for a first job, wait ``batch_window_ms`` for others, take the compatible ones."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            deadline = time.monotonic() + self.config.batch_window_ms / 1000.0
            while time.monotonic() < deadline and not self._stop:
                if self._images_compatible(self._queue[0]) >= self.config.max_batch_images:
                    break
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            first = self._queue.popleft()
            batch, total = [first], first.settings.num_images
            key = first.settings.batch_key()
            for job in list(self._queue):
                n = job.settings.num_images
                if job.settings.batch_key() == key and total + n <= self.config.max_batch_images:
                    self._queue.remove(job)
                    batch.append(job)
                    total += n
            return batch

    def _images_compatible(self, first: Job) -> int:
        key = first.settings.batch_key()
        return sum(j.settings.num_images for j in self._queue if j.settings.batch_key() == key)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.busy = True
            try:
                self._run(batch)
            except Exception as e:  # one bad batch must not kill the server
                logger.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    if not job.done.is_set():
                        job.error = RequestError(500, f"generation failed: {type(e).__name__}: {e}")
                        job.finish()
            finally:
                self.busy = False

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        pipe, cfg = self.pipe, self.config
        for job in batch:
            job.emit("started", {"batch_jobs": len(batch), "batch_images": sum(j.settings.num_images for j in batch)})
        # 1. one text-ids row and one seed per image, over every job of the batch
        text_ids = torch.cat([pipe.encode_prompts([j.request.prompt], warn=False).expand(j.settings.num_images, -1)
                              for j in batch])
        seeds = [s for j in batch for s in j.seeds]
        owners = [(j, i) for j in batch for i in range(j.settings.num_images)]  # image row -> (job, index)
        N = pipe.dalle.config.image_seq_length
        D = pipe.dalle.config.image_tokens_per_dim
        every = cfg.preview_every or D
        settings = dataclasses.replace(batch[0].settings, batch_size=cfg.max_batch_images)
        # 2. sample in device batches of at most max_batch_images rows; previews to streaming jobs
        chunks = []
        for start in range(0, len(seeds), cfg.max_batch_images):
            end = min(start + cfg.max_batch_images, len(seeds))

            def progress(step: int, total: int, codes_so_far: torch.Tensor, _start: int = start) -> None:
                if step % every and step != N:
                    return
                self._send_previews(owners, _start, step, N, codes_so_far)

            chunks.append(pipe.sample_codes(text_ids[start:end], seeds[start:end], settings, progress=progress))
        codes = torch.cat([c for c, _ in chunks])
        ppl = torch.cat([p for _, p in chunks])
        self.batches_run += 1
        # 3. per job: decode, rank, upscale, store PNGs, answer
        row = 0
        for job in batch:
            n = job.settings.num_images
            out = pipe.finish(job.request.prompt, codes[row:row + n], job.seeds, job.settings,
                              perplexities=ppl[row:row + n])
            row += n
            self._answer(job, out)
            self.images_made += len(out.images)

    def _send_previews(self, owners: list[tuple[Job, int]], start: int, step: int, total: int,
                       codes_so_far: torch.Tensor) -> None:
        rows = [r for r in range(codes_so_far.shape[0]) if owners[start + r][0].events is not None
                and not owners[start + r][0].cancelled]
        if not rows:
            return
        previews = self.pipe.preview(codes_so_far[rows])
        by_job: dict[Job, list[dict[str, Any]]] = collections.defaultdict(list)
        for r, image in zip(rows, previews):
            job, index = owners[start + r]
            url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
            by_job[job].append({"index": index, "data_url": url})
        for job, items in by_job.items():
            job.emit("preview", {"step": step, "total": total, "images": items})

    def _answer(self, job: Job, out: Any) -> None:
        images = []
        pngs = [png_bytes(im) for im in out.images]
        for i, data in enumerate(pngs):
            key = self.store.put(data)
            images.append({"url": f"/v1/images/{key}.png", "seed": out.seeds[i], "perplexity": out.perplexities[i],
                           "clip_score": None if out.clip_scores is None else out.clip_scores[i],
                           "width": out.images[i].width, "height": out.images[i].height})
        grid_key = self.store.put(png_bytes(make_grid(out.images))) if len(out.images) > 1 else None
        job.best_png = pngs[0]
        job.result = {"id": secrets.token_hex(8), "prompt": job.request.prompt, "settings": out.settings,
                      "images": images, "grid_url": f"/v1/images/{grid_key}.png" if grid_key else images[0]["url"],
                      "warnings": job.warnings, "elapsed_s": round(time.monotonic() - job.created, 4)}
        job.emit("result", job.result)
        job.finish()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class HolstServer(ThreadingHTTPServer):
    """A threading HTTP server with a connection cap and the app's shared state."""

    daemon_threads = True
    request_queue_size = 256  # listen backlog: 50+ clients connecting at once must not be dropped

    def __init__(self, address: tuple[str, int], pipe: Any, config: ServeConfig) -> None:
        self.config = config
        self.pipe = pipe
        self.store = ImageStore(config.max_stored_images)
        self.worker = BatchWorker(pipe, config, self.store)
        self.connections = threading.BoundedSemaphore(config.max_connections)
        self.started = time.time()
        self.requests_served = 0
        self.rejected_busy = 0
        self.open_connections = 0
        self._count_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.worker.start()

    def process_request(self, request, client_address) -> None:
        # Over max_connections: answer 503 at once instead of spawning another thread.
        if not self.connections.acquire(blocking=False):
            try:
                body = json.dumps({"error": "too many open connections", "status": 503}).encode()
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                % (self.config.retry_after_s, len(body), body))
            except OSError:
                pass
            with self._count_lock:
                self.rejected_busy += 1
            self.shutdown_request(request)
            return
        with self._count_lock:
            self.open_connections += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.open_connections -= 1
            self.connections.release()

    def server_close(self) -> None:
        self.worker.stop()
        super().server_close()

    def count(self, busy: bool = False) -> None:
        with self._count_lock:
            self.requests_served += 1
            if busy:
                self.rejected_busy += 1


class Handler(BaseHTTPRequestHandler):
    """Routes requests; every answer is JSON except the page, PNGs and event streams."""

    server: HolstServer
    server_version = "holst"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request (slow clients cannot hold threads forever)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8",
                   headers)

    def _error(self, error: RequestError) -> None:
        headers = {}
        if error.status == 503:
            headers["Retry-After"] = str(self.server.config.retry_after_s)
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if error.status in (400, 411, 413) or (self.command == "POST" and not getattr(self, "_body_read", False)):
            # The body (or the rest of it) may still be on the wire: it must not be read as the next request.
            headers["Connection"] = "close"
            self.close_connection = True
        self._json(error.status, {"error": error.message, "status": error.status}, headers)
        self.server.count(busy=error.status == 503)

    def _check_token(self) -> None:
        token = self.server.config.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            raise RequestError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length!r} is not an integer") from None
        if n < 0 or n > self.server.config.max_body_bytes:
            raise RequestError(413, f"body of {n} bytes; this server accepts at most "
                                    f"{self.server.config.max_body_bytes}")
        body = self.rfile.read(n)
        self._body_read = True
        return body

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path == "/health":
                self._json(200, self._health())
            elif path == "/openapi.json":
                import holst

                self._json(200, openapi_schema(self.server.config, holst.__version__))
            elif path.startswith("/v1/images/") and path.endswith(".png"):
                data = self.server.store.get(path[len("/v1/images/"):-len(".png")])
                if data is None:
                    raise RequestError(404, "unknown or expired image id (the server keeps the most recent "
                                            f"{self.server.config.max_stored_images} images)")
                self._send(200, data, "image/png", {"Cache-Control": "private, max-age=3600"})
            else:
                raise RequestError(404, f"no route GET {path}; see /openapi.json")
            self.server.count()
        except RequestError as e:
            self._error(e)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self._body_read = False
        try:
            if path not in ("/v1/generate", "/v1/generate/stream"):
                raise RequestError(404, f"no route POST {path}; see /openapi.json")
            self._check_token()
            request = parse_generate_request(self._read_body(), self.server.config)
            job = self._make_job(request, stream=path.endswith("/stream"))
            try:
                position = self.server.worker.submit(job)
            except QueueFull:
                raise RequestError(503, f"the queue is full ({self.server.config.max_queue} requests); "
                                        f"retry after {self.server.config.retry_after_s} s") from None
            if job.events is not None:
                self._stream(job, position)
            else:
                self._wait_and_answer(job)
            self.server.count()
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _make_job(self, request: GenerateRequest, stream: bool) -> Job:
        from holst.pipeline import make_seeds

        pipe = self.server.pipe
        try:
            settings = pipe.resolve_settings(num_images=request.num_images, top_k=request.top_k, top_p=request.top_p,
                                             temperature=request.temperature, guidance_scale=request.guidance_scale,
                                             rerank=request.rerank, upscale=request.upscale, batch_size=None)
            messages = pipe.check_prompts([request.prompt])  # empty captions fail here, before queueing
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        if settings.num_images > self.server.config.max_images_per_request:
            raise RequestError(422, f"num_images={settings.num_images} exceeds this server's "
                                    f"{self.server.config.max_images_per_request}")
        seeds = make_seeds(settings.num_images, seed=request.seed)
        return Job(request=request, settings=settings, seeds=seeds, events=collections.deque() if stream else None,
                   warnings=messages)

    def _wait_and_answer(self, job: Job) -> None:
        if not job.done.wait(timeout=self.server.config.request_timeout_s):
            job.cancelled = True
            raise RequestError(504, f"not finished within {self.server.config.request_timeout_s} s")
        if job.error is not None:
            raise job.error
        accept = self.headers.get("Accept", "")
        if "image/png" in accept and "application/json" not in accept:
            best = job.result["images"][0]
            self._send(200, job.best_png, "image/png", {"X-Seed": str(best["seed"]),
                                                        "X-Image-Url": best["url"]})
        else:
            self._json(200, job.result)

    def _stream(self, job: Job, position: int) -> None:
        """Server-sent events until the job ends; a client that goes away cancels a queued job."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        deadline = time.monotonic() + self.server.config.request_timeout_s
        try:
            self._event("queued", {"position": position, "seeds": job.seeds})
            while True:
                with job.wake:
                    if not job.events and not job.done.is_set():
                        # At most 10 s between writes: a keep-alive comment lets us notice a dead client.
                        job.wake.wait(timeout=min(10.0, max(0.0, deadline - time.monotonic())))
                    items = list(job.events)
                    job.events.clear()
                    finished = job.done.is_set()
                for name, data in items:
                    self._event(name, data)
                if finished:
                    if job.error is not None:
                        self._event("error", {"error": job.error.message, "status": job.error.status})
                    return
                if time.monotonic() >= deadline:
                    job.cancelled = True
                    self._event("error", {"error": "request timed out", "status": 504})
                    return
                if not items:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            job.cancelled = True

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def _static(self, name: str) -> None:
        path = (STATIC_DIR / name).resolve()
        if STATIC_DIR.resolve() not in path.parents or not path.is_file():
            raise RequestError(404, f"no static file {name!r}")
        self._send(200, path.read_bytes(), STATIC_TYPES.get(path.suffix, "application/octet-stream"),
                   {"Cache-Control": "no-cache"})

    def _health(self) -> dict[str, Any]:
        srv, pipe = self.server, self.server.pipe
        c = pipe.config
        return {
            "status": "ok", "model": getattr(pipe, "source", "memory"), "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""), "image_size": pipe.image_size,
            "components": list(c.components), "auth_required": srv.config.token is not None,
            "queue_depth": srv.worker.depth(), "queue_capacity": srv.config.max_queue, "busy": srv.worker.busy,
            "batches_run": srv.worker.batches_run, "images_made": srv.worker.images_made,
            "requests_served": srv.requests_served, "rejected_busy": srv.rejected_busy,
            "open_connections": srv.open_connections,
            "uptime_s": round(time.time() - srv.started, 1),
            "defaults": {"num_images": c.num_images, "top_k": c.top_k, "top_p": c.top_p,
                         "temperature": c.temperature, "guidance_scale": c.guidance_scale, "rerank": c.rerank,
                         "upscale": c.upscale},
            "limits": {"max_images_per_request": srv.config.max_images_per_request,
                       "max_prompt_chars": srv.config.max_prompt_chars, "max_upscale": srv.config.max_upscale,
                       "max_batch_images": srv.config.max_batch_images},
        }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def make_server(pipe: Any, config: ServeConfig | None = None) -> HolstServer:
    """Bind a server (port 0 picks a free port: ``server.server_address[1]``); call ``serve_forever``."""
    config = config or ServeConfig()
    return HolstServer((config.host, config.port), pipe, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst serve``."""
    d = ServeConfig()
    parser.add_argument("--model", default=None, help="pipeline directory (default: models/default)")
    parser.add_argument("--config", default=None, help="YAML file of ServeConfig values (flags override it)")
    parser.add_argument("--host", default=None, help=f"address to bind (default {d.host}; others need --token)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default {d.port})")
    parser.add_argument("--token", default=None, help="bearer token clients must send (default: $HOLST_TOKEN)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (default auto)")
    parser.add_argument("--dtype", default=None, help="auto, fp32, bf16, fp16 for the transformer (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA only: static KV cache + CUDA graph decode")
    parser.add_argument("--max-queue", type=int, default=None,
                        help=f"queued requests before 503 (default {d.max_queue})")
    parser.add_argument("--max-batch-images", type=int, default=None,
                        help=f"images sampled together on the device (default {d.max_batch_images})")
    parser.add_argument("--max-images-per-request", type=int, default=None,
                        help=f"default {d.max_images_per_request}")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from --config YAML, then flags, then $HOLST_TOKEN."""
    config = ServeConfig.load_yaml(args.config) if args.config else ServeConfig()
    changes = {k: getattr(args, k) for k in ("host", "port", "token", "device", "dtype", "max_queue",
                                             "max_batch_images", "max_images_per_request")
               if getattr(args, k, None) is not None}
    if "token" not in changes and config.token is None and os.environ.get("HOLST_TOKEN"):
        changes["token"] = os.environ["HOLST_TOKEN"]
    return config.replace(**changes) if changes else config


def main(args: argparse.Namespace) -> int:
    """Run ``holst serve`` until interrupted."""
    from holst.config import ConfigError
    from holst.generate_cli import load_pipeline_for_cli, set_threads

    try:
        config = config_from_args(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    set_threads(args.threads)
    pipe = load_pipeline_for_cli(args.model, config.device, config.dtype, cuda_graph=args.cuda_graph)
    if pipe is None:
        return 2
    server = make_server(pipe, config)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving %s on http://%s:%d/ (API: /openapi.json)%s", pipe.source, shown, port,
                "; clients must send the bearer token" if config.token else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

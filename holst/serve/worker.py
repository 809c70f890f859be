"""The generation queue of ``holst serve``: one thread owns the pipeline and samples compatible jobs together.

Requests that arrive within ``batch_window_ms`` of each other and share sampling settings (and
whether they carry an image prompt) are sampled as one device batch; every image keeps its own
seed, so batching changes no image. The queue is bounded (:class:`QueueFull` -> 503). Events go
back to the asyncio side through ``loop.call_soon_threadsafe``; a job whose client has gone is
marked ``cancelled``, and a batch whose jobs are all cancelled stops at its next sampling step.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import secrets
import threading
import time
from typing import Any

import torch
from PIL import Image

from holst.config import ServeConfig
from holst.serve.schemas import GenerateRequestBase, RequestError
from holst.utils.images import make_grid
from holst.utils.runtime import get_logger

logger = get_logger("holst.serve")


class QueueFull(Exception):
    """The job queue holds ``max_queue`` jobs; the client should retry later (503)."""


class BatchCancelled(Exception):
    """Every job of the running batch was cancelled (its clients hung up): stop sampling."""


def png_bytes(image: Image.Image) -> bytes:
    """Encode one PIL image as PNG bytes (deterministic, no metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the queue.

    Attributes:
        request: the validated request; settings: resolved ``SamplingSettings``; seeds: one per image.
        image_prompt: (PIL image, rows kept) or None. stream: whether previews are wanted.
        loop / events: the asyncio loop and queue that receive (name, data) events; ("done", None) ends.
    """

    request: GenerateRequestBase
    settings: Any  # holst.sampling.SamplingSettings
    seeds: list[int]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    image_prompt: tuple[Image.Image, int] | None = None
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    best_png: bytes | None = None
    error: RequestError | None = None
    cancelled: bool = False
    warnings: list[str] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.monotonic)

    def key(self) -> tuple:
        """Jobs with equal keys can share a sampling batch."""
        return (*self.settings.batch_key(), self.image_prompt is not None)

    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        """Hand an event to the asyncio side (dropped if the loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (name, data))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def finish(self) -> None:
        """Mark the job done and tell the asyncio side."""
        self.done.set()
        self.emit("done", None)


class ImageStore:
    """The last ``capacity`` images as PNG bytes under unguessable ids (bounded memory)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """Store PNG bytes (dropping the oldest beyond ``capacity``); returns their new id."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG bytes stored under ``key``, or None when unknown or dropped."""
        with self._lock:
            return self._items.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class BatchWorker:
    """Owns the pipeline; groups queued jobs with equal keys into device batches."""

    def __init__(self, pipe: Any, config: ServeConfig, store: ImageStore) -> None:
        self.pipe = pipe
        self.config = config
        self.store = store
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self.busy = False
        self.batches_run = 0
        self.cancelled_batches = 0
        self.images_made = 0
        self._thread = threading.Thread(target=self._loop, name="holst-batch-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker thread to stop and wait for it (up to 10 s)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def depth(self) -> int:
        """Jobs waiting in the queue."""
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
            batch, total, key = [first], first.settings.num_images, first.key()
            for job in list(self._queue):
                n = job.settings.num_images
                if job.key() == key and total + n <= self.config.max_batch_images:
                    self._queue.remove(job)
                    batch.append(job)
                    total += n
            return batch

    def _images_compatible(self, first: Job) -> int:
        key = first.key()
        return sum(j.settings.num_images for j in self._queue if j.key() == key)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for job in batch:
                if job.cancelled:
                    job.finish()
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            self.busy = True
            try:
                self._run(batch)
            except BatchCancelled:
                self.cancelled_batches += 1
                for job in batch:
                    job.error = RequestError(499, "cancelled: the client went away")
                    job.finish()
            except RequestError as e:  # e.g. an image prompt the model cannot read
                for job in batch:
                    if not job.done.is_set():
                        job.error = e
                        job.finish()
            except Exception as e:  # one bad batch must not kill the server
                logger.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    if not job.done.is_set():
                        job.error = RequestError(500, f"generation failed: {type(e).__name__}")
                        job.finish()
            finally:
                self.busy = False

    def _image_prompt(self, batch: list[Job]) -> Any:
        """Per-row ``ImagePrompt`` (B, N) codes and masks over the batch's images, or None."""
        if batch[0].image_prompt is None:
            return None
        from holst.sampling import ImagePrompt

        D = self.pipe.dalle.config.image_tokens_per_dim
        codes, masks = [], []
        for job in batch:
            image, rows = job.image_prompt
            mask = torch.zeros(D, D, dtype=torch.bool)
            mask[:rows] = True
            try:
                ip = self.pipe.prepare_image_prompt(image, mask)
            except ValueError as e:
                raise RequestError(422, f"field 'image_prompt': {e}") from None
            n = job.settings.num_images
            codes.append(ip.codes.reshape(1, -1).expand(n, -1))
            masks.append(ip.mask.reshape(1, -1).expand(n, -1))
        return ImagePrompt(codes=torch.cat(codes), mask=torch.cat(masks))  # (B, N) each

    @torch.inference_mode()
    def _run(self, batch: list[Job]) -> None:
        pipe, cfg = self.pipe, self.config
        for job in batch:
            job.emit("started", {"batch_jobs": len(batch), "batch_images": sum(j.settings.num_images for j in batch)})
        # 1. one text-ids row and one seed per image, over every job of the batch
        text_ids = torch.cat([pipe.encode_prompts([j.request.prompt], warn=False).expand(j.settings.num_images, -1)
                              for j in batch])
        seeds = [s for j in batch for s in j.seeds]
        image_prompt = self._image_prompt(batch)
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
                if all(j.cancelled for j in batch):
                    raise BatchCancelled()
                if step % every and step != N:
                    return
                self._send_previews(owners, _start, step, N, codes_so_far)

            ip = None
            if image_prompt is not None:
                ip = type(image_prompt)(codes=image_prompt.codes[start:end], mask=image_prompt.mask[start:end])
            chunks.append(pipe.sample_codes(text_ids[start:end], seeds[start:end], settings, image_prompt=ip,
                                            progress=progress))
        codes = torch.cat([c for c, _ in chunks])
        ppl = torch.cat([p for _, p in chunks])
        self.batches_run += 1
        # 3. per job: decode, rank, upscale, store PNGs, answer
        row = 0
        for job in batch:
            n = job.settings.num_images
            if job.cancelled:
                job.finish()
            else:
                out = pipe.finish(job.request.prompt, codes[row:row + n], job.seeds, job.settings,
                                  perplexities=ppl[row:row + n])
                self.images_made += len(out.images)  # before the answer: a client may ask /health right after it
                self._answer(job, out)
            row += n

    def _send_previews(self, owners: list[tuple[Job, int]], start: int, step: int, total: int,
                       codes_so_far: torch.Tensor) -> None:
        rows = [r for r in range(codes_so_far.shape[0]) if owners[start + r][0].stream
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

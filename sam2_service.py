"""The SAM2 service: Mask Studio's segmentation protocol (docs/sam2-protocol.md) over HTTP, any in-process engine.

    python sam2_service.py        # HOST, PORT and the app's settings (engine, S3, limits) from the environment

`POST /segment` with `{"image": <base64>, "mode": "auto"}` answers `{"masks": [SAM2 records]}`; with points
and/or a box it answers the best mask as `{"masks": [record], "mask_url": url | null}`, `mask_url` being the
old S3 service's answer: the mask as a full-size 0/255 PNG at `sam2-api-masks/YYYYMMDD_HHMMSS_<8 hex>.png`,
null without S3 or when the upload failed (logged; the answer is still given). An answer also carries
`image_sha256` when the service kept the image: a later request may then send that hash instead of the
image, and gets 409 with `"image_needed": true` when this copy no longer has it (service_images).
`GET /health` names the engine, device and model; `/docs` is the OpenAPI page.

What it guards, in this order: the token (SAM_SERVICE_TOKEN: `Authorization: Bearer`, compared in constant
time, never logged) and the request size (from MAX_UPLOAD_MB) before the body is read; the pixel count
(MAX_IMAGE_PIXELS) before pixels are decoded; then SAM_SERVICE_CONCURRENCY inferences at once with up to
SAM_SERVICE_QUEUE more waiting, and 429 + Retry-After beyond; SAM_SERVICE_TIMEOUT seconds per request, after
which the engine is told to stop and the caller gets 504. Every refusal is `{"detail": "<a sentence>"}`.
The service keeps no state between requests except bounded caches (the engine's embeddings, the decoded
images by hash: SAM_SERVICE_IMAGE_CACHE_MB), which a request can always do without, so any number of copies
can stand behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

import masks as rle
from errors import (
    InvalidInput,
    LimitExceeded,
    MaskStudioError,
    SegmentationCancelled,
    SegmentationError,
    SegmentationRejected,
    SegmentationUnavailable,
    StorageError,
)
from service_images import ImageStore, UnknownImage, checked_sha256
from settings import Settings, env_number, host_port

log = logging.getLogger("mask_studio.sam2_service")

BODY_SLACK = 1024 * 1024  # JSON around the base64 image: prompts, params
# Idle connections stay open longer than Mask Studio's client keeps them (60 s), so the client, not the
# service, closes them: never a request sent on a connection the service is closing. uvicorn's default is 5 s.
KEEP_ALIVE = 75
SEGMENT_PATH = "/segment"


# ---------------------------------------------------------------------------------------------------------
# Options of the service itself (the engine, S3 and limits are the app's Settings).


@dataclass(frozen=True)
class ServiceOptions:
    token: str | None = field(default=None, repr=False)
    concurrency: int = 1  # inferences at once: one per GPU is right for SAM2; more only helps on many cores
    queue: int = 8  # requests waiting for an inference slot before 429
    timeout: float = 120.0  # seconds a request may wait and run
    image_cache_mb: int = 256  # decoded images kept by hash, so prompts need not resend them

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceOptions:
        env = os.environ if env is None else env
        token = (env.get("SAM_SERVICE_TOKEN") or "").strip() or None
        return cls(
            token=token,
            concurrency=_or(env_number(env, int, ("SAM_SERVICE_CONCURRENCY",), 1), cls.concurrency),
            queue=_or(env_number(env, int, ("SAM_SERVICE_QUEUE",), 0), cls.queue),
            timeout=_or(env_number(env, float, ("SAM_SERVICE_TIMEOUT",), 0.001), cls.timeout),
            image_cache_mb=_or(env_number(env, int, ("SAM_SERVICE_IMAGE_CACHE_MB",), 0), cls.image_cache_mb),
        )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---------------------------------------------------------------------------------------------------------
# The request, as /docs shows it.


class SegmentRequest(BaseModel):
    """Mask Studio's request (docs/sam2-protocol.md). Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    image: str | None = Field(
        None, description="The image file (PNG, JPEG, ...) as base64 or a data: URL. Needed unless image_sha256 is."
    )
    image_sha256: str | None = Field(
        None,
        description="SHA-256 (hex) of the image file. Alone: use the image sent earlier with this hash (409 with "
        "image_needed when this service does not have it). With image: checked against it.",
    )
    mode: Literal["auto", "points"] | None = Field(
        None, description="auto: every mask; points: one object. Default: points when points or box are given."
    )
    params: dict[str, Any] | None = Field(None, description="SAM2 generator arguments: hints, ignored.")
    points: list[tuple[float, float]] | None = Field(None, description="[[x, y], ...] in the image's pixels.")
    point_labels: list[int] | None = Field(None, description="1 include, 0 exclude, one per point (default 1).")
    box: tuple[float, float, float, float] | None = Field(None, description="[x0, y0, x1, y1] in pixels.")
    upload: bool = Field(False, description="auto only: also upload each mask to S3 and add its mask_url.")


# ---------------------------------------------------------------------------------------------------------
# Bounded inference: a fixed pool of workers and a bounded queue in front of it.


class Busy(Exception):
    """Every inference slot and queue place is taken."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class Gate:
    """At most `concurrency` jobs at once and `queue` waiting; past that `submit` raises Busy.

    A job's slot is held until its thread really ends (a timed-out job still running keeps it), so the
    number of inferences in flight never exceeds the bound."""

    def __init__(self, concurrency: int, queue: int):
        self.concurrency = concurrency
        self.limit = concurrency + queue
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sam2-inference")
        self._lock = threading.Lock()
        self._pending = 0
        self._seconds = 1.0  # running mean of a job's duration, for Retry-After

    def submit(self, job: Callable[[], Any], cancel: threading.Event) -> Future:
        with self._lock:
            if self._pending >= self.limit:
                raise Busy(self._retry_after())
            self._pending += 1
        return self._pool.submit(self._run, job, cancel)

    def _run(self, job: Callable[[], Any], cancel: threading.Event) -> Any:
        start = time.monotonic()
        try:
            if cancel.is_set():  # timed out while it waited in the queue
                raise SegmentationCancelled("The request timed out before an inference slot was free.")
            return job()
        finally:
            with self._lock:
                self._pending -= 1
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - start)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._seconds * self._pending / self.concurrency))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------
# Token and size, checked before the body is read (a plain ASGI middleware: no body is buffered for it).


class Guard:
    """Refuses a request to /segment without the right token (401) or with a body over the limit (413)."""

    def __init__(self, app: Any, *, token: str | None, max_body: int, max_upload_mb: int):
        self.app = app
        self._token = token.encode() if token else None
        self.max_body = max_body
        self.max_upload_mb = max_upload_mb

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != SEGMENT_PATH:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self._token is not None and not self._authorized(headers.get(b"authorization", b"")):
            await _refuse(send, 401, "A valid 'Authorization: Bearer <token>' header is required (SAM_SERVICE_TOKEN).")
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _refuse(send, 413, self._too_large())
            return
        seen = 0
        too_large = False

        async def counted_receive() -> dict:
            # Past the limit the body is cut short (the app then fails to parse it) and its answer is
            # replaced by a 413 below: raising here would be turned into a 400 by FastAPI's body reader.
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                too_large = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: dict) -> None:
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start":
                await _refuse(send, 413, self._too_large())

        await self.app(scope, counted_receive, guarded_send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, given = header.partition(b" ")
        # compare_digest takes as long whatever the first wrong byte: the token cannot be guessed by timing.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token or b"")

    def _too_large(self) -> str:
        return f"The request is larger than this service accepts (images up to {self.max_upload_mb} MB, MAX_UPLOAD_MB)."


async def _refuse(send: Callable, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------------------------------
# The app.


def build_service(
    settings: Settings,
    segmenter: Any,
    *,
    options: ServiceOptions | None = None,
    s3: Any = None,
    images: ImageStore | None = None,
) -> Guard:
    """The ASGI app serving `segmenter` (any Segmenter); `s3` an s3_store.S3BlobStore or None; `images` the
    store of images by hash (default: options.image_cache_mb of them).

    It is the FastAPI app (`.app`) behind the token and size guard."""
    options = options or ServiceOptions()
    gate = Gate(options.concurrency, options.queue)
    images = images if images is not None else ImageStore(options.image_cache_mb * 1024 * 1024)
    app = FastAPI(
        title="SAM2 service",
        summary="Mask Studio's segmentation protocol: automatic masks and prompted masks, optional S3 mask PNGs.",
    )
    app.state.gate, app.state.images = gate, images
    max_body = math.ceil(settings.max_upload_bytes * 4 / 3) + BODY_SLACK

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_errors(exc.errors())}, status_code=400)

    @app.exception_handler(MaskStudioError)
    async def _refused(request: Request, exc: MaskStudioError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("segmentation failed (%d): %s", status, exc.message)
        return JSONResponse({"detail": exc.message}, status_code=status)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("segmentation failed unexpectedly", exc_info=exc)
        detail = "The segmenter failed unexpectedly; the service's log has the details."
        return JSONResponse({"detail": detail}, status_code=500)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        detail = f"The service is busy ({gate.limit} requests in progress or waiting); retry in {exc.retry_after} s."
        return JSONResponse({"detail": detail}, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(UnknownImage)
    async def _unknown_image(request: Request, exc: UnknownImage) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "image_needed": True}, status_code=409)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Whether the engine is ready, and which engine, device and model answer."""
        ok, message = await run_in_threadpool(segmenter.health)
        body = {
            "ok": ok,
            "message": message,
            "engine": segmenter.engine,
            "device": str(getattr(segmenter, "device", "cpu")),
            "model": getattr(segmenter, "model_id", None),
            "s3": s3 is not None,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post(SEGMENT_PATH, responses={400: {}, 401: {}, 409: {}, 413: {}, 422: {}, 429: {}, 504: {}})
    async def segment(request: SegmentRequest) -> JSONResponse:
        """Automatic masks (`mode: auto`) or one object's mask (points and/or box)."""
        mode = request.mode or ("points" if request.points or request.box else "auto")
        if mode == "points" and not request.points and not request.box:
            raise InvalidInput("mode 'points' needs 'points' (with 'point_labels') or a 'box'.")
        if request.image is not None:
            sha256, image, kept = await run_in_threadpool(
                images.received, request.image, request.image_sha256, settings
            )
        elif request.image_sha256 is not None:  # a dictionary look-up: no thread hop for it
            sha256, kept = checked_sha256(request.image_sha256), True
            image = images.named(sha256)
        else:
            raise InvalidInput("The request needs 'image' (base64), or 'image_sha256' naming an image sent before.")
        known = {"image_sha256": sha256} if kept else {}  # the client may send just the hash next time
        cancel = threading.Event()
        if mode == "auto":
            job: Callable[[], Any] = lambda: segmenter.generate(image, cancel=cancel)  # noqa: E731
        else:
            points = [list(p) for p in request.points] if request.points else None
            box = list(request.box) if request.box else None
            job = lambda: segmenter.segment(  # noqa: E731
                image, points=points, point_labels=request.point_labels, box=box, cancel=cancel
            )
        future = gate.submit(job, cancel)
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), options.timeout)
        except TimeoutError:
            cancel.set()  # the engine stops at its next step; its slot frees when it does
            raise SegmentationCancelled(
                f"Segmentation took longer than {options.timeout:g} s (SAM_SERVICE_TIMEOUT) and was stopped."
            ) from None
        if mode == "auto":
            if request.upload and s3 is not None:
                await run_in_threadpool(_upload_all, s3, result)
            return JSONResponse({"masks": result, **known})
        mask_url = await run_in_threadpool(upload_mask, s3, result) if s3 is not None else None
        return JSONResponse({"masks": [result], "mask_url": mask_url, **known})

    return Guard(app, token=options.token, max_body=max_body, max_upload_mb=settings.max_upload_mb)


def status_for(exc: MaskStudioError) -> int:
    """The HTTP status of an error: 4xx for what the caller can change, 5xx for the service's side."""
    if isinstance(exc, LimitExceeded):
        return 413
    if isinstance(exc, InvalidInput):
        return 400
    if isinstance(exc, SegmentationCancelled):
        return 504
    if isinstance(exc, SegmentationRejected):
        return 422
    if isinstance(exc, SegmentationUnavailable):
        return 503
    if isinstance(exc, SegmentationError):
        return 502
    return 500


def describe_errors(errors: Sequence[dict]) -> str:
    """pydantic's validation errors as one sentence a person can act on."""
    if not errors:
        return "The request is not valid."
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "json_invalid":
        return 'The request body is not valid JSON: send {"image": <base64>, ...} (see /docs).'
    if first.get("type") == "missing":
        if not where:
            return 'Send a JSON body: {"image": <base64>, "mode": "auto"} or with points / box (see /docs).'
        return f"The request needs '{where}' (see /docs)."
    if not where:
        return (
            'The request body must be a JSON object such as {"image": <base64>, "mode": "auto"}, '
            "sent with Content-Type: application/json (see /docs)."
        )
    message = str(first.get("msg", "is not valid")).rstrip(".")
    more = f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"'{where}' is not valid: {message[0].lower() + message[1:]}{more}."


def upload_mask(s3: Any, record: dict) -> str | None:
    """The record's mask as a full-size 0/255 PNG in S3; its URL, or None without S3 or when the upload fails."""
    if s3 is None:
        return None
    key = s3.new_mask_key()
    try:
        s3.put(key, rle.to_png(rle.decode(record["segmentation"])), "image/png")
        return s3.url_for(key)
    except StorageError as exc:
        log.warning("mask upload to S3 failed, answering mask_url null: %s", exc.message)
        return None


def _upload_all(s3: Any, records: list[dict]) -> None:
    """Each record gains `mask_url` (null where its upload failed)."""
    keys = [s3.new_mask_key() for _ in records]
    report = s3.upload_many(
        ((key, rle.to_png(rle.decode(r["segmentation"]))) for key, r in zip(keys, records)), content_type="image/png"
    )
    uploaded = set(report.uploaded)
    for key, record in zip(keys, records):
        record["mask_url"] = s3.url_for(key) if key in uploaded else None
    if report.failed:
        log.warning("%d of %d mask uploads to S3 failed", report.n_failed, len(records))


# ---------------------------------------------------------------------------------------------------------
# Start-up.


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread for the duration of the block; yields its base URL.

    port 0 takes a free one. (Tests and benchmarks; `main` runs uvicorn in the foreground.)"""
    import uvicorn

    sock = listening_socket(host, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sam2-service", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the SAM2 service did not start")
            time.sleep(0.02)
        yield f"http://{host_port(host, sock.getsockname()[1])}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, for uvicorn to listen on.

    IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections whose socket says it is TCP.
    Without it each answer's body waited for the client's delayed ACK of its headers: 40 ms per request on Linux."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main() -> None:
    """Serve the configured engine on HOST:PORT (defaults 127.0.0.1:8000)."""
    import uvicorn
    from dotenv import load_dotenv

    from s3_store import S3BlobStore
    from segmenter import make_segmenter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_dotenv(".env", override=False)
    settings = Settings.from_env(dotenv_path=None)
    if "PORT" not in os.environ and "GRADIO_SERVER_PORT" not in os.environ:
        settings = settings.with_(port=8000)
    options = ServiceOptions.from_env()
    segmenter, note = make_segmenter(settings)
    if note:
        log.warning("%s", note)
    try:
        s3 = S3BlobStore.from_settings(settings)
    except MaskStudioError as exc:
        log.warning("S3 is not used (mask_url will be null): %s", exc.message)
        s3 = None
    log.info(
        "SAM2 service: %s; S3 %s; token %s; %d at once, %d waiting, %g s per request; images cached: %d MB",
        segmenter.engine,
        s3 if s3 is not None else "off",
        "required" if options.token else "not required",
        options.concurrency,
        options.queue,
        options.timeout,
        options.image_cache_mb,
    )
    app = build_service(settings, segmenter, options=options, s3=s3)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_keep_alive=KEEP_ALIVE)
    finally:
        segmenter.close()


if __name__ == "__main__":
    main()

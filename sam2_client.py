"""Segmenters: the `Segmenter` interface every engine implements, and the factory that picks one.

Engines:
- the built-in classical segmenter (`builtin_segmenter.BuiltinSegmenter`), used when SAM_API_URL is unset;
- the external SAM2 service client (HTTP, this module), used when SAM_API_URL is set.

A mask record has the SAM2 automatic-mask-generator shape:
    {"segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}, "area": int,
     "bbox": [x, y, w, h], "predicted_iou": float | None, "stability_score": float | None,
     "point_coords": [[x, y]] | None, "crop_box": [x, y, w, h]}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx
import numpy as np
from PIL import Image

import masks as rle
from errors import (
    InvalidInput,
    SegmentationAuthError,
    SegmentationBadResponse,
    SegmentationBusy,
    SegmentationCancelled,
    SegmentationEndpointNotFound,
    SegmentationError,
    SegmentationImageTooLarge,
    SegmentationMaskURLError,
    SegmentationPredictionFailed,
    SegmentationRejected,
    SegmentationServerError,
    SegmentationTimeout,
    SegmentationUnavailable,
    SegmentationUnreachable,
)
from settings import Settings

# progress(fraction 0..1, description)
Progress = Callable[[float, str], None]


class Segmenter(Protocol):
    engine: str  # shown to people: which engine produced the masks

    def generate(self, image: np.ndarray, *, progress: Progress | None = None) -> list[dict]:
        """Automatic masks of an upright RGB uint8 HxWx3 image, as SAM2 records (overlapping, unsorted)."""

    def segment(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
    ) -> dict:
        """One object's mask from point prompts (label 1 include, 0 exclude) and/or a box [x0, y0, x1, y1]."""

    def health(self) -> tuple[bool, str]:
        """(ok, a short sentence for the status line); must not block for long."""

    def close(self) -> None:
        """Release connections and threads."""


# ---------------------------------------------------------------------------------------------------------
# The external SAM2 service client. Protocol documented in docs/sam2-protocol.md.

log = logging.getLogger("mask_studio.sam2")

PROTOCOLS = ("mask-studio", "cog", "replicate")
DEFAULT_PARAMS = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
REPLICATE_FILE_HOSTS = ("replicate.delivery",)  # where hosted predictions put their output files
CONNECT_TIMEOUT = 10.0
HEALTH_TIMEOUT = 3.0
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_MASK_BYTES = 16 * 1024 * 1024
DUPLICATE_IOU = 0.95
PNG_MAX_PIXELS = 1 << 20  # up to 1 MP sent as lossless PNG; larger images as JPEG q95 (5-10x smaller)
TICK = 0.05  # how often the caller's thread looks at cancel / deadline
PROGRESS_EVERY = 0.5
GRACE = 1.0  # the worker's own timeouts fire first and say more; this is the backstop

T = TypeVar("T")


@dataclass(frozen=True)
class _Frame:
    """The original image size, the size actually sent, and the most pixels a mask may claim."""

    orig: tuple[int, int]  # (H, W)
    sent: tuple[int, int]  # (h, w)
    max_pixels: int


@dataclass
class _Raw:
    """One mask as the service described it, before decoding."""

    segmentation: Any
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: Any = None
    crop_box: Any = None


@dataclass
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    url: str
    retries: int = 0
    retry_after_refused: float | None = None  # Retry-After asked for more time than SAM_API_TIMEOUT leaves


@dataclass
class _Call:
    """State shared by the caller's thread (progress, cancel, deadline) and the worker doing the HTTP."""

    deadline: float
    budget: float
    service: str
    stop: threading.Event = field(default_factory=threading.Event)
    fraction: float = 0.0
    text: str = "Preparing the image"
    waiting_since: float | None = None
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def report(self, fraction: float, text: str, *, waiting: bool = False) -> None:
        """Set the phase; while waiting, progress creeps on from the moment the waiting began."""
        if waiting and self.waiting_since is not None:
            self.text = text
            return
        self.fraction, self.text = fraction, text
        self.waiting_since = time.monotonic() if waiting else None

    def progress_now(self) -> tuple[float, str]:
        now = time.monotonic()
        if self.waiting_since is None:
            return self.fraction, self.text
        # Creep towards 0.8 while waiting: the service gives no percentage.
        crept = self.fraction + (0.8 - self.fraction) * (1 - math.exp(-(now - self.waiting_since) / 20))
        return crept, f"{self.text} ({now - self.started:.0f} s)"

    def timeout_error(self) -> SegmentationTimeout:
        return SegmentationTimeout(
            f"The {self.service} did not finish within {self.budget:g} s (SAM_API_TIMEOUT). "
            "Try again, use a smaller image (SAM_MAX_SIDE) or raise SAM_API_TIMEOUT."
        )

    def check(self) -> None:
        """Raise if the caller gave up or the time is over; called between steps."""
        if self.stop.is_set():
            raise SegmentationCancelled("Segmentation cancelled.")
        if self.remaining() <= 0:
            raise self.timeout_error()


class HttpSegmenter:
    """The Segmenter that asks an external SAM2 service over HTTP (protocol: settings.sam_api_protocol)."""

    max_mask_bytes = MAX_MASK_BYTES
    max_response_bytes = MAX_RESPONSE_BYTES

    def __init__(
        self, settings: Settings, *, transport: httpx.BaseTransport | None = None, backoff: float = 1.0
    ):
        if not settings.sam_api_url:
            raise InvalidInput("SAM_API_URL is not set.", title="Configuration error")
        if settings.sam_api_protocol not in PROTOCOLS:
            raise InvalidInput(
                f"SAM_API_PROTOCOL must be one of {', '.join(PROTOCOLS)}; got {settings.sam_api_protocol!r}.",
                title="Configuration error",
            )
        parts = urlsplit(settings.sam_api_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = _safe_url(settings.sam_api_url)
            raise InvalidInput(
                f"SAM_API_URL must be an http:// or https:// address; got {shown!r}.",
                title="Configuration error",
            )
        self._settings = settings
        self._protocol = settings.sam_api_protocol
        self._token = settings.sam_api_token
        self._auth: dict[str, str] = {}
        if self._token:
            self._auth["Authorization"] = f"Bearer {self._token}"
        elif parts.username is not None:
            # Credentials in the URL become a header, so the URL itself (logged by httpx) carries none.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._auth["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            self._token = base64.b64encode(pair).decode("ascii")  # redacted like a token
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self._parts = (parts.scheme, netloc, parts.path.rstrip("/"), parts.query)
        self._base = self._endpoint("")
        self._origin = (parts.scheme, parts.hostname.lower(), parts.port)
        path = settings.sam_api_segment_path or "/segment"
        self._segment_path = path if path.startswith("/") else "/" + path
        hosts = [h.lower().lstrip("*").lstrip(".") for h in settings.sam_mask_url_hosts]
        if self._protocol == "replicate":
            hosts += REPLICATE_FILE_HOSTS
        self._mask_hosts = tuple(h for h in hosts if h)
        self._timeout = float(settings.sam_api_timeout)
        self._connect_timeout = min(CONNECT_TIMEOUT, self._timeout)
        self._retries = max(0, int(settings.sam_api_retries))
        self._backoff = backoff
        self.engine = f"SAM2 service at {_safe_url(self._base)}"
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(self._timeout, connect=self._connect_timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            headers={"User-Agent": "mask-studio"},
        )
        self._auto_lock = threading.Lock()
        self._auto_cache: tuple[bytes, list[dict]] | None = None  # cog/replicate: last automatic result

    def _endpoint(self, suffix: str) -> str:
        """SAM_API_URL with `suffix` added to its path (a query string, if any, stays at the end)."""
        scheme, netloc, path, query = self._parts
        return urlunsplit((scheme, netloc, path + suffix, query, ""))

    # -- the Segmenter interface -------------------------------------------------------------------------

    def generate(
        self,
        image: np.ndarray,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        params: dict | None = None,
    ) -> list[dict]:
        """Automatic masks from the service, normalised to SAM2 records and capped at settings.max_masks."""
        _check_image(image)
        params = {**DEFAULT_PARAMS, **(params or {})}
        records = self._run(lambda call: self._auto(call, image, params), progress, cancel)
        if self._protocol != "mask-studio":
            with self._auto_lock:
                self._auto_cache = (_image_key(image, params), [dict(r) for r in records])
        return records

    def segment(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """One object's mask from point / box prompts (cog and replicate: picked from the automatic masks)."""
        _check_image(image)
        points, point_labels, box = _check_prompts(image.shape[:2], points, point_labels, box)
        if self._protocol == "mask-studio":
            return self._run(
                lambda call: self._prompted(call, image, points, point_labels, box), progress, cancel
            )
        # cog / replicate (e.g. meta/sam-2) only generate automatically: one paid call per image, then every
        # click on that image is answered from the cached masks.
        key = _image_key(image, DEFAULT_PARAMS)
        with self._auto_lock:
            cached = self._auto_cache[1] if self._auto_cache and self._auto_cache[0] == key else None
        records = cached if cached is not None else self.generate(image, progress=progress, cancel=cancel)
        chosen = pick_for_prompt(records, points, point_labels, box)
        if chosen is not None:
            return dict(chosen)
        raise SegmentationRejected(
            f"None of the {len(records)} masks the {self.engine} found covers all include points "
            "without an exclude point (this protocol cannot segment from prompts directly)."
        )

    def health(self) -> tuple[bool, str]:
        """GET {url}/health, falling back to GET {url}; (ok, sentence) within about 3 s, never raises."""
        start = time.monotonic()
        reply = None
        try:
            for url in (self._endpoint("/health"), self._base):
                left = HEALTH_TIMEOUT - (time.monotonic() - start)
                if left <= 0.05:
                    break
                reply = self._client.get(url, headers=self._auth, timeout=httpx.Timeout(left))
                reply.close()
                if reply.status_code not in (404, 405):
                    break
        except httpx.TimeoutException:
            return False, f"The {self.engine} did not answer within {HEALTH_TIMEOUT:g} s."
        except httpx.ConnectError as exc:
            return False, f"The {self.engine} cannot be reached: {self._connect_reason(exc, self._base)}."
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client is closed
            return False, f"The {self.engine} cannot be reached ({type(exc).__name__})."
        if reply is None:
            return False, f"The {self.engine} did not answer within {HEALTH_TIMEOUT:g} s."
        status = reply.status_code
        if status in (401, 403):
            return False, f"The {self.engine} rejects the token (HTTP {status}): check SAM_API_TOKEN."
        if status >= 500:
            return False, f"The {self.engine} answers with an error (HTTP {status})."
        how = "health check OK" if reply.url.path.endswith("/health") and status < 300 else f"HTTP {status}"
        return True, f"The {self.engine} answers ({how})."

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()

    def __enter__(self) -> HttpSegmenter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one call: a worker thread does the HTTP; the caller's thread reports progress and can give up -----

    def _run(self, job: Callable[[_Call], T], progress: Progress | None, cancel: threading.Event | None) -> T:
        if cancel is not None and cancel.is_set():
            raise SegmentationCancelled("Segmentation cancelled before it started.")
        call = _Call(deadline=time.monotonic() + self._timeout, budget=self._timeout, service=self.engine)
        done = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = job(call)
            except Exception as exc:  # handed to the caller's thread below
                box["error"] = exc
                if call.stop.is_set():
                    log.debug("abandoned SAM2 call ended with %s", type(exc).__name__)
            finally:
                done.set()

        threading.Thread(target=work, name="sam2-call", daemon=True).start()
        last, shown = 0.0, 0.0
        try:
            if progress is not None:
                progress(0.0, f"Sending the image to the {self.engine}")
            while not done.wait(TICK):
                if cancel is not None and cancel.is_set():
                    what = " (the prediction is being cancelled too)" if self._protocol == "replicate" else ""
                    raise SegmentationCancelled(f"Segmentation cancelled{what}.")
                if call.remaining() < -GRACE:
                    raise call.timeout_error()
                now = time.monotonic()
                if progress is not None and now - last >= PROGRESS_EVERY:
                    fraction, text = call.progress_now()
                    last, shown = now, max(shown, fraction)  # never backwards, whatever the phase says
                    progress(shown, text)
        finally:
            if not done.is_set():
                call.stop.set()  # the worker stops at its next step (and cancels a replicate prediction)
        if "error" in box:
            raise box["error"]
        if progress is not None:
            progress(1.0, f"Received the answer of the {self.engine}")
        return box["value"]

    def _auto(self, call: _Call, image: np.ndarray, params: dict) -> list[dict]:
        data, mime, frame = _prepare(image, self._settings)
        if self._protocol == "mask-studio":
            body = {"image": base64.b64encode(data).decode("ascii"), "mode": "auto", "params": params}
        else:
            body = {"input": {"image": _data_url(data, mime), **params}}
        payload, base_url = self._ask(call, body, frame)
        records = self._collect(call, payload, frame, base_url)
        records = keep_best(records, self._settings.max_masks)
        log.info("%s: %d masks in %.1f s", self.engine, len(records), time.monotonic() - call.started)
        return records

    def _prompted(self, call: _Call, image: np.ndarray, points, labels, box) -> dict:
        data, _, frame = _prepare(image, self._settings)
        (H, W), (h, w) = frame.orig, frame.sent
        sx, sy = w / W, h / H
        body: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii"), "mode": "points"}
        if points:
            body["points"] = [[x * sx, y * sy] for x, y in points]
            body["point_labels"] = labels
        if box:
            body["box"] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        payload, base_url = self._ask(call, body, frame)
        records = self._collect(call, payload, frame, base_url)
        if not records:
            raise SegmentationRejected(f"The {self.engine} returned no mask for these points.")
        return max(records, key=_rank)

    def _ask(self, call: _Call, body: dict, frame: _Frame) -> tuple[Any, str]:
        """Send the request the protocol wants; (the decoded answer, the URL it came from)."""
        content = json.dumps(body).encode()
        headers = {**self._auth, "Content-Type": "application/json"}
        h, w = frame.sent
        call.report(0.05, f"Sending a {w}×{h} image to the {self.engine}")
        log.debug("%s: sending a %d×%d image (%d KB)", self.engine, w, h, len(content) // 1024)
        if self._protocol == "mask-studio":
            url = self._endpoint(self._segment_path)
        elif self._protocol == "cog":
            url = self._endpoint("/predictions")
        else:
            url = self._base
            headers["Prefer"] = "wait"
        call.report(0.05, f"Waiting for the {self.engine}", waiting=True)
        reply = self._send(call, "POST", url, content=content, headers=headers)
        self._check_service(reply, "POST", url, frame, len(content))
        payload = self._json(reply)
        if self._protocol != "mask-studio":
            payload, url = self._settle(call, payload, url)
        return payload, url

    def _settle(self, call: _Call, prediction: Any, url: str) -> tuple[Any, str]:
        """Follow a cog/replicate prediction object until it ends; cancel it if we give up on the way."""
        delay = 0.5 * self._backoff
        cancel_url = None
        try:
            while True:
                if not isinstance(prediction, dict) or "status" not in prediction:
                    raise SegmentationBadResponse(
                        f"The {self.engine} did not answer a prediction object with a 'status' "
                        f"(got {_describe_json(prediction)})."
                    )
                status = prediction["status"]
                urls = prediction.get("urls") if isinstance(prediction.get("urls"), dict) else {}
                cancel_url = urls.get("cancel") or cancel_url
                if status == "succeeded":
                    cancel_url = None
                    return prediction.get("output"), url
                if status in ("failed", "canceled", "aborted"):
                    cancel_url = None
                    detail = self._redact(str(prediction.get("error") or "no reason given"))
                    raise SegmentationPredictionFailed(f"The SAM2 prediction {status}: {detail}")
                if status not in ("starting", "processing"):
                    raise SegmentationBadResponse(f"The {self.engine} reported an unknown status {status!r}.")
                poll = urls.get("get")
                if not isinstance(poll, str):
                    raise SegmentationBadResponse(
                        f"The {self.engine} says the prediction is {status} but gives no urls.get to follow."
                    )
                call.report(0.1, f"SAM2 prediction {status}", waiting=True)
                if call.stop.wait(max(0.0, min(delay, call.remaining()))):
                    call.check()
                call.check()
                url = urljoin(url, poll)
                reply = self._send(call, "GET", url, headers=self._headers_for(url))
                self._check_service(reply, "GET", url)
                prediction = self._json(reply)
                delay = min(delay * 1.5, 5.0 * self._backoff)
        finally:
            if cancel_url is not None:
                self._cancel_prediction(urljoin(url, cancel_url))

    def _cancel_prediction(self, url: str) -> None:
        """Best effort: a prediction we no longer wait for should stop costing money."""
        try:
            reply = self._client.post(url, headers=self._headers_for(url), timeout=HEALTH_TIMEOUT)
        except (httpx.HTTPError, RuntimeError) as exc:
            name = type(exc).__name__
            log.warning("Could not cancel the SAM2 prediction at %s (%s).", _safe_url(url), name)
            return
        log.info("Cancelled the SAM2 prediction at %s (HTTP %d).", _safe_url(url), reply.status_code)

    # -- HTTP with retries -----------------------------------------------------------------------------

    def _send(
        self,
        call: _Call,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        mask: bool = False,
    ) -> _Reply:
        """One exchange, repeated only on 429/5xx and failures to connect (never after a read timeout)."""
        what = f"mask URL {_safe_url(url)}" if mask else self.engine
        attempt = 0
        while True:
            call.check()
            left = call.remaining()
            timeout = httpx.Timeout(left, connect=min(self._connect_timeout, left))
            failure: SegmentationError | None = None
            cause: Exception | None = None
            reply: _Reply | None = None
            try:
                reply = self._exchange(call, method, url, content, headers, timeout, mask)
            except httpx.ConnectTimeout as exc:
                failure, cause = SegmentationTimeout(
                    f"Could not connect to the {what} within {self._connect_timeout:g} s."
                ), exc
            except httpx.ConnectError as exc:
                failure, cause = SegmentationUnreachable(
                    f"The {what} cannot be reached: {self._connect_reason(exc, url)}."
                ), exc
            except httpx.TimeoutException as exc:
                # The service may be working on it (and billing for it): report, do not send it again.
                if call.stop.is_set():
                    call.check()
                raise SegmentationTimeout(
                    f"The {what} did not answer within {self._timeout:g} s (SAM_API_TIMEOUT). "
                    "Try again, use a smaller image (SAM_MAX_SIDE) or raise SAM_API_TIMEOUT."
                ) from exc
            except httpx.HTTPError as exc:
                raise SegmentationUnavailable(
                    f"The connection to the {what} broke before a complete answer ({type(exc).__name__}); "
                    "it was not sent again, as the service may have run it."
                ) from exc
            retry_after = None
            if reply is not None:
                if reply.status != 429 and reply.status < 500:
                    return reply
                retry_after = _retry_after(reply.headers.get("Retry-After"))
            if attempt >= self._retries:
                if failure is not None:
                    raise failure from cause
                reply.retries = attempt
                return reply
            wait = retry_after if retry_after is not None else self._backoff * 2**attempt
            if wait >= call.remaining():
                if failure is not None:
                    raise failure from cause
                reply.retries = attempt
                reply.retry_after_refused = retry_after
                return reply
            why = f"HTTP {reply.status}" if reply is not None else type(cause).__name__
            how = "Retry-After" if retry_after is not None else "backoff"
            log.warning(
                "%s: %s; retrying in %.1f s (%s), retry %d of %d",
                what, why, wait, how, attempt + 1, self._retries,
            )
            if call.stop.wait(wait):
                call.check()
            attempt += 1

    def _exchange(self, call, method, url, content, headers, timeout, mask) -> _Reply:
        """Stream one response, capping its size and watching the deadline between chunks."""
        cap = self.max_mask_bytes if mask else self.max_response_bytes
        with self._client.stream(method, url, content=content, headers=headers, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                self._too_big(url, int(declared), cap, mask)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    self._too_big(url, size, cap, mask)
                chunks.append(chunk)
                call.check()  # a service trickling bytes must not outlast SAM_API_TIMEOUT
            return _Reply(response.status_code, response.headers, b"".join(chunks), str(response.url))

    def _too_big(self, url: str, size: int, cap: int, mask: bool) -> None:
        if mask:
            raise SegmentationMaskURLError(
                f"The mask at {_safe_url(url)} is larger than {cap // 1024} KB ({size // 1024} KB or more)."
            )
        raise SegmentationBadResponse(f"The {self.engine}'s answer is larger than {cap // 1024 // 1024} MB.")

    def _check_service(self, reply: _Reply, method: str, url: str, frame=None, sent_bytes=0) -> None:
        """Turn a non-2xx answer from the service into the exception that says what to do."""
        status = reply.status
        if 200 <= status < 300:
            return
        detail = self._detail(reply)
        where = f"{method} {_safe_url(url)}"
        if 300 <= status < 400:
            location = _safe_url(urljoin(url, reply.headers.get("Location", "")))
            raise SegmentationBadResponse(
                f"The {self.engine} redirected {where} to {location} (HTTP {status}); redirects are not "
                "followed: set SAM_API_URL to the final address."
            )
        if status in (401, 403):
            fix = "check SAM_API_TOKEN" if self._auth else "it needs a token: set SAM_API_TOKEN"
            raise SegmentationAuthError(
                f"The {self.engine} refused the token (HTTP {status}{detail}): {fix}.", title="Token rejected"
            )
        if status == 404:
            raise SegmentationEndpointNotFound(
                f"The {self.engine} answered 404 Not Found for {where}: check SAM_API_URL, "
                f"SAM_API_SEGMENT_PATH and SAM_API_PROTOCOL ({self._protocol}).",
                title="Segmentation service not found",
            )
        if status == 413:
            size = f"{sent_bytes / 1024 / 1024:.1f} MB, {frame.sent[1]}×{frame.sent[0]} px" if frame else "?"
            raise SegmentationImageTooLarge(
                f"The {self.engine} refused the image as too large (HTTP 413; {size} sent). "
                f"Lower SAM_MAX_SIDE (now {self._settings.sam_max_side}).",
                title="Image too large for the segmentation service",
            )
        after = f" after {reply.retries} retr{'y' if reply.retries == 1 else 'ies'}" if reply.retries else ""
        if reply.retry_after_refused is not None:
            after += f"; it asked to wait {reply.retry_after_refused:g} s, beyond SAM_API_TIMEOUT"
        if status == 429:
            raise SegmentationBusy(
                f"The {self.engine} is rate-limiting requests (HTTP 429{detail}){after}. Try again later."
            )
        if status >= 500:
            raise SegmentationServerError(f"The {self.engine} failed with HTTP {status}{detail}{after}.")
        raise SegmentationRejected(f"The {self.engine} refused the request (HTTP {status}{detail}).")

    def _json(self, reply: _Reply) -> Any:
        try:
            return json.loads(reply.body)
        except (ValueError, UnicodeDecodeError) as exc:
            kind = reply.headers.get("Content-Type", "no content type")
            start = self._redact(reply.body[:60].decode("utf-8", "replace"))
            raise SegmentationBadResponse(
                f"The {self.engine} did not answer JSON (HTTP {reply.status}, {kind}, starting {start!r}). "
                "Is SAM_API_URL the address of a SAM2 service?"
            ) from exc

    def _detail(self, reply: _Reply) -> str:
        """': <the service's own explanation>' (redacted and short), or ''."""
        text = ""
        try:
            data = json.loads(reply.body)
            if isinstance(data, dict):
                text = str(data.get("detail") or data.get("error") or data.get("message") or "")
        except (ValueError, UnicodeDecodeError):
            text = reply.body[:200].decode("utf-8", "replace") if b"<" not in reply.body[:1] else ""
        text = " ".join(self._redact(text).split())[:200]
        return f": {text}" if text else ""

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _headers_for(self, url: str) -> dict[str, str]:
        """The token goes to the service's own origin only, never to a file host."""
        parts = urlsplit(url)
        same = (parts.scheme, (parts.hostname or "").lower(), parts.port) == self._origin
        return dict(self._auth) if same else {}

    def _connect_reason(self, exc: Exception, url: str) -> str:
        text = str(exc)
        parts = urlsplit(url)
        if any(s in text for s in ("Name or service not known", "nodename nor servname", "getaddrinfo",
                                   "Temporary failure in name resolution", "No address associated")):
            return f"the host name {parts.hostname!r} could not be resolved (DNS)"
        if "refused" in text.lower() or "Errno 111" in text:
            return f"connection refused (nothing listens at {parts.hostname}:{parts.port or parts.scheme})"
        return self._redact(text) or type(exc).__name__

    # -- reading the answer ------------------------------------------------------------------------------

    def _collect(self, call: _Call, payload: Any, frame: _Frame, base_url: str) -> list[dict]:
        """Every mask of the answer decoded, fitted to the image, normalised; no empties, no duplicates."""
        raws = records_in(payload)
        out = []
        for i, raw in enumerate(raws):
            call.check()
            call.report(0.8 + 0.15 * i / max(1, len(raws)), f"Reading mask {i + 1} of {len(raws)}")
            mask = self._materialize(call, raw.segmentation, i, frame, base_url)
            record = _record(mask, raw, frame)
            if record is not None:
                out.append(record)
        merged = merge_duplicates(out)
        if len(merged) < len(raws):
            log.debug(
                "%s: %d masks read, %d empty dropped, %d near-duplicates merged",
                self.engine, len(raws), len(raws) - len(out), len(out) - len(merged),
            )
        return merged

    def _materialize(self, call: _Call, seg: Any, i: int, frame: _Frame, base_url: str) -> np.ndarray:
        """A segmentation in any of the accepted forms → boolean mask at the original image size."""
        if isinstance(seg, dict):
            mask = _rle_mask(seg, i, frame)
        elif isinstance(seg, str):
            text = seg.strip()
            if text.startswith("data:"):
                header, _, data = text.partition(",")
                if ";base64" not in header:
                    raise SegmentationBadResponse(f"Mask {i} is a data: URL without base64 data.")
                mask = _image_mask(_b64(data, i), i, frame, source=f"Mask {i}", error=SegmentationBadResponse)
            elif text.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
                url = urljoin(base_url, text)
                mask = _image_mask(
                    self._download(call, url, i), i, frame, source=f"The mask at {_safe_url(url)}",
                    error=SegmentationMaskURLError,
                )
            else:
                mask = _image_mask(_b64(text, i), i, frame, source=f"Mask {i}", error=SegmentationBadResponse)
        elif isinstance(seg, list):
            try:
                arr = np.asarray(seg, dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise SegmentationBadResponse(f"Mask {i} is a list but not a 2-D array of 0/1.") from exc
            if arr.ndim != 2:
                raise SegmentationBadResponse(f"Mask {i} is a list with {arr.ndim} dimensions, expected 2.")
            _check_size(arr.shape, i, frame, "Mask")
            mask = arr > 0.5
        else:
            raise SegmentationBadResponse(
                f"Mask {i}'s segmentation is a {type(seg).__name__}; expected an RLE, a base64 PNG or a URL."
            )
        return _resize_nearest(mask, frame.orig)

    def _download(self, call: _Call, url: str, i: int) -> bytes:
        parts = urlsplit(url)
        safe = _safe_url(url)
        if parts.scheme not in ("http", "https"):
            raise SegmentationMaskURLError(f"Mask {i}'s URL {safe} is not http or https; it was not fetched.")
        host = (parts.hostname or "").lower()
        if host != self._origin[1] and not any(host == h or host.endswith("." + h) for h in self._mask_hosts):
            raise SegmentationMaskURLError(
                f"Mask {i}'s URL is on {host}, which is neither the SAM2 service's host ({self._origin[1]}) "
                "nor listed in SAM_MASK_URL_HOSTS; it was not fetched."
            )
        try:
            reply = self._send(call, "GET", url, headers=self._headers_for(url), mask=True)
        except SegmentationUnreachable as exc:
            raise SegmentationMaskURLError(exc.message) from exc
        if reply.status != 200:
            raise SegmentationMaskURLError(f"The mask at {safe} could not be fetched (HTTP {reply.status}).")
        return reply.body


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: request preparation and response normalisation.


def make_segmenter(settings: Settings) -> Segmenter:
    """The HTTP client when SAM_API_URL is set, else the built-in segmenter."""
    if settings.sam_api_url:
        return HttpSegmenter(settings)
    from builtin_segmenter import BuiltinSegmenter  # heavy (scikit-image), only when it is the engine

    return BuiltinSegmenter(max_masks=settings.max_masks)


def records_in(payload: Any) -> list[_Raw]:
    """The masks of any accepted response shape: {"masks": [...]}, a bare list, Replicate's, {"mask_url"}."""
    scores = None
    if isinstance(payload, dict):
        if "masks" in payload:
            items, scores = payload["masks"], payload.get("scores")
        elif "individual_masks" in payload:
            items = payload["individual_masks"]
        elif "mask_url" in payload:
            if payload["mask_url"] is None:
                raise SegmentationBadResponse(
                    "The SAM2 service answered mask_url null: it produced no mask "
                    "(its own upload may have failed)."
                )
            items = [payload["mask_url"]]
        elif "segmentation" in payload or ("counts" in payload and "size" in payload):
            items = [payload]
        else:
            raise SegmentationBadResponse(
                f"The SAM2 service answered {_describe_json(payload)}; expected 'masks', 'individual_masks' "
                "or 'mask_url' (see docs/sam2-protocol.md)."
            )
    elif isinstance(payload, list):
        items = payload
    else:
        raise SegmentationBadResponse(f"The SAM2 service answered {_describe_json(payload)}, not masks.")
    if not isinstance(items, list):
        raise SegmentationBadResponse(f"The SAM2 service's masks are {_describe_json(items)}, not a list.")
    if not isinstance(scores, list) or len(scores) != len(items):
        scores = [None] * len(items)
    return [_raw(item, i, score) for i, (item, score) in enumerate(zip(items, scores))]


def _raw(item: Any, i: int, score: Any) -> _Raw:
    if isinstance(item, (str, list)):
        return _Raw(item, predicted_iou=_float(score))
    if not isinstance(item, dict):
        raise SegmentationBadResponse(f"Mask {i} is {_describe_json(item)}, not a record.")
    if "counts" in item and "size" in item:
        return _Raw(item, predicted_iou=_float(score))
    for key in ("segmentation", "mask_url", "mask"):
        if item.get(key) is not None:
            seg = item[key]
            break
    else:
        raise SegmentationBadResponse(f"Mask {i} has no 'segmentation' ({_describe_json(item)}).")
    iou = item.get("predicted_iou", item.get("score", score))
    stability = _float(item.get("stability_score"))
    return _Raw(seg, _float(iou), stability, item.get("point_coords"), item.get("crop_box"))


def _rle_mask(seg: dict, i: int, frame: _Frame) -> np.ndarray:
    size, counts = seg.get("size"), seg.get("counts")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
        or not isinstance(counts, (str, list))
    ):
        raise SegmentationBadResponse(
            f"Mask {i}'s RLE needs 'size': [h, w] and 'counts' (a string or integers)."
        )
    _check_size((size[0], size[1]), i, frame, "Mask")
    try:
        return rle.decode({"size": size, "counts": counts})
    except (InvalidInput, TypeError, ValueError) as exc:
        why = exc.message if isinstance(exc, InvalidInput) else "its counts are not integers"
        raise SegmentationBadResponse(f"Mask {i}'s RLE does not fit its size: {why}") from exc


def _image_mask(
    data: bytes, i: int, frame: _Frame, *, source: str, error: type[SegmentationRejected]
) -> np.ndarray:
    """PNG or JPEG bytes → boolean mask (alpha if it carries the mask, else brightness > 127)."""
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
        raise error(f"{source} is not a PNG or JPEG image (it starts with {data[:8]!r}).")
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size((im.height, im.width), i, frame, source)
            im.load()
            if "A" in im.getbands():
                alpha = np.asarray(im.getchannel("A"))
                if alpha.min() < 255:
                    return alpha > 127
            return np.asarray(im.convert("L")) > 127
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise error(f"{source} is a damaged image ({exc}).") from exc


def _check_size(shape: tuple[int, int], i: int, frame: _Frame, source: str) -> None:
    """A mask must be at the sent or original size, or at least have the image's proportions."""
    h, w = int(shape[0]), int(shape[1])
    if (h, w) in (frame.orig, frame.sent):
        return
    H, W = frame.orig
    # A service working at its own resolution: same proportions, within rounding.
    same_aspect = abs(h * W / w - H) <= max(1.5, 0.01 * H) and abs(w * H / h - W) <= max(1.5, 0.01 * W)
    if not same_aspect or h * w > frame.max_pixels:
        sent = f"{frame.sent[1]}×{frame.sent[0]}"
        if frame.sent != frame.orig:
            sent += f" (original {W}×{H})"
        name = source if source != "Mask" else f"Mask {i}"
        raise SegmentationBadResponse(f"{name} is {w}×{h}, but the image sent was {sent}: sizes disagree.")


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = mask.shape
    H, W = shape
    if (h, w) == (H, W):
        return mask
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.intp), w - 1)
    return mask[rows][:, cols]


def _record(mask: np.ndarray, raw: _Raw, frame: _Frame) -> dict | None:
    """The normalised record; area and bbox always from the final mask; None when empty."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return None
    (H, W), (h, w) = frame.orig, frame.sent
    sx, sy = W / w, H / h  # prompts and crops are in the coordinates of the image the service saw
    return {
        "segmentation": rle.encode(mask),
        "area": area,
        "bbox": rle.bbox_of(mask),
        "predicted_iou": raw.predicted_iou,
        "stability_score": raw.stability_score,
        "point_coords": _scaled(raw.point_coords, sx, sy, pairs=True),
        "crop_box": _scaled(raw.crop_box, sx, sy, pairs=False) or [0, 0, W, H],
    }


def _scaled(value: Any, sx: float, sy: float, *, pairs: bool) -> list | None:
    try:
        if pairs:
            return [[float(x) * sx, float(y) * sy] for x, y in value]
        x, y, w, h = (float(v) for v in value)
        return [round(x * sx), round(y * sy), round(w * sx), round(h * sy)]
    except (TypeError, ValueError):
        if value is not None:
            name = "point_coords" if pairs else "crop_box"
            log.debug("ignoring a malformed %s from the SAM2 service", name)
        return None


def _rank(record: dict) -> tuple:
    """Better first: has a predicted_iou, higher predicted_iou, larger."""
    iou = record.get("predicted_iou")
    return (iou is not None, iou or 0.0, record["area"])


def keep_best(records: list[dict], limit: int) -> list[dict]:
    """At most `limit` records: the highest predicted_iou, then the largest; the service's order kept."""
    if len(records) <= limit:
        return records
    best = sorted(range(len(records)), key=lambda k: _rank(records[k]), reverse=True)[:limit]
    return [records[k] for k in sorted(best)]


def merge_duplicates(records: list[dict], threshold: float = DUPLICATE_IOU) -> list[dict]:
    """Drop near-duplicates (IoU > threshold), keeping the better of each pair (_rank)."""
    order = sorted(range(len(records)), key=lambda k: records[k]["area"])
    crops: dict[int, np.ndarray] = {}

    def crop(k: int) -> np.ndarray:
        if k not in crops:
            x, y, w, h = records[k]["bbox"]
            crops[k] = rle.decode(records[k]["segmentation"])[y : y + h, x : x + w]
        return crops[k]

    dropped: set[int] = set()
    for pos, i in enumerate(order):
        if i in dropped:
            continue
        for j in order[pos + 1 :]:
            ai, aj = records[i]["area"], records[j]["area"]
            if ai <= threshold * aj:
                break  # IoU <= smaller / larger area: no later j can be a duplicate of i
            if j in dropped:
                continue
            if not _overlap(records[i]["bbox"], records[j]["bbox"]):
                continue
            inter = _intersection(records[i]["bbox"], crop(i), records[j]["bbox"], crop(j))
            if inter / (ai + aj - inter) > threshold:
                loser = i if _rank(records[i]) < _rank(records[j]) else j
                dropped.add(loser)
                if loser == i:
                    break
    return [r for k, r in enumerate(records) if k not in dropped]


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _intersection(ba: list[int], ca: np.ndarray, bb: list[int], cb: np.ndarray) -> int:
    x0, y0 = max(ba[0], bb[0]), max(ba[1], bb[1])
    x1, y1 = min(ba[0] + ba[2], bb[0] + bb[2]), min(ba[1] + ba[3], bb[1] + bb[3])
    sa = ca[y0 - ba[1] : y1 - ba[1], x0 - ba[0] : x1 - ba[0]]
    sb = cb[y0 - bb[1] : y1 - bb[1], x0 - bb[0] : x1 - bb[0]]
    return int(np.count_nonzero(sa & sb))


def pick_for_prompt(
    records: list[dict], points: list | None, labels: list[int] | None, box: list[float] | None
) -> dict | None:
    """The mask covering every include point and no exclude point that best fits the box (or ranks best)."""
    candidates = []
    for record in records:
        if points and not all(
            _covers(record, x, y) == bool(label) for (x, y), label in zip(points, labels or [1] * len(points))
        ):
            continue
        candidates.append(record)
    if not candidates:
        return None
    if box:
        return max(candidates, key=lambda r: (_box_iou(r["bbox"], box), _rank(r)))
    return max(candidates, key=_rank)


def _covers(record: dict, x: float, y: float) -> bool:
    """Whether the mask covers pixel (x, y), read from the RLE runs without decoding the mask."""
    h, w = record["segmentation"]["size"]
    xi, yi = int(x), int(y)
    if not (0 <= xi < w and 0 <= yi < h):
        return False
    bx, by, bw, bh = record["bbox"]
    if not (bx <= xi < bx + bw and by <= yi < by + bh):
        return False
    ends = np.cumsum(rle.string_to_counts(record["segmentation"]["counts"]))
    run = int(np.searchsorted(ends, xi * h + yi, side="right"))
    return run % 2 == 1


def _box_iou(bbox: list[int], box: list[float]) -> float:
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
    iw, ih = max(0.0, min(x1, bx1) - max(x0, bx0)), max(0.0, min(y1, by1) - max(y0, by0))
    inter = iw * ih
    union = (x1 - x0) * (y1 - y0) + bbox[2] * bbox[3] - inter
    return inter / union if union > 0 else 0.0


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidInput(f"The segmenter needs an RGB uint8 image of shape (H, W, 3); got {got}.")


def _check_prompts(shape, points, labels, box) -> tuple[list | None, list[int] | None, list[float] | None]:
    """Validated prompts in original-image pixels; labels default to 1 (include)."""
    h, w = shape
    if not points and not box:
        raise InvalidInput("Give at least one point or a box to segment an object.")
    if points:
        try:
            points = [[float(x), float(y)] for x, y in points]
        except (TypeError, ValueError):
            raise InvalidInput("points must be a list of [x, y] pairs.") from None
        for x, y in points:
            if not (0 <= x < w and 0 <= y < h):
                raise InvalidInput(f"The point ({x:g}, {y:g}) lies outside the {w}×{h} image.")
        labels = [1] * len(points) if labels is None else list(labels)
        if len(labels) != len(points) or any(label not in (0, 1) for label in labels):
            raise InvalidInput("point_labels must give 1 (include) or 0 (exclude) for each point.")
        if 1 not in labels and not box:
            raise InvalidInput("At least one point must be an include point (label 1).")
    if box:
        try:
            box = [float(v) for v in box]
        except (TypeError, ValueError):
            raise InvalidInput("box must be [x0, y0, x1, y1].") from None
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise InvalidInput("box must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1.")
    return points or None, (labels if points else None), box or None


def _prepare(image: np.ndarray, settings: Settings) -> tuple[bytes, str, _Frame]:
    """The image as the service will get it: downscaled to SAM_MAX_SIDE, PNG (small) or JPEG (large)."""
    _check_image(image)
    H, W = image.shape[:2]
    scale = min(1.0, settings.sam_max_side / max(H, W))
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    im = Image.fromarray(image)
    if (h, w) != (H, W):
        im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    if h * w <= PNG_MAX_PIXELS:
        im.save(buf, format="PNG", compress_level=1)
        mime = "image/png"
    else:
        im.save(buf, format="JPEG", quality=95, subsampling=0)
        mime = "image/jpeg"
    max_pixels = max(settings.max_image_pixels, H * W)
    return buf.getvalue(), mime, _Frame(orig=(H, W), sent=(h, w), max_pixels=max_pixels)


def _image_key(image: np.ndarray, params: dict) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, sorted(params.items()))).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _b64(text: str, i: int) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SegmentationBadResponse(
            f"Mask {i}'s segmentation is a string that is neither a URL nor base64 image data."
        ) from exc


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _safe_url(url: str) -> str:
    """A URL fit for a message or a log: no user:password, no query string (it may hold a key)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _describe_json(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:8])
        return f"an object with keys {keys}" if keys else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a JSON {type(value).__name__} ({str(value)[:40]!r})"

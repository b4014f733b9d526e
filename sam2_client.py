"""Segmenters: the `Segmenter` interface every engine implements, and the factory that picks one.

Engines:
- the built-in classical segmenter (`builtin_segmenter.BuiltinSegmenter`), used when SAM_API_URL is unset;
- the external SAM2 service client (HTTP, this module), used when SAM_API_URL is set; reading and normalising
  the service's answers is in `sam2_responses`.

A mask record has the SAM2 automatic-mask-generator shape:
    {"segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}, "area": int,
     "bbox": [x, y, w, h], "predicted_iou": float | None, "stability_score": float | None,
     "point_coords": [[x, y]] | None, "crop_box": [x, y, w, h]}
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import SplitResult, unquote, urljoin, urlsplit, urlunsplit

import httpx
import numpy as np
from PIL import Image

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
from sam2_responses import (
    Frame,
    describe_json,
    image_mask,
    inline_mask,
    is_url,
    keep_best,
    merge_duplicates,
    pick_for_prompt,
    rank,
    records_in,
    resize_nearest,
    to_record,
)
from settings import Settings, host_port, public_url

# progress(fraction 0..1, description)
Progress = Callable[[float, str], None]


class Segmenter(Protocol):
    engine: str  # shown to people: which engine produced the masks

    def generate(
        self, image: np.ndarray, *, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> list[dict]:
        """Automatic masks of an upright RGB uint8 HxWx3 image, as SAM2 records (overlapping, unsorted).

        When `cancel` is set (the person left), stop as soon as possible with SegmentationCancelled."""

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
        """One object's mask from point prompts (label 1 include, 0 exclude) and/or a box [x0, y0, x1, y1].

        When `cancel` is set (the person left), stop as soon as possible with SegmentationCancelled."""

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
PNG_MAX_PIXELS = 1 << 20  # up to 1 MP sent as lossless PNG; larger images as JPEG q95 (5-10x smaller)
TICK = 0.05  # how often the caller's thread looks at cancel / deadline
PROGRESS_EVERY = 0.5
GRACE = 1.0  # the worker's own timeouts fire first and say more; this is the backstop
PREFER_WAIT_MAX = 60  # Replicate holds a `Prefer: wait=n` POST at most this long
PREFER_WAIT_MARGIN = 5.0  # ...and we ask it to answer this long before SAM_API_TIMEOUT, to learn urls.cancel

T = TypeVar("T")


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
    # replicate: "creating" while the POST that creates the prediction is out, "running" once it can be cancelled
    prediction: str | None = None

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

    def check(self, *, cancel: bool = True) -> None:
        """Raise if the caller gave up (unless cancel=False) or the time is over; called between steps."""
        if cancel and self.stop.is_set():
            raise SegmentationCancelled("Segmentation cancelled.")
        if self.remaining() <= 0:
            raise self.timeout_error()

    def cancelled_message(self) -> str:
        """What the person is told when they cancel: no claim about the prediction beyond what is under way."""
        if self.prediction == "creating":
            return (
                "Segmentation cancelled. The prediction was still being created: Mask Studio will ask the service "
                "to cancel it as soon as the service answers."
            )
        if self.prediction == "running":
            return "Segmentation cancelled; Mask Studio is asking the service to cancel the prediction."
        return "Segmentation cancelled."


class HttpSegmenter:
    """The Segmenter that asks an external SAM2 service over HTTP (protocol: settings.sam_api_protocol)."""

    max_mask_bytes = MAX_MASK_BYTES
    max_response_bytes = MAX_RESPONSE_BYTES

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None, backoff: float = 1.0):
        if not settings.sam_api_url:
            raise InvalidInput("SAM_API_URL is not set.", title="Configuration error")
        if settings.sam_api_protocol not in PROTOCOLS:
            raise InvalidInput(
                f"SAM_API_PROTOCOL must be one of {', '.join(PROTOCOLS)}; got {settings.sam_api_protocol!r}.",
                title="Configuration error",
            )
        try:
            _, parts = _checked_url(settings.sam_api_url.rstrip("/"), "")
        except ValueError as exc:
            raise InvalidInput(
                f"SAM_API_URL {_safe_url(settings.sam_api_url)!r} is not a valid URL ({exc}).",
                title="Configuration error",
            ) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = _safe_url(settings.sam_api_url)
            raise InvalidInput(
                f"SAM_API_URL must be an http:// or https:// address; got {shown!r}.",
                title="Configuration error",
            )
        _quiet_http_logs()
        self._settings = settings
        self._protocol = settings.sam_api_protocol
        # cog / replicate only segment automatically: a prompt is answered by picking among automatic masks,
        # so masks this service already made (and the studio stored) answer it without another paid call.
        self.prompts_natively = self._protocol == "mask-studio"
        self._token = settings.sam_api_token
        self._auth: dict[str, str] = {}
        secrets = [self._token or ""]
        if parts.password:  # shown nowhere, raw or as the URL spells it (percent-encoded)
            secrets += [parts.password, unquote(parts.password)]
        if self._token:
            self._auth["Authorization"] = f"Bearer {self._token}"
        elif parts.username is not None:
            # Credentials in the URL become a header, so the URL itself (logged by httpx) carries none.
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._token = base64.b64encode(pair).decode("ascii")  # redacted like a token
            self._auth["Authorization"] = f"Basic {self._token}"
            secrets.append(self._token)
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        netloc = host_port(parts.hostname, parts.port)
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
            return self._run(lambda call: self._prompted(call, image, points, point_labels, box), progress, cancel)
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
            except RecursionError as exc:  # whatever in the answer was nested too deeply to read
                error = SegmentationBadResponse(f"The {self.engine} answered data nested too deeply to read.")
                error.__cause__ = exc
                box["error"] = error
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
                    raise SegmentationCancelled(call.cancelled_message())
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
        return max(records, key=rank)

    def _ask(self, call: _Call, body: dict, frame: Frame) -> tuple[Any, str]:
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
            # Replicate holds the POST until the prediction ends or n s pass; n below SAM_API_TIMEOUT means the
            # answer (and urls.cancel) always comes before we give up, so a prediction can always be cancelled.
            headers["Prefer"] = f"wait={self._prefer_wait()}"
        call.report(0.05, f"Waiting for the {self.engine}", waiting=True)
        creating = self._protocol == "replicate"
        reply = self._send(call, "POST", url, content=content, headers=headers, creating=creating)
        self._check_service(reply, "POST", url, frame, len(content))
        payload = self._json(reply)
        if self._protocol != "mask-studio":
            payload, url = self._settle(call, payload, url)
        return payload, url

    def _prefer_wait(self) -> int:
        return max(1, min(PREFER_WAIT_MAX, int(self._timeout - PREFER_WAIT_MARGIN)))

    def _settle(self, call: _Call, prediction: Any, url: str) -> tuple[Any, str]:
        """Follow a cog/replicate prediction object until it ends; cancel it if we give up on the way."""
        delay = 0.5 * self._backoff
        cancel_url = None
        live = False  # a prediction still starting or processing
        call.prediction = None  # the creating POST has answered: "running" once there is a urls.cancel
        try:
            while True:
                if not isinstance(prediction, dict) or "status" not in prediction:
                    raise SegmentationBadResponse(
                        f"The {self.engine} did not answer a prediction object with a 'status' "
                        f"(got {describe_json(prediction)})."
                    )
                status = prediction["status"]
                urls = prediction.get("urls") if isinstance(prediction.get("urls"), dict) else {}
                if status == "succeeded":
                    cancel_url, call.prediction, live = None, None, False
                    return prediction.get("output"), url
                if status in ("failed", "canceled", "aborted"):
                    cancel_url, call.prediction, live = None, None, False
                    detail = self._redact(str(prediction.get("error") or "no reason given"))
                    raise SegmentationPredictionFailed(f"The SAM2 prediction {status}: {detail}")
                live = status in ("starting", "processing")
                if isinstance(urls.get("cancel"), str) and urls["cancel"].strip():
                    cancel_url = self._prediction_url(url, urls["cancel"], "cancel", cancellable=cancel_url is not None)
                    call.prediction = "running"
                if status not in ("starting", "processing"):
                    raise SegmentationBadResponse(f"The {self.engine} reported an unknown status {status!r}.")
                poll = urls.get("get")
                if not isinstance(poll, str):
                    raise SegmentationBadResponse(
                        f"The {self.engine} says the prediction is {status} but gives no urls.get to follow."
                    )
                poll = self._prediction_url(url, poll, "get", cancellable=cancel_url is not None)
                call.report(0.1, f"SAM2 prediction {status}", waiting=True)
                call.stop.wait(max(0.0, min(delay, call.remaining())))  # a cancel wakes it early
                call.check()
                url = poll
                reply = self._send(call, "GET", url, headers=self._headers_for(url))
                self._check_service(reply, "GET", url)
                prediction = self._json(reply)
                delay = min(delay * 1.5, 5.0 * self._backoff)
        finally:
            if cancel_url is not None:
                self._cancel_prediction(cancel_url)
            elif live:
                log.warning("%s: given up on a prediction that gave no usable urls.cancel to stop it", self.engine)

    def _prediction_url(self, base: str, ref: str, key: str, *, cancellable: bool) -> str:
        """A prediction's urls.get / urls.cancel, resolved; only on the service's host or one allowed for masks."""
        try:
            url, parts = _checked_url(base, ref)
        except ValueError as exc:
            shown, problem = _safe_url(ref.strip()), f"is not a valid URL ({exc})"
        else:
            shown, host = _safe_url(url), (parts.hostname or "").lower()
            if parts.scheme not in ("http", "https"):
                problem = "is not http or https"
            elif not self._host_allowed(host):
                problem = (
                    f"points to {host}, which is neither the SAM2 service's host ({self._origin[1]}) "
                    "nor listed in SAM_MASK_URL_HOSTS"
                )
            else:
                return url
        still = "" if cancellable else "; the prediction may still be running at the service"
        raise SegmentationBadResponse(
            f"The {self.engine} gave a prediction urls.{key} {self._redact(shown)!r} that {problem}; "
            f"it was not followed{still}."
        )

    def _cancel_prediction(self, url: str) -> None:
        """Best effort: a prediction we no longer wait for should stop costing money."""
        try:
            reply = self._client.post(url, headers=self._headers_for(url), timeout=HEALTH_TIMEOUT)
        except (httpx.HTTPError, httpx.InvalidURL, RuntimeError, ValueError) as exc:
            name = type(exc).__name__
            log.warning("Could not cancel the SAM2 prediction at %s (%s).", _safe_url(url), name)
            return
        if 200 <= reply.status_code < 300:
            log.info("Cancelled the SAM2 prediction at %s (HTTP %d).", _safe_url(url), reply.status_code)
        else:
            log.warning("Could not cancel the SAM2 prediction at %s (HTTP %d).", _safe_url(url), reply.status_code)

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
        creating: bool = False,
    ) -> _Reply:
        """One exchange, repeated only on 429/5xx and failures to connect (never after a read timeout).

        creating: the POST that creates a paid prediction. Once sent, its answer is read to the end even if
        the caller cancels meanwhile: it carries the urls.cancel that stops the prediction."""
        what = f"mask URL {_safe_url(url)}" if mask else self.engine
        attempt = 0
        while True:
            call.check()
            left = call.remaining()
            timeout = httpx.Timeout(left, connect=min(self._connect_timeout, left))
            failure: SegmentationError | None = None
            cause: Exception | None = None
            reply: _Reply | None = None
            if creating:
                call.prediction = "creating"
            try:
                reply = self._exchange(call, method, url, content, headers, timeout, mask, finish=creating)
            except httpx.ConnectTimeout as exc:
                failure, cause = (
                    SegmentationTimeout(f"Could not connect to the {what} within {self._connect_timeout:g} s."),
                    exc,
                )
            except httpx.ConnectError as exc:
                failure, cause = (
                    SegmentationUnreachable(f"The {what} cannot be reached: {self._connect_reason(exc, url)}."),
                    exc,
                )
            except httpx.TimeoutException as exc:
                # The service may be working on it (and billing for it): report, do not send it again.
                if call.stop.is_set():
                    call.check()
                raise SegmentationTimeout(
                    f"The {what} did not answer within {self._timeout:g} s (SAM_API_TIMEOUT). "
                    "Try again, use a smaller image (SAM_MAX_SIDE) or raise SAM_API_TIMEOUT."
                ) from exc
            except httpx.RemoteProtocolError as exc:
                if "location header" not in str(exc).lower():
                    raise SegmentationUnavailable(
                        f"The connection to the {what} broke before a complete answer ({type(exc).__name__}); "
                        "it was not sent again, as the service may have run it."
                    ) from exc
                raise SegmentationBadResponse(  # httpx reads a redirect's Location even when not following it
                    f"The {what} answered a redirect to an invalid address; redirects are not followed: "
                    "set SAM_API_URL to the final address."
                ) from exc
            except httpx.HTTPError as exc:
                raise SegmentationUnavailable(
                    f"The connection to the {what} broke before a complete answer ({type(exc).__name__}); "
                    "it was not sent again, as the service may have run it."
                ) from exc
            retry_after = None
            if creating and (reply is None or not 200 <= reply.status < 300):
                call.prediction = None  # no prediction was created
            if reply is not None:
                if reply.status != 429 and reply.status < 500:
                    return reply
                retry_after = _retry_after(reply.headers.get("Retry-After"))
            wait = retry_after if retry_after is not None else self._backoff * 2**attempt
            out_of_retries = attempt >= self._retries
            if out_of_retries or wait >= call.remaining():
                # Give up: raise the failure, or hand the 429/5xx answer to _check_service to explain.
                if failure is not None:
                    raise failure from cause
                reply.retries = attempt
                if not out_of_retries:
                    reply.retry_after_refused = retry_after
                return reply
            why = f"HTTP {reply.status}" if reply is not None else type(cause).__name__
            how = "Retry-After" if retry_after is not None else "backoff"
            log.warning(
                "%s: %s; retrying in %.1f s (%s), retry %d of %d",
                what,
                why,
                wait,
                how,
                attempt + 1,
                self._retries,
            )
            call.stop.wait(wait)  # a cancel wakes it early; the check at the top of the loop raises
            attempt += 1

    def _exchange(self, call, method, url, content, headers, timeout, mask, finish=False) -> _Reply:
        """Stream one response, capping its size and watching the deadline (and, unless finish, a cancel)."""
        cap = self.max_mask_bytes if mask else self.max_response_bytes
        with self._client.stream(method, url, content=content, headers=headers, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > cap:
                self._too_big(url, int(declared), cap, mask)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    self._too_big(url, size, cap, mask)
                chunks.append(chunk)
                call.check(cancel=not finish)  # a service trickling bytes must not outlast SAM_API_TIMEOUT
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
            location = reply.headers.get("Location", "")
            try:
                location = urljoin(url, location)
            except ValueError:
                pass  # not a valid URL: shown as it came, without what may hold a secret
            location = self._redact(_safe_url(location))
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
        except RecursionError as exc:
            raise SegmentationBadResponse(f"The {self.engine} answered JSON nested too deeply to read.") from exc
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
        except (ValueError, UnicodeDecodeError, RecursionError):
            text = reply.body[:200].decode("utf-8", "replace") if b"<" not in reply.body[:1] else ""
        text = " ".join(self._redact(text).split())[:200]
        return f": {text}" if text else ""

    def _redact(self, text: str) -> str:
        """The text with the token, and any password from SAM_API_URL (raw or base64), replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _host_allowed(self, host: str) -> bool:
        """The service's own host, or a host listed in SAM_MASK_URL_HOSTS (subdomains included)."""
        host = host.lower()
        return bool(host) and (
            host == self._origin[1] or any(host == h or host.endswith("." + h) for h in self._mask_hosts)
        )

    def _headers_for(self, url: str) -> dict[str, str]:
        """The token goes to the service's own origin only, never to a file host."""
        parts = urlsplit(url)
        same = (parts.scheme, (parts.hostname or "").lower(), parts.port) == self._origin
        return dict(self._auth) if same else {}

    def _connect_reason(self, exc: Exception, url: str) -> str:
        text = str(exc)
        parts = urlsplit(url)
        if any(
            s in text
            for s in (
                "Name or service not known",
                "nodename nor servname",
                "getaddrinfo",
                "Temporary failure in name resolution",
                "No address associated",
            )
        ):
            return f"the host name {parts.hostname!r} could not be resolved (DNS)"
        if "refused" in text.lower() or "Errno 111" in text:
            return f"connection refused (nothing listens at {parts.hostname}:{parts.port or parts.scheme})"
        return self._redact(text) or type(exc).__name__

    # -- reading the answer ------------------------------------------------------------------------------

    def _collect(self, call: _Call, payload: Any, frame: Frame, base_url: str) -> list[dict]:
        """Every mask of the answer decoded, fitted to the image, normalised; no empties, no duplicates."""
        raws = records_in(payload)
        out = []
        for i, raw in enumerate(raws):
            call.check()
            call.report(0.8 + 0.15 * i / max(1, len(raws)), f"Reading mask {i + 1} of {len(raws)}")
            mask = self._materialize(call, raw.segmentation, i, frame, base_url)
            record = to_record(mask, raw, frame)
            if record is not None:
                out.append(record)
        merged = merge_duplicates(out)
        if len(merged) < len(raws):
            log.debug(
                "%s: %d masks read, %d empty dropped, %d near-duplicates merged",
                self.engine,
                len(raws),
                len(raws) - len(out),
                len(out) - len(merged),
            )
        return merged

    def _materialize(self, call: _Call, seg: Any, i: int, frame: Frame, base_url: str) -> np.ndarray:
        """A segmentation in any of the accepted forms → boolean mask at the original image size."""
        if not is_url(seg):
            return inline_mask(seg, i, frame)
        try:
            url, _ = _checked_url(base_url, seg)
        except ValueError as exc:
            shown = self._redact(_safe_url(seg.strip()))
            raise SegmentationMaskURLError(
                f"Mask {i}'s URL {shown!r} is not a valid URL ({exc}); it was not fetched."
            ) from exc
        data = self._download(call, url, i)
        source = f"The mask at {_safe_url(url)}"
        mask = image_mask(data, i, frame, source=source, error=SegmentationMaskURLError)
        return resize_nearest(mask, frame.orig)

    def _download(self, call: _Call, url: str, i: int) -> bytes:
        parts = urlsplit(url)
        safe = _safe_url(url)
        if parts.scheme not in ("http", "https"):
            raise SegmentationMaskURLError(f"Mask {i}'s URL {safe} is not http or https; it was not fetched.")
        host = (parts.hostname or "").lower()
        if not self._host_allowed(host):
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


def make_segmenter(settings: Settings) -> Segmenter:
    """The HTTP client when SAM_API_URL is set, else the built-in segmenter."""
    if settings.sam_api_url:
        return HttpSegmenter(settings)
    from builtin_segmenter import BuiltinSegmenter  # heavy (scikit-image), only when it is the engine

    return BuiltinSegmenter(max_masks=settings.max_masks)


# ---------------------------------------------------------------------------------------------------------
# Pure helpers: checking the input, preparing the request, reading headers, URLs fit for messages.


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


def _prepare(image: np.ndarray, settings: Settings) -> tuple[bytes, str, Frame]:
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
    return buf.getvalue(), mime, Frame(orig=(H, W), sent=(h, w), max_pixels=max_pixels)


def _image_key(image: np.ndarray, params: dict) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, sorted(params.items()))).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        if value.isascii() and value.replace(".", "", 1).isdigit():
            return float(value)
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _safe_url(url: str) -> str:
    """A URL fit for a message or a log: no user:password, no query string (it may hold a key). Never raises."""
    try:
        return public_url(url) + ("?…" if urlsplit(url).query else "")
    except ValueError:  # not a valid URL (bad port, bad IPv6 address): cut by hand what may hold a secret
        head, query = url.partition("#")[0], ""
        head, mark, query = head.partition("?")
        scheme, sep, rest = head.rpartition("://") if "://" in head else ("", "", head)
        netloc, slash, path = rest.partition("/")
        return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}" + ("?…" if mark else "")


def _checked_url(base: str, ref: str) -> tuple[str, SplitResult]:
    """`ref` resolved against `base`, checked to be a URL httpx can request; ValueError saying why not."""
    try:
        url = urljoin(base, ref.strip())
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(str(exc)) from None
    return url, parts


class _RedactURLs(logging.Filter):
    """httpx logs each request's URL at INFO: show it as _safe_url does, without user:password or query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(_safe_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_REDACT_URLS = _RedactURLs()


def _quiet_http_logs() -> None:
    """The app logs at INFO, where httpx would log every request URL (a key in SAM_API_URL's query with it).

    httpx and httpcore are kept at WARNING unless someone configured them; either way httpx's URLs are redacted."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    httpx_log = logging.getLogger("httpx")
    if _REDACT_URLS not in httpx_log.filters:
        httpx_log.addFilter(_REDACT_URLS)

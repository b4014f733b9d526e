"""The external SAM2 service client: the `Segmenter` that asks a SAM2 service over HTTP (SAM_API_URL).

One call: the image is prepared and sent in the shape the protocol wants (service_protocols), the HTTP runs
with retries, caps and a deadline (service_http), and the answer, in any accepted shape, is read into SAM2
mask records at the original image size (sam2_responses), masks at URLs fetched only from allowed hosts.
A mask-studio service that answers `image_sha256` has kept the image: later requests on it send only that
hash, and when the service answers 409 `image_needed` (evicted, restarted, another copy behind a load
balancer) the same call sends the image again, once.
cog and replicate only segment automatically: a prompt is answered by picking among the automatic masks
(`sam2_responses.answer_from_masks`), from one automatic call per image. Protocol: docs/sam2-protocol.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from errors import (
    InvalidInput,
    SegmentationBadResponse,
    SegmentationMaskURLError,
    SegmentationPredictionFailed,
    SegmentationRejected,
    SegmentationUnreachable,
)
from sam2_responses import (
    Frame,
    answer_from_masks,
    describe_json,
    image_mask,
    inline_mask,
    is_url,
    keep_best,
    merge_duplicates,
    rank,
    records_in,
    resize_nearest,
    to_record,
)
from segmenter import Progress
from service_http import Call, Reply, ServiceHttp, run_call
from service_protocols import PROTOCOLS, Prepared, prepare_image
from settings import Settings
from url_safety import checked_url, safe_url
from validation import check_prompt, check_rgb

log = logging.getLogger("mask_studio.sam2")

SENT_CACHE = 4  # images kept encoded, as sent
NAMED_CACHE = 256  # hashes of images the service said it kept
DEFAULT_PARAMS = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}


class HttpSegmenter:
    """The Segmenter that asks an external SAM2 service over HTTP (protocol: settings.sam_api_protocol)."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None, backoff: float = 1.0):
        if not settings.sam_api_url:
            raise InvalidInput("SAM_API_URL is not set.", title="Configuration error")
        protocol = PROTOCOLS.get(settings.sam_api_protocol)
        if protocol is None:
            raise InvalidInput(
                f"SAM_API_PROTOCOL must be one of {', '.join(PROTOCOLS)}; got {settings.sam_api_protocol!r}.",
                title="Configuration error",
            )
        self.http = ServiceHttp(settings, protocol, transport=transport, backoff=backoff)
        self.protocol = protocol
        self.engine = self.http.engine
        # cog / replicate only segment automatically: the studio answers prompts on images this service
        # segmented from the masks it stored, without another paid call.
        self.prompts_natively = protocol.prompts_natively
        self._settings = settings
        self._auto_lock = threading.Lock()
        self._auto_cache: tuple[bytes, list[dict]] | None = None  # cog/replicate: last automatic result
        # The last images as sent (encoded once): every click on a picture sends the same bytes again, and
        # re-encoding a 1 MP PNG per click cost more than the prompt itself.
        self._sent: OrderedDict[bytes, Prepared] = OrderedDict()
        # Images the service said it kept (its answer's image_sha256): requests name them instead of sending
        # them, which took most of a prompt's time over HTTP (a 512² PNG: 620 KB of base64 each way through JSON).
        self._named: OrderedDict[str, None] = OrderedDict()

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
        check_rgb(image)
        params = {**DEFAULT_PARAMS, **(params or {})}
        records = self._run(lambda call: self._auto(call, image, params), progress, cancel)
        if not self.prompts_natively:
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
        check_rgb(image)
        h, w = image.shape[:2]
        pts, labels, bx = check_prompt(points, point_labels, box, w, h)
        if self.prompts_natively:
            return self._run(lambda call: self._prompted(call, image, pts, labels, bx), progress, cancel)
        # One paid automatic call per image, then every prompt on it is answered from those masks.
        key = _image_key(image, DEFAULT_PARAMS)
        with self._auto_lock:
            cached = self._auto_cache[1] if self._auto_cache and self._auto_cache[0] == key else None
        records = cached if cached is not None else self.generate(image, progress=progress, cancel=cancel)
        return answer_from_masks(records, pts, labels, bx, self.engine)

    def prepare(self, image: np.ndarray) -> None:
        """Nothing to warm here: the first request on an image sends it, and a service that keeps it says so."""

    def health(self) -> tuple[bool, str]:
        """GET {url}/health, falling back to GET {url}; (ok, sentence) within about 3 s, never raises."""
        return self.http.health()

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()

    def __enter__(self) -> HttpSegmenter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one call ---------------------------------------------------------------------------------------

    def _run(self, job, progress: Progress | None, cancel: threading.Event | None):
        return run_call(job, self.engine, self.http.timeout, progress, cancel)

    def _encoded(self, image: np.ndarray) -> Prepared:
        """The image as sent to the service, encoded once per image (the last SENT_CACHE images kept)."""
        key = _image_key(image, {})
        with self._auto_lock:
            hit = self._sent.get(key)
            if hit is not None:
                self._sent.move_to_end(key)
                return hit
        prepared = prepare_image(image, self._settings)
        with self._auto_lock:
            self._sent[key] = prepared
            while len(self._sent) > SENT_CACHE:
                self._sent.popitem(last=False)
        return prepared

    def _auto(self, call: Call, image: np.ndarray, params: dict) -> list[dict]:
        prepared = self._encoded(image)
        payload, base_url = self._ask(
            call, lambda by_hash: self.protocol.auto_body(prepared, params, by_hash=by_hash), prepared
        )
        records = self._collect(call, payload, prepared.frame, base_url)
        records = keep_best(records, self._settings.max_masks)
        log.info("%s: %d masks in %.1f s", self.engine, len(records), time.monotonic() - call.started)
        return records

    def _prompted(self, call: Call, image: np.ndarray, points, labels, box) -> dict:
        prepared = self._encoded(image)

        def body(by_hash: bool) -> dict:
            return self.protocol.prompt_body(prepared, points, labels, box, by_hash=by_hash)

        payload, base_url = self._ask(call, body, prepared)
        records = self._collect(call, payload, prepared.frame, base_url)
        if not records:
            raise SegmentationRejected(f"The {self.engine} returned no mask for these points.")
        return max(records, key=rank)

    def _ask(self, call: Call, build: Callable[[bool], dict], image: Prepared) -> tuple[Any, str]:
        """Send the request the protocol wants, `build(by_hash)` its body; (the decoded answer, its URL)."""
        by_hash = self._named_here(image.sha256)
        reply, url, sent = self._post(call, build(by_hash), image.frame, by_hash)
        if by_hash and _image_needed(reply):
            self._forget(image.sha256)
            log.debug("%s: no longer has image %s…; sending it again", self.engine, image.sha256[:12])
            reply, url, sent = self._post(call, build(False), image.frame, False)
        self.http.check_answer(reply, "POST", url, image.frame, sent)
        payload = self.http.read_json(reply)
        if self.protocol.answers_prediction:
            payload, url = self._settle(call, payload, url)
        elif self.protocol.names_images and isinstance(payload, dict) and payload.get("image_sha256") == image.sha256:
            self._remember(image.sha256)
        return payload, url

    def _post(self, call: Call, body: dict, frame: Frame, by_hash: bool) -> tuple[Reply, str, int]:
        """One POST of `body`; (the reply, its URL, the bytes sent)."""
        content = json.dumps(body).encode()
        url, extra = self.protocol.target(self.http.endpoint, self._settings)
        headers = {**self.http.headers_for(url), "Content-Type": "application/json", **extra}
        h, w = frame.sent
        if by_hash:
            text = f"Sending the request to the {self.engine}, which has the {w}×{h} image"
        else:
            text = f"Sending a {w}×{h} image to the {self.engine}"
        call.report(0.05, text)
        log.debug("%s (%d KB)", text, len(content) // 1024)
        call.report(0.05, f"Waiting for the {self.engine}", waiting=True)
        creating = self.protocol.creates_prediction
        reply = self.http.send(call, "POST", url, content=content, headers=headers, creating=creating)
        return reply, url, len(content)

    def _named_here(self, sha256: str) -> bool:
        """Whether the service said it kept this image (so the request may name it instead of sending it)."""
        with self._auto_lock:
            if sha256 in self._named:
                self._named.move_to_end(sha256)
                return True
            return False

    def _remember(self, sha256: str) -> None:
        with self._auto_lock:
            self._named[sha256] = None
            self._named.move_to_end(sha256)
            while len(self._named) > NAMED_CACHE:
                self._named.popitem(last=False)

    def _forget(self, sha256: str) -> None:
        with self._auto_lock:
            self._named.pop(sha256, None)

    def _settle(self, call: Call, prediction: Any, url: str) -> tuple[Any, str]:
        """Follow a cog/replicate prediction object until it ends; cancel it if we give up on the way."""
        delay = 0.5 * self.http.backoff
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
                urls: dict = prediction["urls"] if isinstance(prediction.get("urls"), dict) else {}
                if status == "succeeded":
                    cancel_url, call.prediction, live = None, None, False
                    return prediction.get("output"), url
                if status in ("failed", "canceled", "aborted"):
                    cancel_url, call.prediction, live = None, None, False
                    detail = self.http.redact(str(prediction.get("error") or "no reason given"))
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
                reply = self.http.send(call, "GET", url, headers=self.http.headers_for(url))
                self.http.check_answer(reply, "GET", url)
                prediction = self.http.read_json(reply)
                delay = min(delay * 1.5, 5.0 * self.http.backoff)
        finally:
            if cancel_url is not None:
                self.http.cancel_prediction(cancel_url)
            elif live:
                log.warning("%s: given up on a prediction that gave no usable urls.cancel to stop it", self.engine)

    def _prediction_url(self, base: str, ref: str, key: str, *, cancellable: bool) -> str:
        """A prediction's urls.get / urls.cancel, resolved; only on the service's host or one allowed for masks."""
        try:
            url, parts = checked_url(base, ref)
        except ValueError as exc:
            shown, problem = safe_url(ref.strip()), f"is not a valid URL ({exc})"
        else:
            shown, host = safe_url(url), (parts.hostname or "").lower()
            if parts.scheme not in ("http", "https"):
                problem = "is not http or https"
            elif not self.http.host_allowed(host):
                problem = (
                    f"points to {host}, which is neither the SAM2 service's host ({self.http.host}) "
                    "nor listed in SAM_MASK_URL_HOSTS"
                )
            else:
                return url
        still = "" if cancellable else "; the prediction may still be running at the service"
        raise SegmentationBadResponse(
            f"The {self.engine} gave a prediction urls.{key} {self.http.redact(shown)!r} that {problem}; "
            f"it was not followed{still}."
        )

    def _collect(self, call: Call, payload: Any, frame: Frame, base_url: str) -> list[dict]:
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

    def _materialize(self, call: Call, seg: Any, i: int, frame: Frame, base_url: str) -> np.ndarray:
        """A segmentation in any of the accepted forms → boolean mask at the original image size."""
        if not is_url(seg):
            return inline_mask(seg, i, frame)
        try:
            url, _ = checked_url(base_url, seg)
        except ValueError as exc:
            shown = self.http.redact(safe_url(seg.strip()))
            raise SegmentationMaskURLError(
                f"Mask {i}'s URL {shown!r} is not a valid URL ({exc}); it was not fetched."
            ) from exc
        data = self._download(call, url, i)
        source = f"The mask at {safe_url(url)}"
        mask = image_mask(data, i, frame, source=source, error=SegmentationMaskURLError)
        return resize_nearest(mask, frame.orig)

    def _download(self, call: Call, url: str, i: int) -> bytes:
        parts = urlsplit(url)
        safe = safe_url(url)
        if parts.scheme not in ("http", "https"):
            raise SegmentationMaskURLError(f"Mask {i}'s URL {safe} is not http or https; it was not fetched.")
        host = (parts.hostname or "").lower()
        if not self.http.host_allowed(host):
            raise SegmentationMaskURLError(
                f"Mask {i}'s URL is on {host}, which is neither the SAM2 service's host ({self.http.host}) "
                "nor listed in SAM_MASK_URL_HOSTS; it was not fetched."
            )
        try:
            reply = self.http.send(call, "GET", url, headers=self.http.headers_for(url), mask=True)
        except SegmentationUnreachable as exc:
            raise SegmentationMaskURLError(exc.message) from exc
        if reply.status != 200:
            raise SegmentationMaskURLError(f"The mask at {safe} could not be fetched (HTTP {reply.status}).")
        return reply.body


def _image_needed(reply: Reply) -> bool:
    """A 409 saying the service does not have the image the request named (it wants it sent)."""
    if reply.status != 409:
        return False
    try:
        body = json.loads(reply.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("image_needed") is True


def _image_key(image: np.ndarray, params: dict) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((image.shape, sorted(params.items()))).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()

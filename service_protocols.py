"""The SAM2 service's protocols (mask-studio, cog, replicate) as small strategy objects, and the image they send.

A protocol says what the HTTP client cannot guess: where the request goes and with which headers, the
request body, whether the answer is a prediction to follow until it ends (cog, replicate), whether the
POST creates a paid prediction that must be cancelled if we give up (replicate), which extra hosts its
files live on, whether it can segment from prompts at all and whether a request may name an image the
service already has by its SHA-256 instead of sending it (only mask-studio). Documented in docs/sam2-protocol.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from errors import InvalidInput
from sam2_responses import Frame
from settings import Settings

PNG_MAX_PIXELS = 1 << 20  # up to 1 MP sent as lossless PNG; larger images as JPEG q95 (5-10x smaller)
PREFER_WAIT_MAX = 60  # Replicate holds a `Prefer: wait=n` POST at most this long
PREFER_WAIT_MARGIN = 5.0  # ...and we ask it to answer this long before SAM_API_TIMEOUT, to learn urls.cancel

Endpoint = Callable[[str], str]  # SAM_API_URL with a suffix added to its path


@dataclass(frozen=True)
class Prepared:
    """The image as sent: the file's bytes, its type, its sizes, and its SHA-256 (how the service names it)."""

    data: bytes
    mime: str
    frame: Frame
    sha256: str


class ServiceProtocol:
    """The mask-studio protocol (Mask Studio's own): POST {url}/segment, masks in the answer, prompts taken."""

    name = "mask-studio"
    prompts_natively = True  # has a prompt mode; the others only segment automatically
    answers_prediction = False  # the answer is a prediction object to follow until it ends
    creates_prediction = False  # the POST starts a paid prediction, cancelled if we give up
    file_hosts: tuple[str, ...] = ()  # hosts its mask files live on, besides the service's own
    names_images = True  # a request may carry image_sha256 alone for an image the service said it kept

    def target(self, endpoint: Endpoint, settings: Settings) -> tuple[str, dict[str, str]]:
        """Where the POST goes, and the headers this protocol adds."""
        path = settings.sam_api_segment_path or "/segment"
        return endpoint(path if path.startswith("/") else "/" + path), {}

    def auto_body(self, image: Prepared, params: dict, *, by_hash: bool = False) -> dict[str, Any]:
        return {**self._image(image, by_hash=by_hash), "mode": "auto", "params": params}

    def prompt_body(self, image: Prepared, points, labels, box, *, by_hash: bool = False) -> dict[str, Any]:
        """Prompts in original-image pixels, scaled to the image as sent; by_hash: the image named, not sent."""
        (H, W), (h, w) = image.frame.orig, image.frame.sent
        sx, sy = w / W, h / H
        body: dict[str, Any] = {**self._image(image, by_hash=by_hash), "mode": "points"}
        if points:
            body["points"] = [[x * sx, y * sy] for x, y in points]
            body["point_labels"] = labels
        if box:
            body["box"] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        return body

    @staticmethod
    def _image(image: Prepared, *, by_hash: bool) -> dict[str, str]:
        if by_hash:
            return {"image_sha256": image.sha256}
        return {"image": base64.b64encode(image.data).decode("ascii"), "image_sha256": image.sha256}


class CogProtocol(ServiceProtocol):
    """A Cog container (e.g. meta/sam-2 run locally): POST {url}/predictions, a prediction object back."""

    name = "cog"
    prompts_natively = False
    answers_prediction = True
    names_images = False

    def target(self, endpoint: Endpoint, settings: Settings) -> tuple[str, dict[str, str]]:
        return endpoint("/predictions"), {}

    def auto_body(self, image: Prepared, params: dict, *, by_hash: bool = False) -> dict[str, Any]:
        return {"input": {"image": data_url(image.data, image.mime), **params}}

    def prompt_body(self, image: Prepared, points, labels, box, *, by_hash: bool = False) -> dict[str, Any]:
        raise InvalidInput(f"The {self.name} protocol cannot segment from prompts; pick among its automatic masks.")


class ReplicateProtocol(CogProtocol):
    """A hosted prediction (Replicate's HTTP API): POST {url} with Prefer: wait, poll urls.get, urls.cancel."""

    name = "replicate"
    creates_prediction = True
    file_hosts = ("replicate.delivery",)  # where hosted predictions put their output files

    def target(self, endpoint: Endpoint, settings: Settings) -> tuple[str, dict[str, str]]:
        # Replicate holds the POST until the prediction ends or n s pass; n below SAM_API_TIMEOUT means the
        # answer (and urls.cancel) always comes before we give up, so a prediction can always be cancelled.
        return endpoint(""), {"Prefer": f"wait={prefer_wait(settings.sam_api_timeout)}"}


PROTOCOLS: dict[str, ServiceProtocol] = {p.name: p for p in (ServiceProtocol(), CogProtocol(), ReplicateProtocol())}


def prefer_wait(timeout: float) -> int:
    return max(1, min(PREFER_WAIT_MAX, int(timeout - PREFER_WAIT_MARGIN)))


def prepare_image(image: np.ndarray, settings: Settings) -> Prepared:
    """The image as the service will get it: downscaled to SAM_MAX_SIDE, PNG (small) or JPEG (large)."""
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
    data = buf.getvalue()
    frame = Frame(orig=(H, W), sent=(h, w), max_pixels=max_pixels)
    return Prepared(data, mime, frame, hashlib.sha256(data).hexdigest())


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"

"""The SAM2 service's decoded images by content hash, so a prompt can name its image instead of sending it again.

The key is the SHA-256 of the image file's bytes (what the request's base64 decodes to), computed here when
the image arrives and never taken from a client: a request that names an image by `image_sha256` gets the
image that was sent with that hash, or `UnknownImage` (HTTP 409, "send the image"), never another image.
A client that claims a hash for the image it sends is checked (`HashMismatch`), so a wrong claim cannot
file an image under another image's hash. The store is an LRU bounded by decoded bytes: it is state a
request can do without (the client resends the image), which keeps the service stateless for a load balancer.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

import imaging
from byte_lru import ByteLru
from errors import InvalidInput
from settings import Settings

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
DEFAULT_BYTES = 256 * 1024 * 1024  # about 85 pictures of 1 MP, or 21 of 4 MP, decoded (RGB)


class UnknownImage(Exception):
    """The image named by image_sha256 is not here (never sent to this copy of the service, or evicted)."""

    def __init__(self, sha256: str):
        super().__init__(sha256)
        self.sha256 = sha256
        self.message = (
            f"This service does not have the image {sha256[:12]}… (it was never sent here, or was evicted "
            "from its cache): send the request again with 'image'."
        )


class HashMismatch(InvalidInput):
    """The image_sha256 sent with an image is not that image's SHA-256."""


def checked_sha256(text: str) -> str:
    """A client's image_sha256, lower-cased, or InvalidInput saying what it must look like."""
    if not _HEX64.fullmatch(text):
        raise InvalidInput("image_sha256 must be 64 hexadecimal digits: the SHA-256 of the image file's bytes.")
    return text.lower()


def sha256_of(data: bytes) -> str:
    """The content hash the protocol speaks of: SHA-256 of the image file's bytes, lower-case hex."""
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    """Thread-safe LRU of decoded RGB images by the SHA-256 of their file, bounded by their total bytes."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = int(max_bytes)
        self._images: ByteLru[np.ndarray] = ByteLru(self.max_bytes)

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._images

    def named(self, sha256: str) -> np.ndarray:
        """The image sent earlier with this hash, or UnknownImage."""
        image = self._images.get(sha256)
        if image is None:
            raise UnknownImage(sha256)
        return image

    def received(self, text: str, claimed: str | None, settings: Settings) -> tuple[str, np.ndarray, bool]:
        """An image as the request sent it (base64 or a data: URL) → (its SHA-256, RGB pixels, whether kept).

        A claimed hash must be the image's own. A known image is not decoded again: every click of an old
        client resends it, and decoding it again would cost more than the decoder's answer (a 512² PNG:
        ~20 ms, a 4 MP JPEG: ~60 ms). An image larger than the whole store is used once and not kept."""
        data = imaging.decode_base64(text, field="image")
        sha256 = sha256_of(data)
        if claimed is not None and checked_sha256(claimed) != sha256:
            raise HashMismatch(
                f"image_sha256 {claimed[:12]}… is not the SHA-256 of the image sent ({sha256[:12]}…): "
                "send the hash of the image file's bytes, or leave image_sha256 out."
            )
        try:
            return sha256, self.named(sha256), True
        except UnknownImage:
            pass
        image = imaging.load_image(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_bytes)
        image.flags.writeable = False  # shared by every request that names it
        return sha256, image, self._keep(sha256, image)

    def _keep(self, sha256: str, image: np.ndarray) -> bool:
        if image.nbytes > self.max_bytes:
            return False
        self._images.put(sha256, image)
        return True

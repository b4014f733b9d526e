"""Mask Studio's exception tree: every error a person may see, with a message they can act on.

    MaskStudioError                 base; str(e) is the message shown to people
    ├── InvalidInput                a request the caller can fix (bad colour, bad id, bad point, bad image)
    │   └── LimitExceeded           a configured limit (size, rate, quota) was reached
    ├── Unauthorized                a missing or unknown API key
    ├── NotFound                    unknown image or mask (also someone else's: same message)
    ├── Conflict                    an id that is already taken
    ├── SegmentationError           the segmenter could not produce masks
    │   ├── SegmentationUnavailable the service cannot be reached (refused, DNS, timeout, 5xx after retries)
    │   │   ├── SegmentationUnreachable   connection refused or host name not found
    │   │   ├── SegmentationTimeout       no connection or no complete answer in time
    │   │   ├── SegmentationBusy          still rate-limited (HTTP 429) after the retries
    │   │   └── SegmentationServerError   still HTTP 5xx after the retries
    │   ├── SegmentationRejected    the service answered, but refused or answered nonsense
    │   │   ├── SegmentationAuthError     the token was rejected (HTTP 401/403)
    │   │   ├── SegmentationEndpointNotFound  HTTP 404: wrong SAM_API_URL or path
    │   │   ├── SegmentationImageTooLarge HTTP 413
    │   │   ├── SegmentationBadResponse   not JSON, wrong shape, masks that do not fit the image
    │   │   ├── SegmentationMaskURLError  a mask URL that fails, is not allowed or not an image
    │   │   └── SegmentationPredictionFailed  a cog/replicate prediction ended failed or canceled
    │   └── SegmentationCancelled   the person gave up waiting (cancel event set)
    └── StorageError                the database or blob store failed

app.py maps MaskStudioError to gr.Error in exactly one place; anything else becomes a generic
message and a log line, never a traceback in front of a person.
"""

from __future__ import annotations


class MaskStudioError(Exception):
    """Base class: the message is written for the person who will read it."""

    title = "Something went wrong"

    def __init__(self, message: str, *, title: str | None = None):
        super().__init__(message)
        self.message = message
        if title is not None:
            self.title = title


class InvalidInput(MaskStudioError):
    title = "Invalid input"


class LimitExceeded(InvalidInput):
    title = "Limit reached"


class Unauthorized(MaskStudioError):
    title = "Not authorised"


class NotFound(MaskStudioError):
    title = "Not found"


class Conflict(MaskStudioError):
    title = "Already exists"


class SegmentationError(MaskStudioError):
    title = "Segmentation failed"


class SegmentationUnavailable(SegmentationError):
    title = "Segmentation service unavailable"


class SegmentationRejected(SegmentationError):
    title = "Segmentation service refused the request"


class SegmentationUnreachable(SegmentationUnavailable):
    "Connection refused or host name not found"


class SegmentationTimeout(SegmentationUnavailable):
    title = "Segmentation service timed out"


class SegmentationBusy(SegmentationUnavailable):
    title = "Segmentation service busy"


class SegmentationServerError(SegmentationUnavailable):
    "HTTP 5xx after the retries"


class SegmentationAuthError(SegmentationRejected):
    title = "Segmentation service rejected the token"


class SegmentationEndpointNotFound(SegmentationRejected):
    "HTTP 404: wrong SAM_API_URL or path"


class SegmentationImageTooLarge(SegmentationRejected):
    "HTTP 413"


class SegmentationBadResponse(SegmentationRejected):
    title = "Segmentation service answered nonsense"


class SegmentationMaskURLError(SegmentationRejected):
    title = "A mask from the segmentation service could not be fetched"


class SegmentationPredictionFailed(SegmentationRejected):
    "A cog/replicate prediction that ended failed or canceled"


class SegmentationCancelled(SegmentationError):
    title = "Segmentation cancelled"


class StorageError(MaskStudioError):
    title = "Storage error"

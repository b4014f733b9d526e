"""Mask Studio's exception tree: every error a person may see, with a message they can act on.

    MaskStudioError                 base; str(e) is the message shown to people
    ├── InvalidInput                a request the caller can fix (bad colour, bad id, bad point, bad image)
    │   └── LimitExceeded           a configured limit (size, rate, quota) was reached
    ├── NotFound                    unknown image or mask (also someone else's: same message)
    ├── Conflict                    an id that is already taken
    ├── SegmentationError           the segmenter could not produce masks
    │   ├── SegmentationUnavailable the service cannot be reached (refused, DNS, timeout, 5xx after retries)
    │   └── SegmentationRejected    the service answered, but refused or answered nonsense
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


class StorageError(MaskStudioError):
    title = "Storage error"

"""Quotas: segmentations per hour (per owner and per address) and stored images per owner, with their refusals."""

from __future__ import annotations

from errors import LimitExceeded
from rate_limits import RateLimiter, minutes_text
from settings import Settings
from storage import Database


def room_refusal(count: int, limit: int, retention_days: float) -> LimitExceeded:
    """The one refusal of an upload past MAX_IMAGES_PER_OWNER."""
    later = ""
    if retention_days > 0:
        later = f", or wait until your oldest image expires (RETENTION_DAYS = {retention_days:g})"
    return LimitExceeded(
        f"You have stored {count} images, the most allowed (MAX_IMAGES_PER_OWNER = {limit}); "
        f"delete one in the library (or with /delete_image) to make room{later}."
    )


class Quotas:
    """What an owner (and a network address) may still do; every refusal is a LimitExceeded a person can act on."""

    def __init__(self, settings: Settings, db: Database, limiter: RateLimiter | None = None):
        self.settings = settings
        self.db = db
        self.limiter = limiter or RateLimiter(settings.segment_rate_limit)

    def allow_segmentation(self, owner: str, address: str | None = None) -> None:
        """Count one segmentation for the owner and the client address, or raise LimitExceeded."""
        keys = [f"owner:{owner}"] + ([f"addr:{address}"] if address else [])
        refused = self.limiter.hit(keys)
        if refused is None:
            return
        key, wait_s = refused
        who = "You have used your" if key.startswith("owner:") else "Your network address has used its"
        raise LimitExceeded(
            f"{who} {self.limiter.limit} segmentations for this hour (SEGMENT_RATE_LIMIT); "
            f"the next one is possible in {minutes_text(wait_s)}."
        )

    def check_room(self, owner: str, count: int | None = None) -> None:
        """Raise LimitExceeded when the owner already stores MAX_IMAGES_PER_OWNER images."""
        limit = self.settings.max_images_per_owner
        if limit <= 0:
            return
        count = self.db.count_images(owner) if count is None else count
        if count >= limit:
            raise room_refusal(count, limit, self.settings.retention_days)

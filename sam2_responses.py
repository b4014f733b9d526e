"""Reading a SAM2 service's answers: any accepted response shape → normalised SAM2 mask records.

Pure functions, no HTTP (the client is `sam2_client.HttpSegmenter`): find the masks in an answer, decode
inline segmentations (COCO RLE, base64 PNG/JPEG, data: URLs, 0/1 arrays), check their size against the image
sent, build records at the original image size, keep the best, merge near-duplicates and pick the mask that
answers a prompt (for engines that cannot take prompts). Response shapes are documented in docs/sam2-protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

import masks as rle
from errors import InvalidInput, SegmentationBadResponse, SegmentationRejected

log = logging.getLogger("mask_studio.sam2")

DUPLICATE_IOU = 0.95
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Frame:
    """The original image size, the size actually sent, and the most pixels a mask may claim."""

    orig: tuple[int, int]  # (H, W)
    sent: tuple[int, int]  # (h, w)
    max_pixels: int


@dataclass
class Raw:
    """One mask as the service described it, before decoding."""

    segmentation: Any
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: Any = None
    crop_box: Any = None


def records_in(payload: Any) -> list[Raw]:
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
                    "The SAM2 service answered mask_url null: it produced no mask (its own upload may have failed)."
                )
            items = [payload["mask_url"]]
        elif "segmentation" in payload or ("counts" in payload and "size" in payload):
            items = [payload]
        else:
            raise SegmentationBadResponse(
                f"The SAM2 service answered {describe_json(payload)}; expected 'masks', 'individual_masks' "
                "or 'mask_url' (see docs/sam2-protocol.md)."
            )
    elif isinstance(payload, list):
        items = payload
    else:
        raise SegmentationBadResponse(f"The SAM2 service answered {describe_json(payload)}, not masks.")
    if not isinstance(items, list):
        raise SegmentationBadResponse(f"The SAM2 service's masks are {describe_json(items)}, not a list.")
    if not isinstance(scores, list) or len(scores) != len(items):
        scores = [None] * len(items)
    return [_raw(item, i, score) for i, (item, score) in enumerate(zip(items, scores))]


def _raw(item: Any, i: int, score: Any) -> Raw:
    if isinstance(item, (str, list)):
        return Raw(item, predicted_iou=_float(score))
    if not isinstance(item, dict):
        raise SegmentationBadResponse(f"Mask {i} is {describe_json(item)}, not a record.")
    if "counts" in item and "size" in item:
        return Raw(item, predicted_iou=_float(score))
    for key in ("segmentation", "mask_url", "mask"):
        if item.get(key) is not None:
            seg = item[key]
            break
    else:
        raise SegmentationBadResponse(f"Mask {i} has no 'segmentation' ({describe_json(item)}).")
    iou = item.get("predicted_iou", item.get("score", score))
    stability = _float(item.get("stability_score"))
    return Raw(seg, _float(iou), stability, item.get("point_coords"), item.get("crop_box"))


def is_url(seg: Any) -> bool:
    """Whether a segmentation is an address to fetch (a URL or a path on the service), not inline data."""
    if not isinstance(seg, str):
        return False
    text = seg.strip()
    return not text.startswith("data:") and (text.startswith("/") or _URL.match(text) is not None)


def inline_mask(seg: Any, i: int, frame: Frame) -> np.ndarray:
    """A segmentation in the answer itself (not is_url) → boolean mask at the original image size."""
    if isinstance(seg, dict):
        mask = _rle_mask(seg, i, frame)
    elif isinstance(seg, str):
        text = seg.strip()
        if text.startswith("data:"):
            header, _, text = text.partition(",")
            if ";base64" not in header:
                raise SegmentationBadResponse(f"Mask {i} is a data: URL without base64 data.")
        mask = image_mask(_b64(text, i), i, frame, source=f"Mask {i}", error=SegmentationBadResponse)
    elif isinstance(seg, list):
        try:
            arr = np.asarray(seg, dtype=np.float32)
        except (ValueError, TypeError, OverflowError) as exc:
            raise SegmentationBadResponse(f"Mask {i} is a list but not a 2-D array of 0/1.") from exc
        if arr.ndim != 2:
            raise SegmentationBadResponse(f"Mask {i} is a list with {arr.ndim} dimensions, expected 2.")
        _check_size(arr.shape, i, frame, "Mask")
        mask = arr > 0.5
    else:
        raise SegmentationBadResponse(
            f"Mask {i}'s segmentation is a {type(seg).__name__}; expected an RLE, a base64 PNG or a URL."
        )
    return resize_nearest(mask, frame.orig)


def _rle_mask(seg: dict, i: int, frame: Frame) -> np.ndarray:
    size, counts = seg.get("size"), seg.get("counts")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
        or not isinstance(counts, (str, list))
    ):
        raise SegmentationBadResponse(f"Mask {i}'s RLE needs 'size': [h, w] and 'counts' (a string or integers).")
    _check_size((size[0], size[1]), i, frame, "Mask")
    try:
        return rle.decode({"size": size, "counts": counts})
    except (InvalidInput, TypeError, ValueError) as exc:
        why = exc.message if isinstance(exc, InvalidInput) else "its counts are not integers"
        raise SegmentationBadResponse(f"Mask {i}'s RLE is unusable: {why}") from exc


def image_mask(data: bytes, i: int, frame: Frame, *, source: str, error: type[SegmentationRejected]) -> np.ndarray:
    """PNG or JPEG bytes → boolean mask (alpha if it carries the mask, else brightness > 127; 0/1 masks > 0)."""
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
        raise error(f"{source} is not a PNG or JPEG image (it starts with {data[:8]!r}).")
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size((im.height, im.width), i, frame, source)
            im.load()
            if "A" in im.getbands():
                alpha = np.asarray(im.getchannel("A"))
                if alpha.min() < 255:
                    return _binary(alpha)
            return _binary(np.asarray(im.convert("L")))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise error(f"{source} is a damaged image ({exc}).") from exc


def _binary(channel: np.ndarray) -> np.ndarray:
    """0/255 masks are cut at 127; masks written as 0/1 (maximum 1) at 0, or they would come out empty."""
    return channel > (0 if channel.max(initial=0) <= 1 else 127)


def _check_size(shape: tuple[int, int], i: int, frame: Frame, source: str) -> None:
    """A mask must be at the sent or original size, or at least have the image's proportions."""
    h, w = int(shape[0]), int(shape[1])
    name = source if source != "Mask" else f"Mask {i}"
    if h <= 0 or w <= 0:
        raise SegmentationBadResponse(f"{name} has no pixels ({w}×{h}).")
    if (h, w) in (frame.orig, frame.sent):
        return
    H, W = frame.orig
    # A service working at its own resolution: same proportions, within rounding.
    same_aspect = abs(h * W / w - H) <= max(1.5, 0.01 * H) and abs(w * H / h - W) <= max(1.5, 0.01 * W)
    if not same_aspect or h * w > frame.max_pixels:
        sent = f"{frame.sent[1]}×{frame.sent[0]}"
        if frame.sent != frame.orig:
            sent += f" (original {W}×{H})"
        raise SegmentationBadResponse(f"{name} is {w}×{h}, but the image sent was {sent}: sizes disagree.")


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The mask at `shape` (H, W), each pixel taken from the nearest source pixel."""
    h, w = mask.shape
    H, W = shape
    if (h, w) == (H, W):
        return mask
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.intp), w - 1)
    return mask[rows][:, cols]


def to_record(mask: np.ndarray, raw: Raw, frame: Frame) -> dict | None:
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
    except (TypeError, ValueError, OverflowError):
        if value is not None:
            name = "point_coords" if pairs else "crop_box"
            log.debug("ignoring a malformed %s from the SAM2 service", name)
        return None


def rank(record: dict) -> tuple:
    """Better first: has a predicted_iou, higher predicted_iou, larger."""
    iou = record.get("predicted_iou")
    return (iou is not None, iou or 0.0, record["area"])


def keep_best(records: list[dict], limit: int) -> list[dict]:
    """At most `limit` records: the highest predicted_iou, then the largest; the service's order kept."""
    if len(records) <= limit:
        return records
    best = sorted(range(len(records)), key=lambda k: rank(records[k]), reverse=True)[:limit]
    return [records[k] for k in sorted(best)]


def merge_duplicates(records: list[dict], threshold: float = DUPLICATE_IOU) -> list[dict]:
    """Drop near-duplicates (IoU > threshold), keeping the better of each pair (rank)."""
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
                loser = i if rank(records[i]) < rank(records[j]) else j
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
        return max(candidates, key=lambda r: (_box_iou(r["bbox"], box), rank(r)))
    return max(candidates, key=rank)


def answer_from_masks(
    records: list[dict], points: list | None, labels: list[int] | None, box: list[float] | None, engine: str
) -> dict:
    """A prompt answered by an engine that cannot take prompts: the best of its automatic masks, or why none.

    The one path for such engines (prompts_natively False), whether the masks are the ones the studio stored
    for the image or the ones the engine just made."""
    chosen = pick_for_prompt(records, points, labels, box)
    if chosen is None:
        raise SegmentationRejected(
            f"None of the {len(records)} masks the {engine} made for this image covers all include points "
            "without an exclude point (it cannot segment from prompts directly)."
        )
    return dict(chosen)


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


def _b64(text: str, i: int) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SegmentationBadResponse(
            f"Mask {i}'s segmentation is a string that is neither a URL nor base64 image data."
        ) from exc


def _float(value: Any) -> float | None:
    """A score as a finite float, or None (not a number, a bool, NaN, infinite or too large)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def describe_json(value: Any) -> str:
    """A few words on what a JSON value is, for a message (never the whole value)."""
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:8])
        return f"an object with keys {keys}" if keys else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a JSON {type(value).__name__} ({str(value)[:40]!r})"

"""Low-res mask logits to full-size boolean masks, computed only inside the window each mask can reach.

SAM's post-processing (mobilesam_model.MobileSam.to_full) upscales each 256² logit map bilinearly to the 1024²
frame, crops the resized picture out of it, resizes that to the original size, and keeps logits > 0. Every
output value of a bilinear step is a convex combination of the input values it draws on, so a pixel can be
positive only if some low-res logit behind it is. `full_masks` therefore takes each mask's bounding box of
positive low-res logits, follows it through both steps (per axis, with the steps' own source indices) to the
window of original pixels it can reach, and runs both steps on that window only:
- step 1 with F.interpolate on a crop of exactly the low-res pixels the window draws on: it gives bit for bit
  what the whole map gives there (scale 1/4 exactly, so the same source positions and weights, and no source
  position of the window falls outside the crop, where clamping would differ);
- step 2, when the original size differs from the resized one, by F.interpolate's own formula (source
  (i + 0.5)·in/out − 0.5, clamped at 0; the two nearest inputs, weighted by distance) rows then columns: equal
  to the full computation up to float rounding.
A mask covering a fifth of the picture costs about a fifth of the full-frame upscale; an empty one costs nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Geometry:
    """The two resizes: low-res side → frame side (step 1), then the frame's top-left input size → original."""

    low_res: int  # 256
    frame: int  # 1024
    input_size: tuple[int, int]  # (h, w) of the resized picture inside the frame
    original_size: tuple[int, int]  # (h, w)


@dataclass(frozen=True)
class _Axis:
    """One bilinear resize along one axis: for each output index, its two source indices and the second's weight."""

    lo: np.ndarray
    hi: np.ndarray
    weight: np.ndarray  # float32, of `hi` (lo's is 1 - weight)


@functools.lru_cache(maxsize=32)
def _axis(n_in: int, n_out: int) -> _Axis:
    """As F.interpolate(mode="bilinear", align_corners=False) computes it along one axis (float32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    weight = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
    return _Axis(lo, hi, weight)


@dataclass(frozen=True)
class _Span:
    """Along one axis: the output window [out0, out1), the frame rows [f0, f1) and the low-res crop [c0, c1)."""

    out0: int
    out1: int
    f0: int
    f1: int
    c0: int
    c1: int


def _span(first: int, last: int, low_res: int, frame: int, n_in: int, n_out: int) -> _Span | None:
    """The window of outputs that low-res indices first..last (inclusive) can reach, and what computing it needs."""
    step1 = _axis(low_res, frame)
    a0 = int(np.searchsorted(step1.hi, first, "left"))
    a1 = min(int(np.searchsorted(step1.lo, last, "right")), n_in)  # the frame is cropped to the input size
    if a0 >= a1:
        return None
    if n_in == n_out:  # step 2 is the identity
        out0, out1, f0, f1 = a0, a1, a0, a1
    else:
        step2 = _axis(n_in, n_out)
        out0 = int(np.searchsorted(step2.hi, a0, "left"))
        out1 = int(np.searchsorted(step2.lo, a1 - 1, "right"))
        if out0 >= out1:
            return None
        f0, f1 = int(step2.lo[out0]), int(step2.hi[out1 - 1]) + 1
    c0, c1 = int(step1.lo[f0]), int(step1.hi[f1 - 1]) + 1
    return _Span(out0, out1, f0, f1, c0, c1)


def _resize_rows(x: np.ndarray, axis: _Axis, span: _Span) -> np.ndarray:
    """Step 2 along the rows of x (frame rows span.f0..f1) for outputs span.out0..out1 (rows are copied whole:
    a gather along the other axis costs several times more, so columns are done on the transpose)."""
    part = slice(span.out0, span.out1)
    w = axis.weight[part, None]
    out = x[axis.lo[part] - span.f0] * (1 - w)
    out += x[axis.hi[part] - span.f0] * w
    return out


def _window(logits: np.ndarray, geo: Geometry, rows: _Span, cols: _Span) -> np.ndarray:
    """Both steps on one mask's window: a boolean array of the window's original pixels."""
    scale = geo.frame // geo.low_res
    crop = torch.from_numpy(np.ascontiguousarray(logits[rows.c0 : rows.c1, cols.c0 : cols.c1]))
    with torch.inference_mode():
        up = F.interpolate(crop[None, None], scale_factor=float(scale), mode="bilinear", align_corners=False)
    top, left = rows.f0 - scale * rows.c0, cols.f0 - scale * cols.c0
    x = up[0, 0].numpy()[top : top + rows.f1 - rows.f0, left : left + cols.f1 - cols.f0]
    (in_h, in_w), (height, width) = geo.input_size, geo.original_size
    if in_h != height:
        x = _resize_rows(x, _axis(in_h, height), rows)
    if in_w != width:
        x = _resize_rows(np.ascontiguousarray(x.T), _axis(in_w, width), cols).T
    return x > 0


def full_masks(low_res_logits: np.ndarray, geo: Geometry) -> np.ndarray:
    """Logits M×L×L → boolean masks M×H×W at the original size, equal to `upscale(...) > 0` (module docstring)."""
    height, width = geo.original_size
    (in_h, in_w), side, frame = geo.input_size, geo.low_res, geo.frame
    out = np.zeros((len(low_res_logits), height, width), bool)
    for m, logits in enumerate(low_res_logits):
        positive = logits > 0
        rows_hit, cols_hit = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
        if rows_hit.size == 0:
            continue
        rows = _span(int(rows_hit[0]), int(rows_hit[-1]), side, frame, in_h, height)
        cols = _span(int(cols_hit[0]), int(cols_hit[-1]), side, frame, in_w, width)
        if rows is None or cols is None:
            continue
        out[m, rows.out0 : rows.out1, cols.out0 : cols.out1] = _window(logits, geo, rows, cols)
    return out

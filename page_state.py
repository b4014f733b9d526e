"""One browser tab's state: the image it has open, what is painted and selected, its undo history, object points.

Pure and immutable: every change returns a new PageState, nothing here knows Gradio or the studio. Gradio keeps
one per tab in a gr.State and deep-copies it on every event, so it holds ids and short tuples, never pixels
(`preview` is one mask as compressed RLE).

Undo restores what was painted *and* what was selected, so the selection a person sees after Undo is the one
that was on screen before the step they took back ("Remove selected" then acts on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from errors import InvalidInput

HISTORY_LIMIT = 50  # undo steps kept per tab

Rgba = tuple[int, int, int, int]
Step = tuple[int, Rgba]  # (mask id, colour it is painted in)
Point = tuple[int, int, int]  # (x, y, label): label 1 include, 0 exclude


@dataclass(frozen=True)
class Snapshot:
    """What Undo goes back to: the painted steps and the selection as they were."""

    steps: tuple[Step, ...]
    selected: int | None


@dataclass(frozen=True)
class PageState:
    """A page's state; `owner` stays None until the page has loaded and said who is using it."""

    image_id: str | None = None
    owner: str | None = None
    steps: tuple[Step, ...] = ()  # painted masks, later over earlier
    selected: int | None = None
    history: tuple[Snapshot, ...] = ()
    click: tuple[int, int] | None = None  # the last click on the picture that found masks (or none)
    candidates: tuple[int, ...] = ()  # the masks under that click, smallest first
    order: tuple[int, ...] = ()  # the gallery's mask ids, in the order its thumbnails are shown
    points: tuple[Point, ...] = ()  # object mode: the include/exclude points so far
    preview: dict | None = field(default=None, compare=False)  # object mode: the previewed mask record

    # ---- reading -------------------------------------------------------------------------------
    @property
    def painted(self) -> list[int]:
        return [mid for mid, _ in self.steps]

    @property
    def can_remove(self) -> bool:
        """Whether "Remove selected" has something to remove: the selection is painted."""
        return self.selected is not None and self.selected in self.painted

    @property
    def gallery_index(self) -> int | None:
        """The thumbnail to highlight: the selected mask's, or none."""
        return self.order.index(self.selected) if self.selected in self.order else None

    def colour_of(self, mask_id: int) -> Rgba | None:
        return next((c for mid, c in self.steps if mid == mask_id), None)

    def instructions(self) -> list[dict]:
        """The painted steps as Studio.render takes them."""
        return [{"mask_id": mid, "color": list(c)} for mid, c in self.steps]

    # ---- changing the image or the gallery -------------------------------------------------------
    def opened(self, image_id: str | None) -> PageState:
        """A fresh page for that image (or none), same owner."""
        return PageState(image_id=image_id, owner=self.owner)

    def with_order(self, order: Sequence[int]) -> PageState:
        return replace(self, order=tuple(order))

    # ---- painting --------------------------------------------------------------------------------
    def _remembered(self) -> tuple[Snapshot, ...]:
        """The history with the present appended: the one place the undo cap applies."""
        return (*self.history, Snapshot(self.steps, self.selected))[-HISTORY_LIMIT:]

    def paint(self, mask_id: int, colour: Rgba, *, replace_mask: int | None = None) -> PageState:
        """Select mask_id and paint it on top; `replace_mask` is a mask whose paint this takes back."""
        kept = tuple(s for s in self.steps if s[0] != mask_id and s[0] != replace_mask)
        return replace(self, history=self._remembered(), steps=(*kept, (mask_id, _rgba(colour))), selected=mask_id)

    def recolour(self, colour: Rgba) -> PageState:
        """The selected mask in a new colour. A drag of the picker or slider is one undo step, not fifty."""
        colour = _rgba(colour)
        if self.selected is None or self.colour_of(self.selected) == colour:
            return self
        last = self.history[-1] if self.history else None
        coalesce = last is not None and last.selected == self.selected and [s[0] for s in last.steps] == self.painted
        history = self.history if coalesce else self._remembered()
        if self.selected in self.painted:
            steps = tuple((mid, colour if mid == self.selected else c) for mid, c in self.steps)
        else:
            steps = (*self.steps, (self.selected, colour))
        return replace(self, history=history, steps=steps)

    def undo(self) -> PageState:
        """Back to the painted masks and the selection before the last step (unchanged when there is none)."""
        if not self.history:
            return self
        last = self.history[-1]
        return replace(self, history=self.history[:-1], steps=last.steps, selected=last.selected)

    def remove(self) -> PageState:
        """Take the selected mask's paint off; removed means unselected (a colour change must not bring it back)."""
        if not self.can_remove:
            raise InvalidInput("Select a painted mask first (click it), then remove it.")
        steps = tuple(s for s in self.steps if s[0] != self.selected)
        return replace(self, history=self._remembered(), steps=steps, selected=None)

    def clear(self) -> PageState:
        """No paint, no selection (one undo step, if anything was painted)."""
        history = self._remembered() if self.steps else self.history
        return replace(self, history=history, steps=(), selected=None, candidates=())

    # ---- clicks ----------------------------------------------------------------------------------
    def clicked(self, point: tuple[int, int], candidates: Sequence[int], colour: Rgba, tolerance: float) -> PageState:
        """A click on the picture at `point` over `candidates` (smallest first): the smallest is selected and
        painted; the same spot again (within `tolerance` pixels) steps to the next larger mask (part → whole),
        also when masks were added under it meanwhile (a click's prompt, the automatic pass)."""
        cands = tuple(candidates)
        if not cands:
            return replace(self, click=(int(point[0]), int(point[1])), candidates=())
        again = self.click is not None and math.dist(self.click, point) <= tolerance and self.selected in cands
        if again:
            target = cands[(cands.index(self.selected) + 1) % len(cands)]
            painted = self.paint(target, colour, replace_mask=self.selected)
        else:
            painted = self.paint(cands[0], colour)
        return replace(painted, click=(int(point[0]), int(point[1])), candidates=cands)

    def picked_thumbnail(self, index: int, colour: Rgba) -> PageState:
        """The gallery's thumbnail number `index` was clicked: select and paint its mask."""
        if self.image_id is None or not 0 <= index < len(self.order):
            raise InvalidInput("Upload a photo first.")
        return replace(self.paint(self.order[index], colour), click=None, candidates=())

    def picked_mask(self, mask_id: int, colour: Rgba) -> PageState:
        """The thumbnail of mask `mask_id` was clicked (the gallery may be newer than `order`): select and paint it."""
        if self.image_id is None:
            raise InvalidInput("Upload a photo first.")
        return replace(self.paint(mask_id, colour), click=None, candidates=())

    # ---- object mode -----------------------------------------------------------------------------
    def points_with(self, x: int, y: int, *, include: bool) -> tuple[Point, ...]:
        """The object's points with one more (not yet kept: the preview for them comes first)."""
        points = (*self.points, (x, y, 1 if include else 0))
        if not any(p[2] == 1 for p in points):
            raise InvalidInput("Start an object with an include point.")
        return points

    def previewing(self, points: tuple[Point, ...], preview: dict) -> PageState:
        return replace(self, points=points, preview=preview)

    def without_object(self) -> PageState:
        """The object's points and preview dropped (reset, or left object mode)."""
        return replace(self, points=(), preview=None)

    def kept_object(self, mask_id: int, colour: Rgba) -> PageState:
        """The previewed object was stored as mask_id: selected and painted, object mode starts afresh."""
        return replace(self.without_object().paint(mask_id, colour), click=None, candidates=())


def _rgba(colour: Sequence[int]) -> Rgba:
    r, g, b, a = colour
    return (int(r), int(g), int(b), int(a))


def click_tolerance(width: int, display_width: int) -> float:
    """How far (image pixels) a second click may land from the first and count as "the same spot": a finger
    is not a mouse. 1 % of the picture's width, and at least one display pixel."""
    return max(1.0, 0.01 * width, width / max(1, display_width))

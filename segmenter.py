"""The segmenter interface every engine implements, and the factory that picks the engine (SEGMENTER).

Engines, one module each, none importing another:
- `service`:   the external SAM2 service over HTTP (`sam2_client.HttpSegmenter`), when SAM_API_URL is set;
- `mobilesam`: MobileSAM in this process (`mobilesam_engine.MobileSamSegmenter`; needs torch and a checkpoint);
- `builtin`:   the classical segmenter (`builtin_segmenter.BuiltinSegmenter`): offline, always available.
SEGMENTER=auto (the default) takes the service when SAM_API_URL is set, else MobileSAM when it loads, else
the built-in engine. An in-process `sam2` engine comes next: one more row in ENGINES (and in AUTO_MODELS).

Engines import this module for the interface; this module reaches the engines only when the factory runs,
by module name (importlib), so importing the interface loads neither torch nor httpx, and an engine whose
runtime is missing is a reason to fall back, not a crash at import.

A mask record has the SAM2 automatic-mask-generator shape:
    {"segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}, "area": int,
     "bbox": [x, y, w, h], "predicted_iou": float | None, "stability_score": float | None,
     "point_coords": [[x, y]] | None, "crop_box": [x, y, w, h]}
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from errors import InvalidInput, SegmentationCancelled, SegmentationUnavailable
from settings import Settings

log = logging.getLogger("mask_studio.segmenter")

# progress(fraction 0..1, description)
Progress = Callable[[float, str], None]
OnMasks = Callable[[list[dict]], None]  # new records, handed over as an automatic pass finds them


def no_progress(fraction: float, text: str) -> None:
    """A Progress that reports nowhere."""


def check_cancel(cancel: threading.Event | None) -> None:
    """Stop with SegmentationCancelled once `cancel` is set (the person who asked has left)."""
    if cancel is not None and cancel.is_set():
        raise SegmentationCancelled("Segmentation was cancelled: the person who asked for it has left.")


@runtime_checkable
class Segmenter(Protocol):
    """What the studio needs from an engine. Records are in the SAM2 shape (module docstring)."""

    engine: str  # shown to people: which engine produced the masks
    # True: segment() runs a real prompt decoder. False: segment() can only pick among automatic masks, so the
    # studio answers prompts on an image this engine segmented from the masks it stored (no second run).
    prompts_natively: bool

    def generate(
        self, image: np.ndarray, *, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> list[dict]:
        """Automatic masks of an upright RGB uint8 HxWx3 image, as SAM2 records (overlapping, unsorted).

        When `cancel` is set (the person left), stop as soon as possible with SegmentationCancelled."""
        ...

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

        Prompts are checked with `validation.check_prompt`. When `cancel` is set, stop with SegmentationCancelled."""
        ...

    def prepare(self, image: np.ndarray) -> None:
        """Warm per-image state so later prompts on this image are fast (e.g. a SAM image embedding).

        A no-op for engines that keep none."""
        ...

    def health(self) -> tuple[bool, str]:
        """(ok, a short sentence for the status line); must not block for long."""
        ...

    def close(self) -> None:
        """Release connections, threads and caches."""
        ...


@runtime_checkable
class SamEngine(Protocol):
    """What a SAM-family engine in this process adds to the Segmenter interface (sam_engine.PromptModelSegmenter):
    masks handed over as the automatic pass finds them, and the decoder's candidates for one click."""

    engine: str
    prompts_natively: bool

    def prepare(self, image: np.ndarray) -> None: ...

    def generate(
        self,
        image: np.ndarray,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_masks: OnMasks | None = None,
    ) -> list[dict]: ...

    def candidates(
        self, image: np.ndarray, *, points: list[list[float]] | None = None, point_labels: list[int] | None = None
    ) -> list[dict]: ...


def streaming_engine(segmenter: Segmenter) -> SamEngine | None:
    """The engine as a SAM model in this process (prompts on a cached embedding, masks streamed), or None."""
    return segmenter if segmenter.prompts_natively and isinstance(segmenter, SamEngine) else None


# ---------------------------------------------------------------------------------------------------------
# The factory. Each loader builds one engine or raises: SegmentationUnavailable (message = why it cannot run
# here) or ImportError (its runtime is not installed).


Loader = Callable[[Settings], Segmenter]
BUILTIN_NAME = "the built-in classical segmenter"


def _load_builtin(settings: Settings) -> Segmenter:
    module = importlib.import_module("builtin_segmenter")
    return module.BuiltinSegmenter(max_masks=settings.max_masks)


def _load_service(settings: Settings) -> Segmenter:
    if not settings.sam_api_url:
        raise InvalidInput(
            "SEGMENTER=service needs SAM_API_URL: set it to the SAM2 service's address, "
            "or choose SEGMENTER=auto to run without a service.",
            title="Configuration error",
        )
    module = importlib.import_module("sam2_client")
    return module.HttpSegmenter(settings)


def _load_mobilesam(settings: Settings) -> Segmenter:
    try:
        module = importlib.import_module("mobilesam_engine")
    except ImportError as exc:
        if exc.name == "mobilesam_engine":
            raise SegmentationUnavailable("the MobileSAM engine is not part of this installation") from exc
        raise ImportError(f"MobileSAM needs torch: {exc}") from exc
    return module.MobileSamSegmenter.load(
        checkpoint=settings.mobilesam_checkpoint, models_dir=settings.models_dir, max_masks=settings.max_masks
    )


def _load_sam2(settings: Settings) -> Segmenter:
    if not settings.sam2_model:
        raise SegmentationUnavailable("SAM2_MODEL is not set (e.g. facebook/sam2.1-hiera-tiny)")
    try:
        module = importlib.import_module("sam2_engine")
        importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(f"SAM2 needs torch and transformers (pip install -r requirements-sam2.txt): {exc}") from exc
    return module.Sam2Segmenter.load(
        settings.sam2_model, settings.models_dir / "hub", settings.sam2_device, max_masks=settings.max_masks
    )


# name → (loader, the engine's name in a sentence).
ENGINES: dict[str, tuple[Loader, str]] = {
    "service": (_load_service, "the SAM2 service"),
    "sam2": (_load_sam2, "SAM2"),
    "mobilesam": (_load_mobilesam, "MobileSAM"),
    "builtin": (_load_builtin, BUILTIN_NAME),
}
# In-process models SEGMENTER=auto tries, in order, when SAM_API_URL is unset; the built-in engine is the last resort.
AUTO_MODELS: tuple[str, ...] = ("mobilesam",)


def make_segmenter(settings: Settings) -> tuple[Segmenter, str | None]:
    """The engine SEGMENTER asks for, and (when a preferred engine could not be used) a sentence saying why.

    A model engine that cannot load falls back to the built-in engine: logged at INFO under auto, as a
    warning when chosen explicitly. A misconfiguration (SEGMENTER=service without SAM_API_URL, a bad
    SAM_API_URL) raises InvalidInput."""
    choice = settings.segmenter
    if choice == "auto":
        if settings.sam_api_url:
            return _load_service(settings), None
        # SAM2_MODEL set: SAM 2 in this process first (a GPU box or Space), MobileSAM if it cannot load.
        models = ("sam2", *AUTO_MODELS) if settings.sam2_model else AUTO_MODELS
        return _first_model(settings, models, explicit=False)
    if choice in ("service", "builtin"):
        return ENGINES[choice][0](settings), None
    return _first_model(settings, (choice,), explicit=True)


def _first_model(settings: Settings, names: tuple[str, ...], *, explicit: bool) -> tuple[Segmenter, str | None]:
    """The first of these model engines that loads; else the built-in engine and why the others did not."""
    reasons = []
    for name in names:
        load, title = ENGINES[name]
        try:
            return load(settings), None
        except (SegmentationUnavailable, ImportError) as exc:
            text = exc.message if isinstance(exc, SegmentationUnavailable) else str(exc)
            reasons.append(f"{title} not used: {text.rstrip('.')}")
    reason = "; ".join(reasons) + f". Using {BUILTIN_NAME} instead."
    if explicit:
        log.warning("SEGMENTER=%s: %s", settings.segmenter, reason)
    else:
        log.info("%s", reason)
    return _load_builtin(settings), reason

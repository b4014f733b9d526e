"""SAM 2 / 2.1 through transformers' `Sam2Model`, behind the low-level embed / decode / to_full calls.

Those three calls are the interface the engine and the automatic pass use for every SAM-family model
(MobileSAM's `mobilesam_model.MobileSam` has the same), so one engine serves both:
- `embed(rgb) -> Sam2Embedding`: the costly step, once per image (the engine caches it);
- `decode(emb, points [N,K,2] (x, y) original pixels, labels [N,K], boxes [N,4] | None, multimask=True)
  -> (low-res logits [N,3,L,L] float32, predicted IoU [N,3] float32)` (N×1 with multimask=False);
- `to_full(emb, low_res [M,L,L]) -> logits [M,H,W]` at the original size (mask = logits > 0).

Why transformers: it is maintained with SAM 2.1 in its model zoo, needs no CUDA extension to build (Meta's
`sam2` package compiles one and pins its own torch), loads checkpoints from the Hugging Face Hub with its
own cache and progress bars, and depends on nothing heavy beyond torch, which the MobileSAM engine needs
already. It stays an optional extra (requirements-sam2.txt): the app runs without it.

SAM 2's geometry (as its own `SAM2Transforms`): the image is resized to the square model input
(1024×1024, aspect ratio not kept, no padding), pixels scaled to 0..1 and normalised with ImageNet
mean/std; a prompt (x, y) becomes (x·S/W, y·S/H); the decoder's L×L logits (L = 256 at S = 1024) cover the
whole square, so they are resized straight to the original H×W (bilinear). `input_size` is (S, S).

Device: CUDA, then Apple MPS, then CPU unless one is named (SAM2_DEVICE); weights in float16 on a GPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from errors import InvalidInput, SegmentationUnavailable

log = logging.getLogger("mask_studio.sam2_model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_CHUNK = 64  # prompts per decoder call: bounded memory (64 × 3 × 256² float32 is 50 MB)
UPSCALE_CHUNK = 8  # masks per full-size resize
DEVICES = ("auto", "cuda", "mps", "cpu")


@dataclass(frozen=True)
class Sam2Embedding:
    """One image's encoder output: the two high-resolution feature maps and the image embedding (last)."""

    features: tuple[Any, ...]  # torch tensors, on the model's device and dtype
    original_size: tuple[int, int]  # (h, w) of the image
    input_size: tuple[int, int]  # (h, w) of the model input it was resized to: the whole square

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)


def pick_device(requested: str | None = None) -> Any:
    """The torch device to run on: `requested` (cuda, cuda:N, mps, cpu) or, for None/auto, the best present.

    InvalidInput for a name torch does not know; SegmentationUnavailable for a device this machine lacks."""
    import torch

    name = (requested or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInput(
            f"SAM2_DEVICE must be auto, cuda, cuda:N, mps or cpu; got {requested!r}.", title="Configuration error"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegmentationUnavailable(f"SAM2_DEVICE={requested} but this machine has no CUDA GPU that torch can use.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SegmentationUnavailable(
            f"SAM2_DEVICE={requested} but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
        )
    if device.type == "mps" and not _mps_available():
        raise SegmentationUnavailable(f"SAM2_DEVICE={requested} but Apple's MPS is not available here.")
    if device.type not in ("cuda", "mps", "cpu"):
        raise InvalidInput(f"SAM2_DEVICE must be auto, cuda, cuda:N, mps or cpu; got {requested!r}.")
    return device


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def dtype_for(device: Any) -> Any:
    """float16 on a GPU (half the memory, tensor cores), float32 on the CPU (where half is slow or missing)."""
    import torch

    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


class Sam2Adapter:
    """A loaded transformers `Sam2Model` and the three calls the engine and the automatic pass use."""

    def __init__(self, model: Any, *, model_id: str, device: Any = None, dtype: Any = None):
        import torch

        self.device = device if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else dtype_for(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.model_id = model_id
        prompt = model.config.prompt_encoder_config
        self.image_size = int(prompt.image_size)
        self.low_res = 4 * self.image_size // int(prompt.patch_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)

    @property
    def description(self) -> str:
        precision = "float16" if self.dtype.is_floating_point and self.dtype.itemsize == 2 else "float32"
        return f"{self.model_id} on {self.device} ({precision})"

    def embed(self, rgb: np.ndarray) -> Sam2Embedding:
        """RGB uint8 H×W×3 → its embedding (the image encoder: the costly step)."""
        import torch
        import torch.nn.functional as F

        height, width = rgb.shape[:2]
        side = self.image_size
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False, antialias=True)
            x = ((x[0] - self._mean) / self._std)[None].to(self.dtype)
            features = self.model.get_image_embeddings(x)
        return Sam2Embedding(tuple(f.contiguous() for f in features), (height, width), (side, side))

    def decode(
        self,
        emb: Sam2Embedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts in original pixels → (low-res logits N×3×L×L, predicted IoU N×3), float32 numpy.

        points N×K×2 (x, y), labels N×K (1 include, 0 exclude, -1 padding), boxes N×4 (x0, y0, x1, y1);
        points or boxes may be None. multimask=False: SAM 2's single answer (N×1), better for several
        points or a box."""
        import torch

        height, width = emb.original_size
        scale = np.array([self.image_size / width, self.image_size / height], np.float32)
        pts = None if points is None else np.asarray(points, np.float32) * scale
        box = None if boxes is None else np.asarray(boxes, np.float32) * np.tile(scale, 2)
        lab = None if labels is None else np.asarray(labels, np.int64)
        prompts = pts if pts is not None else box
        if prompts is None:
            raise InvalidInput("A prompt needs points or a box.")
        n = prompts.shape[0]
        logits, ious = [], []
        with torch.inference_mode():
            for start in range(0, n, DECODE_CHUNK):
                part = slice(start, start + DECODE_CHUNK)
                out = self.model(
                    image_embeddings=list(emb.features),
                    input_points=None if pts is None else self._tensor(pts[part][None]),
                    input_labels=None if lab is None else torch.from_numpy(lab[part][None]).to(self.device),
                    input_boxes=None if box is None else self._tensor(box[part][None]),
                    multimask_output=multimask,
                )
                logits.append(out.pred_masks[0].float().cpu().numpy())
                ious.append(out.iou_scores[0].float().cpu().numpy())
        return np.concatenate(logits), np.concatenate(ious)

    def low_res_frame(self, emb: Sam2Embedding) -> tuple[int, int, float, float]:
        """Where the image lies in the decoder's low-res logits: all of them (SAM 2 squashes the image to the
        square, no padding), and the scale from original pixels to low-res pixels along x and y."""
        height, width = emb.original_size
        return self.low_res, self.low_res, self.low_res / width, self.low_res / height

    def point_features(self, emb: Sam2Embedding, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The image embedding (the encoder's coarsest feature map) at original pixels (xs, ys): N×C float32
        vectors of unit length (the automatic pass compares places with them)."""
        from auto_masks import embedding_at

        height, width = emb.original_size
        coarsest = min(emb.features, key=lambda f: f.shape[-1])[0].float().cpu().numpy()
        side = self.image_size
        return embedding_at(coarsest, xs, ys, side / width, side / height, side)

    def to_full(self, emb: Sam2Embedding, low_res_logits: np.ndarray) -> np.ndarray:
        """Low-res logits M×L×L → logits M×H×W at the original size (mask = logits > 0)."""
        import torch
        import torch.nn.functional as F

        low = np.ascontiguousarray(low_res_logits, np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, low.shape[0], UPSCALE_CHUNK):
                x = torch.from_numpy(low[start : start + UPSCALE_CHUNK]).to(self.device)[:, None]
                x = F.interpolate(x, emb.original_size, mode="bilinear", align_corners=False)
                out.append(x[:, 0].cpu().numpy())
        if not out:
            return np.zeros((0, *emb.original_size), np.float32)
        return np.concatenate(out)

    def _tensor(self, arr: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=self.device, dtype=self.dtype)


def load(model_id: str, cache_dir: str | Path | None = None, device: str | None = None) -> Sam2Adapter:
    """A SAM 2 / 2.1 checkpoint from the Hugging Face Hub (downloaded into `cache_dir` the first time).

    SegmentationUnavailable with the reason when transformers is missing, the Hub cannot be reached and the
    checkpoint is not cached, or the id names no SAM 2 checkpoint."""
    try:
        import torch  # noqa: F401
        from transformers import Sam2Model
    except ImportError as exc:
        raise SegmentationUnavailable(
            f"SAM2 needs torch and transformers ({exc.name} is not installed): pip install -r requirements-sam2.txt"
        ) from exc
    target = pick_device(device)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    log.info(
        "Loading SAM2 %s onto %s (from the Hub into %s the first time; progress below)",
        model_id,
        target,
        cache_dir or "the Hugging Face cache",
    )
    try:
        model = Sam2Model.from_pretrained(model_id, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:  # no network and not cached; unknown id; not a SAM 2 checkpoint
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise SegmentationUnavailable(
            f"The SAM2 checkpoint {model_id!r} could not be loaded{hint}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    adapter = Sam2Adapter(model, model_id=model_id, device=target)
    log.info("SAM2 ready: %s", adapter.description)
    return adapter

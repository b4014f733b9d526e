"""The in-process MobileSAM engine: SAM masks on the CPU, no service, with the image embedding cached per image.

MobileSAM (SAM's prompt encoder and mask decoder with a distilled TinyViT image encoder, mobilesam_model) driven
by the engine logic all SAM-family models share (sam_engine.PromptModelSegmenter): a click costs one decoder
pass on the cached embedding (tens of ms); the embedding (about a second at 1024²) is computed once per picture,
shared by every session and kept on disk too (under MODELS_DIR/embeddings), so clicks on a stored image work
right after a restart. The weights are obtained and checked by model_weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from embedding_cache import DiskStore, EmbeddingCache
from errors import InvalidInput, SegmentationUnavailable
from sam_engine import AutoPass, PromptModelSegmenter

log = logging.getLogger("mask_studio.mobilesam")

ENGINE_MOBILESAM = "MobileSAM (in-process, CPU)"
THREADS = 2  # a small CPU box: more threads than cores only adds contention
RUNTIME = "onnx"  # encoder and decoder on onnxruntime (about twice torch's speed here), or "torch"
CACHE_BYTES = 48 * 4 * 1024 * 1024  # 48 embeddings of 4 MB in memory
DISK_CACHE_BYTES = 256 * 4 * 1024 * 1024  # 256 on disk


class MobileSamSegmenter(PromptModelSegmenter):
    """The Segmenter that runs MobileSAM in this process (see the module docstring)."""

    def __init__(
        self,
        model,
        *,
        max_masks: int,
        cache: EmbeddingCache,
        checkpoint: Path,
        official: bool,
        auto_pass: AutoPass | None = None,
    ):
        super().__init__(model, engine=ENGINE_MOBILESAM, cache=cache, max_masks=max_masks, auto_pass=auto_pass)
        self.checkpoint = checkpoint
        self.official = official

    @classmethod
    def load(
        cls, *, checkpoint: Path | None, models_dir: Path, max_masks: int, runtime: str = RUNTIME
    ) -> MobileSamSegmenter:
        """Obtain the weights (downloading once when needed) and load the model, or raise
        SegmentationUnavailable saying why (no torch, no weights, a file that is not a MobileSAM checkpoint).

        runtime: "onnx" runs the image encoder and the decoder on onnxruntime (each exported once into
        models_dir; torch for a part whose export fails, with a log line), "torch" keeps both in torch."""
        import model_weights

        if max_masks < 1:
            raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
        try:
            import mobilesam_model  # noqa: I001 - first: it sets how torch's threads wait before torch loads
            import torch
        except ImportError as exc:
            raise SegmentationUnavailable(
                f"MobileSAM needs PyTorch, which is not installed ({exc}). Install it with: pip install torch==2.13.0"
            ) from exc
        path, official = model_weights.resolve(checkpoint, Path(models_dir))
        torch.set_num_threads(THREADS)
        model = _load_model(mobilesam_model, path)
        if not official:
            log.warning("Running MobileSAM with %s, which is not the official checkpoint file", path)
        digest = model_weights.sha256_of(path)
        if runtime == "onnx":
            import mobilesam_onnx

            mobilesam_onnx.attach_encoder(model, Path(models_dir), digest)
            mobilesam_onnx.attach(model, Path(models_dir), digest)
        disk = DiskStore(
            Path(models_dir) / "embeddings" / digest[:12],
            _embedding_to_array,
            _embedding_from_array,
            DISK_CACHE_BYTES,
        )
        cache: EmbeddingCache = EmbeddingCache(CACHE_BYTES, disk=disk)
        return cls(model, max_masks=max_masks, cache=cache, checkpoint=path, official=official)

    def health(self) -> tuple[bool, str]:
        note = "" if self.official else f" with a non-official checkpoint ({self.checkpoint.name})"
        return True, f"{self.engine} ready{note}"


# --------------------------------------------------------------------------------------------------- helpers


def _load_model(mobilesam_model, path: Path):
    """Load strictly; a file that is not a complete MobileSAM checkpoint becomes a clear message."""
    try:
        return mobilesam_model.load(path)
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SegmentationUnavailable(
            f"{path} is not a usable MobileSAM checkpoint (truncated, damaged or another model: {first}). "
            "Point MOBILESAM_CHECKPOINT at the official mobile_sam.pt, or unset it to download that file."
        ) from exc


def _embedding_to_array(emb) -> np.ndarray:
    """Features flattened, followed by the original and input (h, w): one float32 vector per file."""
    sizes = np.array([*emb.original_size, *emb.input_size], np.float32)
    return np.concatenate([emb.features.numpy().ravel(), sizes])


def _embedding_from_array(arr: np.ndarray):
    import torch

    import mobilesam_model

    side, dim = mobilesam_model.EMBED_SIZE, mobilesam_model.PROMPT_DIM
    if arr.shape != (dim * side * side + 4,):
        raise ValueError(f"expected {dim * side * side + 4} values, got shape {arr.shape}")
    features = torch.from_numpy(np.ascontiguousarray(arr[:-4])).view(1, dim, side, side)
    h, w, ih, iw = (int(v) for v in arr[-4:])
    return mobilesam_model.Embedding(features, (h, w), (ih, iw))

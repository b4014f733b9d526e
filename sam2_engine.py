"""The in-process SAM 2 engine: SAM 2 / 2.1 checkpoints through transformers (sam2_model), on CUDA, MPS or CPU.

The engine logic is the one every SAM-family model shares (sam_engine.PromptModelSegmenter): cached
embeddings, prompts through the decoder, multimask candidates, the automatic pass. On a Hugging Face ZeroGPU
Space the model work of each call runs inside `spaces.GPU` when `spaces` imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedding_cache import EmbeddingCache
from sam_engine import AutoPass, PromptModelSegmenter, run_here

log = logging.getLogger("mask_studio.sam2_engine")

GPU_SECONDS = 120  # what a ZeroGPU call may take at most (an automatic pass on a large image included)
CACHE_BYTES = 16 * 4 * 1024 * 1024  # embeddings kept in memory (a SAM 2 embedding with its high-res features is larger)


class Sam2Segmenter(PromptModelSegmenter):
    """SAM 2 / 2.1 in this process (transformers), with the shared engine logic above."""

    @classmethod
    def load(
        cls,
        model_id: str,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        *,
        max_masks: int = 128,
        cache_bytes: int = CACHE_BYTES,
        auto_pass: AutoPass | None = None,
    ) -> Sam2Segmenter:
        """Load `model_id` (e.g. facebook/sam2.1-hiera-tiny) from the Hub into `cache_dir` onto `device`.

        SegmentationUnavailable (with the reason) when it cannot be loaded here."""
        import sam2_model

        adapter = sam2_model.load(model_id, cache_dir, device)
        cache: EmbeddingCache = EmbeddingCache(cache_bytes)
        return cls.from_adapter(adapter, max_masks=max_masks, cache=cache, auto_pass=auto_pass)

    @classmethod
    def from_adapter(cls, adapter: Any, **options: Any) -> Sam2Segmenter:
        """The engine on an already loaded `sam2_model.Sam2Adapter` (tests build one from a config)."""
        options.setdefault("cache", EmbeddingCache(CACHE_BYTES))
        return cls(adapter, engine=f"SAM2 in-process ({adapter.description})", run=zero_gpu(), **options)


# ---------------------------------------------------------------------------------------------------------
# ZeroGPU: on a Hugging Face ZeroGPU Space a GPU is attached only inside functions decorated with
# spaces.GPU; elsewhere that decorator changes nothing, so it is used whenever the package imports.


def zero_gpu(seconds: int = GPU_SECONDS) -> Callable[..., Any]:
    """A runner `run(fn, *args)` that calls fn inside `spaces.GPU` when `spaces` is importable, else directly."""
    try:
        import spaces
    except ImportError:
        return run_here
    log.info("spaces is installed: SAM2 model work runs inside spaces.GPU (ZeroGPU)")
    return spaces.GPU(duration=seconds)(run_here)

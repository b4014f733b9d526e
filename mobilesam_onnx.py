"""MobileSAM's mask decoder on onnxruntime: the rearranged decoder (mask_decoder_fast) exported once, then cached.

Why: onnxruntime runs the same graph about twice as fast as torch on a small CPU (fused element-wise work,
its own matrix kernels; measured 86 against 183 ms CPU per prompt in one run). The export is written on the
first load to `<models_dir>/mobilesam_decoder_<checkpoint sha256[:12]>.onnx` (a new checkpoint gets its own
file; written under a temporary name and renamed, so a half-written file never sits under the final name).
Every load checks the session against torch on one prompt (logits within 1e-3): a damaged or stale file, a
failed export or a missing onnxruntime leaves the torch decoder in charge, with a log line saying why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

import mask_decoder_fast

log = logging.getLogger("mask_studio.mobilesam")

THREADS = 2  # a small CPU box: more threads than cores only adds contention
INPUTS = ("src", "pe", "k1", "v1", "q1", "sparse")
CHECK_TOLERANCE = 1e-3


class OnnxDecoder:
    """mask_decoder_fast.decode on an onnxruntime session: (Shared, sparse N×T×C) → (logits, iou) tensors."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # an arena keeps its peak (GBs after a batch of 64 prompts)
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, shared: mask_decoder_fast.Shared, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse)
        feed = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(INPUTS, tensors, strict=True)}
        logits, iou = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(iou)


class _Graph(torch.nn.Module):
    def __init__(self, decoder, side: int):
        super().__init__()
        self.decoder, self.side = decoder, side

    def forward(self, src, pe, k1, v1, q1, sparse):
        return mask_decoder_fast.decode(self.decoder, mask_decoder_fast.Shared(src, pe, k1, v1, q1, self.side), sparse)


def cached_path(models_dir: Path, checkpoint_sha256: str) -> Path:
    return Path(models_dir) / f"mobilesam_decoder_{checkpoint_sha256[:12]}.onnx"


def export(model, path: Path) -> None:
    """Write the decoder graph of `model` (a mobilesam_model.MobileSam) to `path` (batch and token axes free)."""
    import warnings

    emb_side = model._image_pe.shape[-1]
    features = torch.zeros(1, model._image_pe.shape[1], emb_side, emb_side)
    with torch.inference_mode():
        shared = mask_decoder_fast.share(model.net.mask_decoder, features, model._image_pe, model._dense)
    sparse = torch.zeros(2, 2, features.shape[1])
    args = (shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse)
    part = path.with_suffix(f".part{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            _Graph(model.net.mask_decoder, emb_side), args, str(part), dynamo=False, opset_version=17,
            input_names=list(INPUTS), output_names=["logits", "iou"],
            dynamic_axes={"sparse": {0: "n", 1: "t"}, "logits": {0: "n"}, "iou": {0: "n"}},
        )  # fmt: skip
    os.replace(part, path)


def attach(model, models_dir: Path, checkpoint_sha256: str) -> bool:
    """Give `model` the onnxruntime decoder (exporting it once); False, with a log line, when torch stays."""
    path = cached_path(models_dir, checkpoint_sha256)
    try:
        if not path.is_file():
            log.info("Exporting the MobileSAM decoder for onnxruntime to %s (once) ...", path)
            export(model, path)
        decoder = OnnxDecoder(path)
        _check(model, decoder)
    except Exception as exc:  # noqa: BLE001 - any failure here only means: keep the torch decoder
        log.warning("MobileSAM runs its decoder in torch: the onnxruntime decoder (%s) is unusable: %s", path, exc)
        return False
    model.onnx_decoder = decoder
    return True


def _check(model, decoder: OnnxDecoder) -> None:
    """The session must give torch's answer on one prompt over a random embedding."""
    generator = torch.Generator().manual_seed(0)
    side = model._image_pe.shape[-1]
    features = torch.randn(1, model._image_pe.shape[1], side, side, generator=generator)
    with torch.inference_mode():
        shared = mask_decoder_fast.share(model.net.mask_decoder, features, model._image_pe, model._dense)
        sparse = model.net.prompt_encoder(torch.tensor([[[300.0, 500.0]]]), torch.tensor([[1]]), None)
        expected, _ = mask_decoder_fast.decode(model.net.mask_decoder, shared, sparse)
    got, _ = decoder(shared, sparse)
    diff = float((got - expected).abs().max())
    if not diff < CHECK_TOLERANCE:
        raise ValueError(f"its logits differ from torch's by {diff:.2g}")

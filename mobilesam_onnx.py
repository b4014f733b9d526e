"""MobileSAM's image encoder and mask decoder on onnxruntime: each exported once per checkpoint, then cached.

Why: onnxruntime runs the same graphs about twice as fast as torch on a small CPU (fused element-wise work,
its own matrix kernels; measured 86 against 183 ms CPU per prompt for the decoder, 2.9 against 5.7 s CPU for
the encoder at 1024² in one run). Each export is written on the first load to
`<models_dir>/mobilesam_encoder_<checkpoint sha256[:12]>.onnx` and `mobilesam_decoder_<sha256[:12]>_<GRAPH_VERSION>
.onnx` (a new checkpoint, or a changed decoder graph, gets its own file; written under a temporary name and
renamed, so a half-written file never sits under the final name). A file is checked against torch on one
input (the decoder's logits within 1e-3, the encoder's features within 1e-3) the first time it is loaded, and
again whenever its bytes, onnxruntime or torch changed (`<file>.checked` records what was checked: later starts
skip the torch run, seconds saved): a damaged or stale file, a failed export or a missing onnxruntime leaves
that part in torch, with a log line saying why. The decoder is the rearranged one (mask_decoder_fast).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import mask_decoder_fast
from mobilesam_model import IMAGE_SIZE

log = logging.getLogger("mask_studio.mobilesam")

THREADS = 2  # a small CPU box: more threads than cores only adds contention
INPUTS = ("src", "pe", "k1", "v1", "q1", "sparse")
CHECK_TOLERANCE = 1e-3
GRAPH_VERSION = "g2"  # in the decoder's file name: a changed mask_decoder_fast gets exported afresh


def _session(path: Path, *, arena: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # An arena keeps its peak. The encoder's is bounded (always one 1024² input) and saves time (an encoding
    # 1.3 → 1.0 s); the decoder's is not (GBs after one batch of 64 prompts), for ~5 % per prompt: off.
    options.enable_cpu_mem_arena = arena
    # Idle worker threads sleep instead of spinning: a click alternates torch and onnxruntime work, and threads of
    # one spinning on 2 cores starve the other's (measured: a click 243 → 96 ms, an encoding 6.3 → 2.9 s, with
    # OMP_WAIT_POLICY=PASSIVE for torch's threads, set in mobilesam_model).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxDecoder:
    """mask_decoder_fast.decode on an onnxruntime session: (Shared, sparse N×T×C) → (logits, iou) tensors."""

    def __init__(self, path: Path):
        self.path = path
        self.session = _session(path)

    def __call__(self, shared: mask_decoder_fast.Shared, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse)
        feed = {name: np.ascontiguousarray(t.numpy()) for name, t in zip(INPUTS, tensors, strict=True)}
        logits, iou = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(iou)


class OnnxEncoder:
    """The image encoder on an onnxruntime session: normalised, padded pixels 1×3×1024² → features 1×256×64²."""

    def __init__(self, path: Path):
        self.path = path
        self.session = _session(path, arena=True)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"pixels": np.ascontiguousarray(pixels.numpy())})
        return torch.from_numpy(features)


class _Graph(torch.nn.Module):
    def __init__(self, decoder, side: int):
        super().__init__()
        self.decoder, self.side = decoder, side

    def forward(self, src, pe, k1, v1, q1, sparse):
        return mask_decoder_fast.decode(self.decoder, mask_decoder_fast.Shared(src, pe, k1, v1, q1, self.side), sparse)


def cached_path(models_dir: Path, checkpoint_sha256: str) -> Path:
    """Where the decoder's export for this checkpoint is kept."""
    return Path(models_dir) / f"mobilesam_decoder_{checkpoint_sha256[:12]}_{GRAPH_VERSION}.onnx"


def encoder_path(models_dir: Path, checkpoint_sha256: str) -> Path:
    """Where the image encoder's export for this checkpoint is kept."""
    return Path(models_dir) / f"mobilesam_encoder_{checkpoint_sha256[:12]}.onnx"


def _write(path: Path, module: torch.nn.Module, args: tuple, **names) -> None:
    """torch.onnx.export under a temporary name, then renamed into place."""
    part = path.with_suffix(f".part{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(module, args, str(part), dynamo=False, opset_version=17, **names)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def export(model, path: Path) -> None:
    """Write the decoder graph of `model` (a mobilesam_model.MobileSam) to `path` (batch and token axes free)."""
    emb_side = model._image_pe.shape[-1]
    features = torch.zeros(1, model._image_pe.shape[1], emb_side, emb_side)
    with torch.inference_mode():
        shared = mask_decoder_fast.share(model.net.mask_decoder, features, model._image_pe, model._dense)
    sparse = torch.zeros(2, 2, features.shape[1])
    args = (shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse)
    _write(
        path, _Graph(model.net.mask_decoder, emb_side), args,
        input_names=list(INPUTS), output_names=["logits", "iou"],
        dynamic_axes={"sparse": {0: "n", 1: "t"}, "logits": {0: "n"}, "iou": {0: "n"}},
    )  # fmt: skip


def export_encoder(model, path: Path) -> None:
    """Write the image encoder of `model` to `path` (fixed 1×3×1024² input, as the model always feeds it)."""
    pixels = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    _write(path, model.net.image_encoder, (pixels,), input_names=["pixels"], output_names=["features"])


def attach(model, models_dir: Path, checkpoint_sha256: str) -> bool:
    """Give `model` the onnxruntime decoder (exporting it once); False, with a log line, when torch stays."""
    path = cached_path(models_dir, checkpoint_sha256)
    decoder = _load("decoder", path, export, OnnxDecoder, _check, model)
    if decoder is None:
        return False
    model.onnx_decoder = decoder
    _prune_older_graphs(path, checkpoint_sha256)
    return True


def _prune_older_graphs(current: Path, checkpoint_sha256: str) -> None:
    """Delete this checkpoint's decoder exports of earlier graph versions (and their check records): a changed
    mask_decoder_fast writes a new file, and the old one would stay in models/ for good."""
    for old in current.parent.glob(f"mobilesam_decoder_{checkpoint_sha256[:12]}*.onnx*"):
        if old.name not in (current.name, current.name + ".checked"):
            try:
                old.unlink()
                log.info("Removed %s: an export of an earlier decoder graph", old)
            except OSError as exc:  # read-only folder, or gone meanwhile: harmless
                log.debug("Could not remove %s: %s", old, exc)


def attach_encoder(model, models_dir: Path, checkpoint_sha256: str) -> bool:
    """Give `model` the onnxruntime image encoder (exporting it once); False, with a log line, when torch stays."""
    path = encoder_path(models_dir, checkpoint_sha256)
    encoder = _load("image encoder", path, export_encoder, OnnxEncoder, _check_encoder, model)
    if encoder is None:
        return False
    model.onnx_encoder = encoder
    return True


def _load(part: str, path: Path, write: Callable, session: Callable, check: Callable, model):
    """The checked session for one part of the model, exporting it first when its file is missing; None (and a
    log line) when anything fails."""
    try:
        if not path.is_file():
            log.info("Exporting the MobileSAM %s for onnxruntime to %s (once) ...", part, path)
            write(model, path)
        loaded = session(path)
        record, fingerprint = path.with_name(path.name + ".checked"), _fingerprint(path)
        if not (record.is_file() and record.read_text() == fingerprint):
            check(model, loaded)
            record.write_text(fingerprint)
    except Exception as exc:  # noqa: BLE001 - any failure here only means: keep torch for this part
        log.warning("MobileSAM runs its %s in torch: the onnxruntime one (%s) is unusable: %s", part, path, exc)
        return None
    return loaded


def _fingerprint(path: Path) -> str:
    """What a check of this file vouches for: its bytes, and the runtimes that ran it."""
    import hashlib

    import onnxruntime

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"sha256 {digest}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}\n"


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
    _compare("logits", got, expected)


def _check_encoder(model, encoder: OnnxEncoder) -> None:
    """The session must give torch's features for one input (random pixels, so every weight takes part)."""
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.net.image_encoder(pixels)
    _compare("features", encoder(pixels), expected)


def _compare(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.shape != expected.shape:
        raise ValueError(f"its {what} have shape {tuple(got.shape)}, torch's {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not diff < CHECK_TOLERANCE:
        raise ValueError(f"its {what} differ from torch's by {diff:.2g}")

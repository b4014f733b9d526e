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
that part in torch, with a log line saying why. The decoder is the rearranged one (mask_decoder_fast). It is
exported twice: as one graph (clicks, and SAM's standard generator in the benchmark), and in two stages for the
automatic pass (`…_<GRAPH_VERSION>.prompt.onnx`: predicted IoUs and lattice logits; `….masks.onnx`: the
upscaling, run only for prompts that may give a new mask; 1.8 s of export for both, 16 MB more on disk). When
the staged pair is unusable the pass decodes in one stage.
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
        logits, iou = self.session.run(None, _feed(shared, sparse))
        return torch.from_numpy(logits), torch.from_numpy(iou)


class OnnxStaged:
    """mask_decoder_fast's two stages on two sessions: `prompt` (Shared, sparse N×T×C → keys, mask weights,
    predicted IoU N×4, lattice logits N×4×64²) and `masks` (keys, weights N×M×32 → logits N×M×256²)."""

    def __init__(self, path: Path):
        self.path = path
        self.prompt_session = _session(path)
        self.masks_session = _session(masks_path(path))

    def prompt(self, shared: mask_decoder_fast.Shared, sparse: torch.Tensor) -> list[np.ndarray]:
        return self.prompt_session.run(None, _feed(shared, sparse))

    def masks(self, keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
        feed = {"keys": keys, "weights": np.ascontiguousarray(weights)}
        (logits,) = self.masks_session.run(None, feed)
        return logits


class OnnxEncoder:
    """The image encoder on an onnxruntime session: normalised, padded pixels 1×3×1024² → features 1×256×64²."""

    def __init__(self, path: Path):
        self.path = path
        self.session = _session(path, arena=True)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        (features,) = self.session.run(None, {"pixels": np.ascontiguousarray(pixels.numpy())})
        return torch.from_numpy(features)


def _feed(shared: mask_decoder_fast.Shared, sparse: torch.Tensor) -> dict[str, np.ndarray]:
    tensors = (shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse)
    return {name: np.ascontiguousarray(t.numpy()) for name, t in zip(INPUTS, tensors, strict=True)}


class _Graph(torch.nn.Module):
    def __init__(self, decoder, side: int):
        super().__init__()
        self.decoder, self.side = decoder, side

    def forward(self, src, pe, k1, v1, q1, sparse):
        return mask_decoder_fast.decode(self.decoder, mask_decoder_fast.Shared(src, pe, k1, v1, q1, self.side), sparse)


class _Prompt(_Graph):
    def forward(self, src, pe, k1, v1, q1, sparse):
        shared = mask_decoder_fast.Shared(src, pe, k1, v1, q1, self.side)
        keys, weights, iou = mask_decoder_fast.transform(self.decoder, shared, sparse)
        return keys, weights, iou, mask_decoder_fast.lattice(self.decoder, keys, weights, self.side)


class _Masks(_Graph):
    def forward(self, keys, weights):
        return mask_decoder_fast.upscale(self.decoder, keys, weights, self.side)


def cached_path(models_dir: Path, checkpoint_sha256: str) -> Path:
    """Where the decoder's export for this checkpoint is kept."""
    return Path(models_dir) / f"mobilesam_decoder_{checkpoint_sha256[:12]}_{GRAPH_VERSION}.onnx"


def staged_path(models_dir: Path, checkpoint_sha256: str) -> Path:
    """Where the staged decoder's first graph is kept (its second: masks_path of it)."""
    return cached_path(models_dir, checkpoint_sha256).with_suffix(".prompt.onnx")


def masks_path(staged: Path) -> Path:
    return staged.with_name(staged.name.replace(".prompt.onnx", ".masks.onnx"))


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


def _example(model) -> tuple:
    """Inputs of the decoder graphs to export with: a zero image, two prompts of two tokens."""
    emb_side = model._image_pe.shape[-1]
    features = torch.zeros(1, model._image_pe.shape[1], emb_side, emb_side)
    with torch.inference_mode():
        shared = mask_decoder_fast.share(model.net.mask_decoder, features, model._image_pe, model._dense)
    sparse = torch.zeros(2, 2, features.shape[1])
    return shared.src, shared.pe, shared.k1, shared.v1, shared.q1, sparse


def export(model, path: Path) -> None:
    """Write the decoder graph of `model` (a mobilesam_model.MobileSam) to `path` (batch and token axes free)."""
    emb_side = model._image_pe.shape[-1]
    args = _example(model)
    _write(
        path, _Graph(model.net.mask_decoder, emb_side), args,
        input_names=list(INPUTS), output_names=["logits", "iou"],
        dynamic_axes={"sparse": {0: "n", 1: "t"}, "logits": {0: "n"}, "iou": {0: "n"}},
    )  # fmt: skip


def export_staged(model, path: Path) -> None:
    """Write the staged decoder's two graphs: `path` (the prompt stage) and masks_path(path) (the upscaling)."""
    decoder, emb_side = model.net.mask_decoder, model._image_pe.shape[-1]
    args = _example(model)
    src, pe, k1, v1, q1, sparse = args
    n = {0: "n"}
    _write(
        path, _Prompt(decoder, emb_side), args, input_names=list(INPUTS),
        output_names=["keys", "weights", "iou", "lattice"],
        dynamic_axes={"sparse": {0: "n", 1: "t"}, "keys": n, "weights": n, "iou": n, "lattice": n},
    )  # fmt: skip
    with torch.inference_mode():
        shared = mask_decoder_fast.Shared(src, pe, k1, v1, q1, emb_side)
        keys, weights, _ = mask_decoder_fast.transform(decoder, shared, sparse)
    _write(
        masks_path(path), _Masks(decoder, emb_side), (keys, weights), input_names=["keys", "weights"],
        output_names=["logits"], dynamic_axes={"keys": n, "weights": {0: "n", 1: "m"}, "logits": {0: "n", 1: "m"}},
    )  # fmt: skip


def export_encoder(model, path: Path) -> None:
    """Write the image encoder of `model` to `path` (fixed 1×3×1024² input, as the model always feeds it)."""
    pixels = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    _write(path, model.net.image_encoder, (pixels,), input_names=["pixels"], output_names=["features"])


def attach(model, models_dir: Path, checkpoint_sha256: str) -> bool:
    """Give `model` the onnxruntime decoder (exporting it once); False, with a log line, when torch stays."""
    path = cached_path(models_dir, checkpoint_sha256)
    decoder = _load("decoder", (path,), export, OnnxDecoder, _check, model)
    if decoder is None:
        return False
    model.onnx_decoder = decoder
    first = staged_path(models_dir, checkpoint_sha256)
    staged = (first, masks_path(first))
    one_stage = "MobileSAM's automatic pass decodes each prompt in one stage"
    model.onnx_staged = _load("staged decoder", staged, export_staged, OnnxStaged, _check_staged, model, one_stage)
    _prune_older_graphs((path, *staged), checkpoint_sha256)
    return True


def _prune_older_graphs(current: tuple[Path, ...], checkpoint_sha256: str) -> None:
    """Delete this checkpoint's decoder exports of earlier graph versions (and their check records): a changed
    mask_decoder_fast writes new files, and the old ones would stay in models/ for good."""
    keep = {p.name for p in current} | {p.name + ".checked" for p in current}
    for old in current[0].parent.glob(f"mobilesam_decoder_{checkpoint_sha256[:12]}*.onnx*"):
        if old.name not in keep:
            try:
                old.unlink()
                log.info("Removed %s: an export of an earlier decoder graph", old)
            except OSError as exc:  # read-only folder, or gone meanwhile: harmless
                log.debug("Could not remove %s: %s", old, exc)


def attach_encoder(model, models_dir: Path, checkpoint_sha256: str) -> bool:
    """Give `model` the onnxruntime image encoder (exporting it once); False, with a log line, when torch stays."""
    path = encoder_path(models_dir, checkpoint_sha256)
    encoder = _load("image encoder", (path,), export_encoder, OnnxEncoder, _check_encoder, model)
    if encoder is None:
        return False
    model.onnx_encoder = encoder
    return True


def _load(
    part: str, paths: tuple[Path, ...], write: Callable, session: Callable, check: Callable, model, instead: str = ""
):
    """The checked session for one part of the model (its graph files: `paths`, the first named after it),
    exporting it first when a file is missing; None (and a log line saying what runs `instead`: by default,
    torch) when anything fails."""
    path = paths[0]
    try:
        if not all(p.is_file() for p in paths):
            log.info("Exporting the MobileSAM %s for onnxruntime to %s (once) ...", part, path)
            write(model, path)
        loaded = session(path)
        record, fingerprint = path.with_name(path.name + ".checked"), _fingerprint(paths)
        if not (record.is_file() and record.read_text() == fingerprint):
            check(model, loaded)
            record.write_text(fingerprint)
    except Exception as exc:  # noqa: BLE001 - any failure here only means: keep torch for this part
        instead = instead or f"MobileSAM runs its {part} in torch"
        log.warning("%s: the onnxruntime %s (%s) is unusable: %s", instead, part, path, exc)
        return None
    return loaded


def _fingerprint(paths: tuple[Path, ...]) -> str:
    """What a check of these files vouches for: their bytes, and the runtimes that ran them."""
    import hashlib

    import onnxruntime

    digest = " ".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)
    return f"sha256 {digest}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}\n"


def _random_prompt(model) -> tuple[mask_decoder_fast.Shared, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    side = model._image_pe.shape[-1]
    features = torch.randn(1, model._image_pe.shape[1], side, side, generator=generator)
    with torch.inference_mode():
        shared = mask_decoder_fast.share(model.net.mask_decoder, features, model._image_pe, model._dense)
        sparse = model.net.prompt_encoder(torch.tensor([[[300.0, 500.0]]]), torch.tensor([[1]]), None)
    return shared, sparse


def _check(model, decoder: OnnxDecoder) -> None:
    """The session must give torch's answer on one prompt over a random embedding."""
    shared, sparse = _random_prompt(model)
    with torch.inference_mode():
        expected, _ = mask_decoder_fast.decode(model.net.mask_decoder, shared, sparse)
    got, _ = decoder(shared, sparse)
    _compare("logits", got, expected)


def _check_staged(model, staged: OnnxStaged) -> None:
    """Both stages must give torch's answers (IoUs, lattice, logits) on one prompt over a random embedding."""
    shared, sparse = _random_prompt(model)
    decoder = model.net.mask_decoder
    with torch.inference_mode():
        keys, weights, iou = mask_decoder_fast.transform(decoder, shared, sparse)
        lattice = mask_decoder_fast.lattice(decoder, keys, weights, shared.side)
        logits = mask_decoder_fast.upscale(decoder, keys, weights, shared.side)
    got_keys, got_weights, got_iou, got_lattice = staged.prompt(shared, sparse)
    _compare("predicted IoUs", torch.from_numpy(got_iou), iou)
    _compare("lattice logits", torch.from_numpy(got_lattice), lattice)
    _compare("logits", torch.from_numpy(staged.masks(got_keys, got_weights)), logits)


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

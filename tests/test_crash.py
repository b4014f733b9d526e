"""Crash safety: the real app as a subprocess (`python app.py`), killed with SIGKILL in the middle of an
ingest and of a delete, then restarted: no half-stored image, no orphaned blob, everything committed
still listed and usable, PRAGMA integrity_check = ok."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status

import masks as rle
from app_server import free_port
from helpers import encode, make_photo

ROOT = Path(__file__).resolve().parent.parent


class AppProcess:
    """`python app.py` on a loopback port with its own data folder; restartable, killable."""

    def __init__(self, data_dir: Path, work: Path):
        self.data_dir, self.work = data_dir, work
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Client:
        port = free_port()
        env = {
            **os.environ,
            "DATA_DIR": str(self.data_dir),
            "PORT": str(port),
            "SEGMENTER": "builtin",  # what is tested is the storage under a kill, not an engine
            "HOST": "127.0.0.1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "GRADIO_TEMP_DIR": str(self.work / "gradio"),
        }
        log = open(self.work / "app.log", "ab")
        # cwd is a scratch folder: a developer's .env must not change what is tested.
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited: {(self.work / 'app.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url, timeout=1).status_code == 200:
                    return Client(self.url, verbose=False)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail("the app did not start within 60 s")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def blobs(data_dir: Path) -> set[str]:
    root = data_dir / "blobs"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def db_state(data_dir: Path) -> dict:
    """Every stored image with its blob key, after checking the database is whole and consistent."""
    conn = sqlite3.connect(data_dir / "mask_studio.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, blob_key, mask_count, width, height FROM images").fetchall()
        for image_id, _, mask_count, w, h in rows:
            masks = conn.execute("SELECT counts, area FROM masks WHERE image_id = ?", (image_id,)).fetchall()
            assert len(masks) == mask_count, f"{image_id}: half-stored ({len(masks)} of {mask_count} masks)"
            for counts, area in masks:
                assert int(rle.decode({"size": [h, w], "counts": counts}).sum()) == area
        assert (
            conn.execute("SELECT count(*) FROM masks WHERE image_id NOT IN (SELECT id FROM images)").fetchone()[0] == 0
        )
        return {image_id: key for image_id, key, *_ in rows}
    finally:
        conn.close()


def assert_consistent(data_dir: Path) -> dict:
    """After a restart: every image has its blob and every blob has its image."""
    state = db_state(data_dir)
    assert blobs(data_dir) == set(state.values())
    return state


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_sigkill_during_ingest_and_delete_leaves_a_consistent_library(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    small, big = work / "small.png", work / "big.png"
    small.write_bytes(encode(make_photo(48, 64)))
    big.write_bytes(encode(make_photo(1536, 1536, seed=3)))  # the built-in segmenter needs a while for it
    app = AppProcess(data, work)
    try:
        # 1. Two committed images; then an ingest killed while it is being segmented.
        c = app.start()
        for image_id in ("keep", "doomed"):
            c.predict(handle_file(str(small)), image_id, api_name="/generate_and_store_masks")
        committed = blobs(data)
        job = c.submit(handle_file(str(big)), "big-1", api_name="/generate_and_store_masks")
        wait_for(lambda: job.status().code == Status.PROCESSING, "the ingest to start")
        app.kill()
        assert blobs(data) == committed  # killed before anything of big-1 was written

        c = app.start()
        assert set(assert_consistent(data)) == {"keep", "doomed"}
        assert {i["image_id"] for i in c.predict(api_name="/list_images")} == {"keep", "doomed"}

        # 2. An ingest killed the moment its image blob lands, before (or just as) its rows commit.
        c.submit(handle_file(str(big)), "big-2", api_name="/generate_and_store_masks")
        wait_for(lambda: len(blobs(data) - committed) > 0, "the new blob")
        app.kill()
        half = blobs(data) - committed  # a temp file, a blob without its rows, or a committed image
        outcomes = {"ingest": "killed during the blob write" if all(".tmp-" in k for k in half) else "blob written"}

        # 3. A delete killed the moment its row is gone, before (or just as) its blob is removed.
        c = app.start()
        state = assert_consistent(data)
        assert {"keep", "doomed"} <= set(state) <= {"keep", "doomed", "big-2"}
        if outcomes["ingest"] == "blob written":
            outcomes["ingest"] += ", rows committed" if "big-2" in state else ", rows not committed"
        doomed_blob = state["doomed"]
        if "big-2" not in state:
            assert not half & blobs(data), "the orphaned blob was not cleaned up at start"
        conn = sqlite3.connect(data / "mask_studio.db")
        c.submit("doomed", api_name="/delete_image")
        wait_for(lambda: not conn.execute("SELECT 1 FROM images WHERE id = 'doomed'").fetchone(), "the delete")
        app.kill()
        conn.close()
        outcomes["delete"] = "row gone, blob left" if doomed_blob in blobs(data) else "row and blob gone"
        print("interrupted at:", outcomes)

        # What a kill at the other points leaves, made exactly: a blob whose rows never committed,
        # and a blob write cut short (temp file).
        (data / "blobs" / "images" / "never-committed-abcd1234.png").write_bytes(small.read_bytes())
        (data / "blobs" / "images" / ".tmp-cut-short").write_bytes(b"\x89PNG half")

        # 4. Restart: only committed images remain, whole, and they still work.
        c = app.start()
        state = assert_consistent(data)
        assert "doomed" not in state and "keep" in state
        listed = {i["image_id"] for i in c.predict(api_name="/list_images")}
        assert listed == set(state)
        assert c.predict("keep", api_name="/image_info")["mask_count"] >= 1
        assert c.predict("keep", [{"mask_id": 0, "color": "#ff0000"}], "original", api_name="/render_masks")
    finally:
        app.stop()

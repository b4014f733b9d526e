"""How the page's events are wired, as Gradio's frontend reads it (demo.config), for what a person feels."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import app
    from settings import Settings

    studio = app.create_studio(Settings(data_dir=tmp_path_factory.mktemp("wiring"), segmenter="builtin"))
    try:
        yield app.build_demo(studio.settings, studio)
    finally:
        studio.segmenter.close()


def _ids(demo, *elem_ids: str) -> set[int]:
    return {block._id for block in demo.blocks.values() if getattr(block, "elem_id", None) in elem_ids}


def test_no_event_reports_progress_on_a_gallery(demo):
    """Gradio's page copies every component that was ever an event's progress target (by default: its outputs)
    at each status message of every later event. A gallery of 128 thumbnails made each click on the picture
    ~90 ms slower in Chromium (bench_click): so no event may name a gallery as where its progress shows."""
    galleries = _ids(demo, "gallery", "library_gallery")
    assert len(galleries) == 2
    for dep in demo.config["dependencies"]:
        targets = dep["show_progress_on"] or dep["outputs"]
        assert not galleries & set(targets), (dep["id"], dep.get("api_name"), dep["outputs"])

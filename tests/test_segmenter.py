"""The engine factory (SEGMENTER) and the interface every engine declares."""

from __future__ import annotations

import logging

import pytest

from builtin_segmenter import BuiltinSegmenter
from errors import InvalidInput
from sam2_client import HttpSegmenter
from sam2_server import SamServer
from segmenter import AUTO_MODELS, ENGINES, Segmenter, make_segmenter
from settings import SEGMENTER_CHOICES, Settings

# A checkpoint that is not there: MobileSAM cannot load it, whatever else is installed.
NO_CHECKPOINT = "no-such-dir/mobile_sam.pt"


def test_every_choice_has_an_engine_and_auto_tries_only_known_models():
    assert set(ENGINES) | {"auto"} == set(SEGMENTER_CHOICES)
    assert set(AUTO_MODELS) <= set(ENGINES) - {"builtin", "service"}


@pytest.mark.parametrize("changes", [{}, {"segmenter": "service"}])
def test_the_service_client_when_a_url_is_set(changes):
    with SamServer() as server:
        seg, reason = make_segmenter(Settings(sam_api_url=server.url, **changes))
        try:
            assert isinstance(seg, HttpSegmenter) and reason is None
            assert isinstance(seg, Segmenter)
        finally:
            seg.close()


def test_builtin_when_asked_even_with_a_service_configured():
    seg, reason = make_segmenter(Settings(segmenter="builtin", sam_api_url="http://127.0.0.1:9", max_masks=7))
    assert isinstance(seg, BuiltinSegmenter) and reason is None and seg.max_masks == 7
    assert isinstance(seg, Segmenter)


def test_service_without_a_url_is_a_configuration_error():
    with pytest.raises(InvalidInput) as info:
        make_segmenter(Settings(segmenter="service"))
    assert info.value.title == "Configuration error"
    assert info.value.message == (
        "SEGMENTER=service needs SAM_API_URL: set it to the SAM2 service's address, "
        "or choose SEGMENTER=auto to run without a service."
    )


@pytest.mark.parametrize("choice, level", [("auto", logging.INFO), ("mobilesam", logging.WARNING)])
def test_mobilesam_that_cannot_load_falls_back_to_builtin_and_says_why(tmp_path, caplog, choice, level):
    settings = Settings(
        segmenter=choice, mobilesam_checkpoint=tmp_path / NO_CHECKPOINT, models_folder=tmp_path, max_masks=5
    )
    with caplog.at_level(logging.INFO, logger="mask_studio.segmenter"):
        seg, reason = make_segmenter(settings)
    assert isinstance(seg, BuiltinSegmenter) and seg.max_masks == 5
    assert reason is not None and reason.startswith("MobileSAM not used: ")
    assert reason.endswith(". Using the built-in classical segmenter instead.")
    assert [(r.levelno, reason in r.getMessage()) for r in caplog.records] == [(level, True)]


def test_a_bad_service_url_is_not_hidden_by_a_fallback():
    with pytest.raises(InvalidInput, match="must be an http:// or https:// address"):
        make_segmenter(Settings(sam_api_url="ftp://sam2.example/x"))


def test_sam2_without_a_model_id_falls_back_and_says_what_to_set():
    seg, reason = make_segmenter(Settings(segmenter="sam2"))
    assert isinstance(seg, BuiltinSegmenter)
    assert reason == (
        "SAM2 not used: SAM2_MODEL is not set (e.g. facebook/sam2.1-hiera-tiny). "
        "Using the built-in classical segmenter instead."
    )


def test_auto_tries_sam2_first_when_a_model_is_named_then_mobilesam(tmp_path):
    """Here the Hub is out of reach (HF_HUB_OFFLINE) and the MobileSAM checkpoint missing: both reasons are given."""
    settings = Settings(
        sam2_model="facebook/sam2.1-hiera-tiny",
        mobilesam_checkpoint=tmp_path / NO_CHECKPOINT,
        models_folder=tmp_path,
    )
    seg, reason = make_segmenter(settings)
    assert isinstance(seg, BuiltinSegmenter)
    assert reason is not None and reason.startswith("SAM2 not used: ") and "; MobileSAM not used: " in reason


def test_sam2_settings_from_the_environment():
    settings = Settings.from_env({"SAM2_MODEL": "facebook/sam2.1-hiera-small", "SAM2_DEVICE": "cpu"}, None)
    assert (settings.sam2_model, settings.sam2_device) == ("facebook/sam2.1-hiera-small", "cpu")
    with pytest.raises(InvalidInput, match="SAM2_DEVICE"):
        Settings.from_env({"SAM2_DEVICE": "tpu"}, None)

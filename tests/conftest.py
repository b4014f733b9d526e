"""Shared test set-up: the repo on sys.path, Gradio quiet and offline, its cache in a temp folder."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Gradio reads these at import time: set them before any test module imports it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="mask-studio-gradio-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

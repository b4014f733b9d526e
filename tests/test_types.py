"""The app's modules type-check (mypy, settings in pyproject.toml [tool.mypy]); tests and benchmarks aside."""

import subprocess
import sys

from conftest import ROOT


def test_mypy_passes_on_every_module():
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert "app.py" in modules and "studio.py" in modules, modules  # the glob found the app, not an empty list
    out = subprocess.run(
        [sys.executable, "-m", "mypy", *modules], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr

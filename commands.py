"""`python app.py`'s command line: its arguments, the settings it starts with, and the commands that need no web app.

`python app.py import-legacy PATH` runs here before app.py imports the web framework (gradio alone takes ~6 s to
import on a small machine): the import starts in about a second.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import legacy_import
from access import LOCAL_OWNER
from errors import MaskStudioError
from settings import Settings

IMPORT_LEGACY = "import-legacy"


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """`python app.py` serves the app; `python app.py import-legacy PATH [--owner NAME]` imports old data."""
    parser = argparse.ArgumentParser(prog="python app.py", description="Mask Studio: serve the app (no command).")
    commands = parser.add_subparsers(dest="command")
    old = commands.add_parser(
        IMPORT_LEGACY,
        help="import the old backend's data.json (its JSON_DB_PATH) into this app's storage",
        description="Import every image of the old backend's data.json with its id, date and masks; "
        "ids already stored are skipped, so it can be run again.",
    )
    old.add_argument("path", help="the old backend's data.json")
    old.add_argument("--owner", help=f"the owner to store the images under (default: {LOCAL_OWNER!r})")
    return parser.parse_args(argv)


def is_command(argv: list[str]) -> bool:
    """Whether these arguments name a command that runs without the web app."""
    return argv[:1] == [IMPORT_LEGACY]


def start(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """Parse the arguments, set up logging, read the settings (.env from the folder it is started in, else the
    one next to app.py, as the README says). A configuration error ends the process with its message."""
    args = arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dotenv = Path(".env") if Path(".env").is_file() else Path(__file__).with_name(".env")
        settings = Settings.from_env(dotenv_path=dotenv)
    except MaskStudioError as exc:
        raise SystemExit(f"Configuration error: {exc.message}") from None
    return args, settings


def run(argv: list[str]) -> int:
    """Run the command these arguments name (`is_command`); its exit code."""
    args, settings = start(argv)
    return legacy_import.run_cli(args.path, args.owner, settings)

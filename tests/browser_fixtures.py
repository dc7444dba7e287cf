"""The real browser for viewer tests: Debian's chromium driven by Playwright (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Set to a folder (e.g. docs/images) to keep the viewer tests' screenshots there; else they stay in tmp.
SCREENSHOT_DIR_ENV = "ICHAL_SCREENSHOT_DIR"


def launch_chromium(playwright):
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is not installed: run scripts/install_system_deps.sh (the test command does)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def screenshot_path(name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get(SCREENSHOT_DIR_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name

"""Headless Chromium for the dashboard tests, launched the one way this project does it:
Debian's binary, no sandbox (root in CI), no GPU, and none of the background connections a
closed network refuses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["headless_chromium"]

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def headless_chromium(executable: str = "/usr/bin/chromium") -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield b
        finally:
            b.close()

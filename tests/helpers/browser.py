"""Headless Chromium for the dashboard tests, launched the one way this project does it:
Debian's binary, no sandbox (root in CI), no GPU, and none of the background connections a
closed network refuses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "SHOTS", "add_operator", "headless_chromium", "screenshot", "sign_in"]

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def headless_chromium(executable: str = CHROMIUM) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def add_operator(rx: object, user: str, password: str) -> None:
    """``edgepipe-cloud users add USER --password-stdin`` on a receiver's database
    (a :class:`cloud._local.LocalReceiver`)."""
    import subprocess

    from cloud._local import cli_command

    r = subprocess.run(
        cli_command("users", "--db", rx.db, "add", user, "--password-stdin"),  # type: ignore[attr-defined]
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def sign_in(page: object, url: str, user: str, password: str) -> None:
    """Through the login page, as an operator types it; ends on the fleet page."""
    p: Any = page
    p.goto(url + "/login")
    p.fill("input[name=username]", user)
    p.fill("input[name=password]", password)
    p.click("button[type=submit]")
    p.wait_for_url(url + "/")


def screenshot(target: Any, name: str) -> None:
    """With ``EDGEPIPE_SCREENSHOTS=1``: ``target`` (a page, whole; or one element) into
    docs/screenshots/NAME."""
    if os.environ.get("EDGEPIPE_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        full = {"full_page": True} if hasattr(target, "goto") else {}
        target.screenshot(path=str(SHOTS / name), **full)

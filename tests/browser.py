"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright.

Why Playwright (the Python package) and not Selenium: it drives a browser binary we name
(``executable_path``) over the DevTools protocol with no driver to match, and it sees every
request a page makes (``page.on("request")``), which is what "the page loads with no network
request" needs; Selenium would need Debian's chromium-driver pinned to the same version and has no
portable request log. Nothing is downloaded: ``playwright install`` is never run, the browser is
``/usr/bin/chromium`` from Debian (``./dev`` installs it when it runs as root), and the tests skip,
saying what to install, where it is missing.

One browser per test module (:func:`chromium`, a module-scoped fixture in the modules that use
it): a launch costs about a second, a page a few hundred milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("FHIR_LEUKO_CHROMIUM", "/usr/bin/chromium"))
OUT = Path(__file__).resolve().parent / "out"
"""Screenshots land here (git-ignored): look at them."""

# Flags that work on a machine with no network but the package registries: without the
# background-networking ones Chromium keeps trying to reach its update and sync services.
# Playwright adds --headless, --no-sandbox (chromium_sandbox=False) and a fresh --user-data-dir.
FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

MISSING = (
    "Debian's chromium is not installed at {path}: run ./dev test as root (it runs "
    "'apt-get install -y chromium'), or install it yourself (sudo apt-get install chromium)"
)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), or skip the test with what to install."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING.format(path=CHROMIUM))
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing: ./dev installs it"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, chromium_sandbox=False, args=FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Visit:
    """A page opened in a fresh context, with every request it made and its console errors."""

    page: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextmanager
def visit(browser: Any, url: str, *, width: int = 1200) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    seen = Visit(page)
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on("console", lambda msg: seen.errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
    try:
        page.goto(url, wait_until="load")
        yield seen
    finally:
        context.close()


def screenshot(page: Any, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    page.screenshot(path=str(path), full_page=True)
    return path

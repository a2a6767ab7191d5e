"""The web page in headless Chromium: upload the example, see overlay and legend, pick a segment.

Needs Playwright (``pip install playwright``) and a system Chromium (Debian: ``apt-get install
chromium``); Playwright's own browser download is never used. Skipped when either is missing.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .conftest import EXAMPLE

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")


def _chromium() -> str | None:
    candidates = [os.environ.get("SEGSCOPE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


@pytest.fixture()
def server_url(live_server: Callable[..., str]) -> str:
    return live_server(batch_size=1)


def test_page_segments_an_upload_and_highlights_a_clicked_segment(server_url: str, tmp_path: Path) -> None:
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set SEGSCOPE_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server_url + "/")
            page.wait_for_selector("#task option[value=panoptic]", state="attached")
            page.set_input_files("#file", str(EXAMPLE))
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            items = page.locator("#legend li")
            assert items.count() >= 4
            assert {"circle", "square"} <= {text.split(" #")[0] for text in items.all_inner_texts()}
            before = page.locator("#canvas").screenshot(path=str(tmp_path / "before.png"))

            # Click the canvas on a pixel of the first segment (found in the page's decoded masks).
            x, y = page.evaluate(
                """() => {
                    const canvas = document.getElementById("canvas"), box = canvas.getBoundingClientRect();
                    const p = state.map.indexOf(0), w = canvas.width;
                    return [box.left + ((p % w) + 0.5) * box.width / w,
                            box.top + (Math.floor(p / w) + 0.5) * box.height / canvas.height];
                }"""
            )
            page.mouse.click(x, y)
            page.mouse.move(0, 0)  # leave the canvas: what stays highlighted is the selection
            selected = page.locator("#legend li.selected")
            assert selected.count() == 1 and selected.get_attribute("data-index") == "0"
            assert "(selected)" in page.inner_text("#selection")
            after = page.locator("#canvas").screenshot()
            assert after != before
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
    print(f"screenshots in {tmp_path}")

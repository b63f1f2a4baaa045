"""The web UI in real headless Chromium against a real cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DC_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] /
                                "test-artifacts"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian's chromium is not installed (scripts/bootstrap test "
                              "installs it when run as root)"),
]


@pytest.fixture(scope="module")
def page(cluster: Cluster) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        page.goto(cluster.url + "/")
        yield page
        browser.close()


def test_generate_shows_images_with_their_seeds(page) -> None:
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.fill("#prompt", "a lighthouse")
    page.fill("#n", "2")
    page.fill("#seed", "7")
    page.fill("#size", "128x128")
    page.press("#prompt", "Control+Enter")
    page.wait_for_selector("figure img")
    images = page.locator("figure img")
    assert images.count() == 2
    assert page.locator("figcaption button").all_inner_texts() == ["seed 7", "seed 8"]
    sizes = page.evaluate(
        "[...document.querySelectorAll('figure img')].map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[128, 128], [128, 128]]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-generated.png"))


def test_a_bad_request_is_shown_in_words(page) -> None:
    page.fill("#prompt", "a lighthouse")
    page.fill("#size", "100x33")
    page.click("#go")
    status = page.locator("#status.error")
    status.wait_for()
    assert "multiples of 8" in status.inner_text()
    assert "(size)" in status.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-error.png"))

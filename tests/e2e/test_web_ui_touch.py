"""The full-size view under two fingers, in real headless Chromium on a phone-sized touch screen:
a pinch zooms about the point between the fingers, from the fitted size up to 4x the actual
pixels and back, while one finger still swipes and a tap still toggles 1:1. Touches go through
Chromium's own touch input (CDP), so the page sees the pointer events a phone would send.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Cluster
from tests.e2e.test_web_ui import PHONE, browser, open_page, pytestmark, shot
from tests.e2e.test_web_ui_layout import TOUCH, box, touch_drag

__all__ = ["browser", "pytestmark"]  # the browser fixture and the skip markers of test_web_ui

SIZE = 256  # each image's width and height: fitted at about 1.4x on a 390 px screen
MAX_ZOOM = 4  # as static/js/lightbox.js allows


@pytest.fixture
def phone(browser, cluster: Cluster) -> Iterator:
    page = open_page(browser, cluster.url, PHONE, **TOUCH)
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def pinch(page, centre: tuple[float, float], start: float, end: float, steps: int = 8) -> None:
    """Two fingers, side by side about ``centre``, from ``start`` px apart to ``end``; lifted
    one after the other, as a hand does."""
    cdp = page.context.new_cdp_session(page)
    x, y = centre

    def fingers(kind: str, apart: float, ids: tuple[int, ...] = (1, 2)) -> None:
        points = {1: {"x": x - apart / 2, "y": y, "id": 1},
                  2: {"x": x + apart / 2, "y": y, "id": 2}}
        cdp.send("Input.dispatchTouchEvent",
                 {"type": kind, "touchPoints": [points[i] for i in ids]})

    fingers("touchStart", start)
    for i in range(1, steps + 1):
        fingers("touchMove", start + (end - start) * i / steps)
    fingers("touchEnd", end, ids=(1,))  # the second finger lifts; the first is still down
    fingers("touchEnd", end, ids=())
    cdp.detach()


def image_point(found: dict, at: tuple[float, float]) -> tuple[float, float]:
    """Where ``at`` falls on the image, as fractions of its width and height."""
    return ((at[0] - found["x"]) / found["width"], (at[1] - found["y"]) / found["height"])


def open_two_images(page, cluster: Cluster) -> None:
    response = httpx.post(f"{cluster.url}/v1/images/generations", timeout=120, json={
        "prompt": "a tide pool to pinch", "model": "tiny", "size": f"{SIZE}x{SIZE}",
        "steps": 2, "n": 2, "seed": 21})
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    thumb = page.locator(f"#history-list .entry[data-id='{job_id}'] .entry-thumb").first
    thumb.scroll_into_view_if_needed()
    thumb.tap()
    page.wait_for_function(f"document.querySelector('#lightbox-image').naturalWidth === {SIZE}")
    page.wait_for_function("document.querySelector('#lightbox-image').complete")
    assert "1 of 2" in page.inner_text("#lightbox-caption")


def test_a_pinch_zooms_about_the_fingers_and_one_finger_still_swipes(phone,
                                                                     cluster: Cluster) -> None:
    page = phone
    open_two_images(page, cluster)
    fitted = box(page, "#lightbox-image")
    view = box(page, "#lightbox-view")
    assert fitted["width"] > SIZE  # a small image is fitted larger than its pixels
    # Its zoom button says "286%", longer than "1:1": the buttons still fit one row on the
    # screen, and the image is not pushed off centre.
    assert page.inner_text("#lightbox-zoom").endswith("%")
    dialog = box(page, "#lightbox")
    buttons = [b.bounding_box() for b in page.locator(".lightbox-actions > :visible").all()]
    assert max(b["y"] for b in buttons) - min(b["y"] for b in buttons) < 2, buttons
    assert min(b["x"] for b in buttons) >= dialog["x"]
    assert max(b["x"] + b["width"] for b in buttons) <= dialog["x"] + dialog["width"], buttons
    assert fitted["x"] - dialog["x"] == pytest.approx(
        dialog["x"] + dialog["width"] - fitted["x"] - fitted["width"], abs=2), (fitted, dialog)
    shot(page, "phone-lightbox-pinch-fitted")

    # Fingers apart 60 -> 150 px a little left of and above the middle: 2.5 times larger,
    # the point between them staying where it was.
    centre = (view["x"] + view["width"] * 0.4, view["y"] + view["height"] * 0.45)
    before = image_point(fitted, centre)
    pinch(page, centre, 60, 150)
    zoomed = box(page, "#lightbox-image")
    assert zoomed["width"] == pytest.approx(fitted["width"] * 2.5, rel=0.03)
    assert zoomed["height"] == pytest.approx(fitted["height"] * 2.5, rel=0.03)
    after = image_point(zoomed, centre)
    assert after == pytest.approx(before, abs=0.01), (before, after)
    assert box(page, "#lightbox-view") == pytest.approx(view, abs=1)  # the view keeps its size
    assert page.get_attribute("#lightbox-zoom", "aria-pressed") == "true"
    percent = round(zoomed["width"] / SIZE * 100)
    assert page.inner_text("#lightbox-caption").endswith(f" · {percent}%")
    assert page.evaluate("visualViewport.scale") == 1  # the page itself did not zoom
    assert "1 of 2" in page.inner_text("#lightbox-caption")  # a pinch is not a swipe
    shot(page, "phone-lightbox-pinched")

    pinch(page, centre, 40, 300)  # as far as it goes: 4 times the actual pixels
    assert box(page, "#lightbox-image")["width"] == pytest.approx(MAX_ZOOM * SIZE, abs=1)
    assert page.inner_text("#lightbox-caption").endswith(" · 400%")

    pinch(page, centre, 300, 20)  # closed past the fitted size: it fits again
    assert box(page, "#lightbox-image") == pytest.approx(fitted, abs=1)
    assert page.get_attribute("#lightbox-zoom", "aria-pressed") == "false"
    assert "%" not in page.inner_text("#lightbox-caption")

    # One finger: a swipe left brings the next image; a tap still zooms (twice the fitted size,
    # as this image is fitted larger than 1:1) and another fits it again.
    middle_y = view["y"] + view["height"] / 2
    touch_drag(page, (view["x"] + view["width"] - 40, middle_y), (view["x"] + 40, middle_y))
    assert "2 of 2" in page.inner_text("#lightbox-caption")
    page.wait_for_function("document.querySelector('#lightbox-image').complete")
    page.tap("#lightbox-view")
    assert box(page, "#lightbox-image")["width"] == pytest.approx(2 * fitted["width"], abs=2)
    page.tap("#lightbox-view")
    assert box(page, "#lightbox-image") == pytest.approx(fitted, abs=1)
    shot(page, "phone-lightbox-pinch-swiped")
    page.click("#lightbox-close")
    page.wait_for_function("!document.querySelector('#lightbox').open", timeout=5000)

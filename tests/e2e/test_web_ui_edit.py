"""The web UI's image edits in real headless Chromium against a real one-worker cluster: an
input image by the file button, a paste or a result's "Use as input"; a mask painted with the
mouse or a finger at the image's own pixels; the edit sent to /v1/jobs/edits and followed as a
run; a model that cannot edit; and an edit in the History, restored with its input and mask.
"""

from __future__ import annotations

import base64
import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.cluster import Cluster
from tests.e2e.test_web_ui import DESKTOP, PHONE, browser, open_page, pytestmark, shot
from tests.e2e.test_web_ui_layout import TOUCH, touch_drag
from tests.e2e.test_web_ui_runs import card, newest_id, wait_done

__all__ = ["browser", "pytestmark"]  # the browser fixture and the skip markers of test_web_ui

RUNS = "#runs .run"
LEFT, RIGHT = (200, 30, 30), (30, 60, 200)  # the halves of the test input
SIZE = (96, 64)


@pytest.fixture(scope="module")
def solo(solo_cluster: Cluster) -> Cluster:
    return solo_cluster


@pytest.fixture(scope="module")
def desk(browser, solo: Cluster) -> Iterator:
    page = open_page(browser, solo.url, DESKTOP)
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def halves(size: tuple[int, int] = SIZE) -> bytes:
    """A PNG whose left half is LEFT and right half RIGHT."""
    image = Image.new("RGB", size, RIGHT)
    image.paste(LEFT, (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def plain(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def choose_file(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#input-choose")
    chooser.value.set_files(str(path))
    page.wait_for_selector("#input-field:not([hidden])")


def paste_image(page, png: bytes, name: str = "pasted.png") -> None:
    """A paste of an image file, as a browser sends it for Ctrl+V of a copied image."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type: 'image/png' }));
        document.body.dispatchEvent(new ClipboardEvent('paste',
            { clipboardData: data, bubbles: true, cancelable: true }));
    }""", [base64.b64encode(png).decode(), name])


def wait_input(page, size: tuple[int, int]) -> None:
    page.wait_for_function(
        "([w, h]) => { const i = document.querySelector('#editor-image');"
        " return i.complete && i.naturalWidth === w && i.naturalHeight === h"
        " && document.querySelector('#mask-canvas').width === w; }", arg=list(size))


def record_posts(page) -> list[dict]:
    """Every POST the page sends from now (its URL). The parts of a multipart body are not
    shown to Playwright when they are files: the page's fetch notes their names instead."""
    posts: list[dict] = []

    def seen(request) -> None:
        if request.method == "POST":
            posts.append({"url": request.url})

    page.on("request", seen)
    page.evaluate("""() => {
        window.sentParts = [];
        if (window.fetchNoted) return;
        window.fetchNoted = true;
        const fetched = window.fetch;
        window.fetch = (url, options) => {
            if (options?.body instanceof FormData) window.sentParts.push([...options.body.keys()]);
            return fetched(url, options);
        };
    }""")
    return posts


def sent_parts(page) -> list[list[str]]:
    return page.evaluate("window.sentParts")


def generate(page, prompt: str, steps: int = 4) -> str:
    """Press Generate with this prompt; the id of the run's job once it finished."""
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#n", "1")
    count = page.locator(RUNS).count()
    page.click("#go")
    job_id = newest_id(page, count)
    assert wait_done(page, job_id).startswith("1 image"), card(page, job_id).inner_text()
    page.wait_for_function(
        f"document.querySelector(\"{RUNS}[data-id='{job_id}'] .result img\")?.complete")
    return job_id


def result_pixels(page, job_id: str, points: list[tuple[int, int]]) -> dict:
    """The result's natural size and its RGB at each point, read through a canvas."""
    return page.evaluate("""([selector, points]) => {
        const img = document.querySelector(selector);
        const canvas = Object.assign(document.createElement('canvas'),
                                     { width: img.naturalWidth, height: img.naturalHeight });
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        return { width: img.naturalWidth, height: img.naturalHeight,
                 pixels: points.map(([x, y]) =>
                   [...context.getImageData(x, y, 1, 1).data.slice(0, 3)]) };
    }""", [f"{RUNS}[data-id='{job_id}'] .result img", [list(p) for p in points]])


def painted_pixels(page, x0: int = 0, x1: int | None = None) -> int:
    """How many pixels of the mask canvas are painted, in columns x0..x1."""
    return page.evaluate("""([x0, x1]) => {
        const canvas = document.querySelector('#mask-canvas');
        const right = x1 ?? canvas.width;
        const data = canvas.getContext('2d').getImageData(x0, 0, right - x0, canvas.height).data;
        let count = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) count += 1;
        return count;
    }""", [x0, x1])


def strength(page) -> str:
    return page.input_value("#strength")


def drag_mouse(page, points: list[tuple[float, float]]) -> None:
    """A mouse drag through points given as fractions of the mask canvas's box."""
    box = page.locator("#mask-canvas").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=4)
    page.mouse.up()


# ---------------------------------------------------------------- (a) inpainting at a desk


def test_an_input_by_file_with_a_painted_mask_is_inpainted_outside_kept(desk, tmp_path) -> None:
    page = desk
    path = tmp_path / "halves.png"
    path.write_bytes(halves())
    choose_file(page, path)
    wait_input(page, SIZE)
    assert strength(page) == "0.75"
    assert page.locator("#size-field").is_hidden()  # an edit keeps the input's size
    assert page.locator("#mask-clear").is_disabled()
    shot(page, "edit-desk-input")

    # Paint the left half's middle, well clear of the right half.
    drag_mouse(page, [(0.1, 0.2), (0.3, 0.2), (0.3, 0.5), (0.1, 0.5), (0.1, 0.8), (0.3, 0.8)])
    assert painted_pixels(page, 0, 48) > 200
    assert painted_pixels(page, 44) == 0
    assert strength(page) == "1", "painting a mask should switch the strength to 1"
    assert page.locator("#mask-clear").is_enabled()
    assert "Inpainting" in page.inner_text("#editor-note")
    shot(page, "edit-desk-mask")

    posts = record_posts(page)
    job_id = generate(page, "a red square turned to noise")
    edits = [post for post in posts if post["url"].endswith("/v1/jobs/edits")]
    assert len(edits) == 1 and not any(p["url"].endswith("/v1/jobs") for p in posts), posts
    [parts] = sent_parts(page)
    assert {"image", "mask", "strength", "prompt", "model"} <= set(parts), parts
    assert "size" not in parts  # the input's own size

    right = [(50, 2), (60, 32), (70, 10), (80, 50), (95, 63), (48, 40)]
    inside = [(19, 13), (19, 32), (19, 51)]
    found = result_pixels(page, job_id, right + inside)
    assert (found["width"], found["height"]) == SIZE
    assert all(tuple(p) == RIGHT for p in found["pixels"][:len(right)]), found
    assert any(tuple(p) != LEFT for p in found["pixels"][len(right):]), found
    meta = card(page, job_id).locator(".run-meta").inner_text()
    assert meta.startswith("inpaint · tiny · 96\u00d764"), meta
    assert card(page, job_id).locator(".run-input img").count() == 1
    shot(page, "edit-desk-result")


# ---------------------------------------------------------------- (b) a pasted image, no mask


def test_a_pasted_image_is_edited_whole_without_a_mask(desk, tmp_path) -> None:
    page = desk
    paste_image(page, plain((80, 48), (40, 160, 60)))
    wait_input(page, (80, 48))
    assert painted_pixels(page) == 0  # a new input starts with no mask
    assert strength(page) == "0.75"
    posts = record_posts(page)
    job_id = generate(page, "a green field, repainted")
    edits = [post for post in posts if post["url"].endswith("/v1/jobs/edits")]
    assert len(edits) == 1, posts
    [parts] = sent_parts(page)
    assert "image" in parts and "mask" not in parts, parts
    found = result_pixels(page, job_id, [(0, 0)])
    assert (found["width"], found["height"]) == (80, 48)
    assert card(page, job_id).locator(".run-meta").inner_text().startswith("edit · tiny")
    shot(page, "edit-paste-result")

    # "Copy as curl" now sends the edit, the input saved as input.png beside it.
    page.click("#copy-curl")
    code = page.input_value("#code-text")
    assert "/v1/images/edits" in code and "-F image=@input.png" in code and "mask" not in code
    assert "input.png" in page.inner_text("#code-title")
    page.click("#code-dialog button[value=close]")
    (tmp_path / "input.png").write_bytes(plain((80, 48), (40, 160, 60)))
    ran = subprocess.run(["bash", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0 and "saved seed-" in ran.stdout, ran.stdout + ran.stderr
    [saved] = tmp_path.glob("seed-*.png")
    assert Image.open(saved).size == (80, 48)

    # Vary sends the same edit again, the input with it, as a new job; Restore puts it back.
    page.click("#input-remove")
    count = page.locator(RUNS).count()
    card(page, job_id).locator(".run-vary").click()
    varied = newest_id(page, count)
    assert wait_done(page, varied).startswith("1 image")
    assert sent_parts(page)[-1].count("image") == 1 and "mask" not in sent_parts(page)[-1]
    assert result_pixels(page, varied, [(0, 0)])["width"] == 80
    card(page, varied).locator(".run-restore").click()
    wait_input(page, (80, 48))
    assert strength(page) == "0.75" and painted_pixels(page) == 0


# ---------------------------------------------------------------- (c) "Use as input"


def test_use_as_input_puts_a_generated_result_in_the_editor(desk) -> None:
    page = desk
    page.click("#input-remove")
    assert page.locator("#input-field").is_hidden() and page.locator("#size-field").is_visible()
    page.fill("#width", "128")
    page.fill("#height", "96")
    posts = record_posts(page)
    job_id = generate(page, "something to edit next", steps=2)
    assert any(post["url"].endswith("/v1/jobs") for post in posts), posts
    card(page, job_id).locator(".use-input").click()
    wait_input(page, (128, 96))
    assert page.locator("#size-field").is_hidden()
    shot(page, "edit-use-as-input")

    # The full-size view's "Edit" does the same.
    page.click("#input-remove")
    card(page, job_id).locator(".result .thumb").click()
    page.wait_for_selector("#lightbox[open]")
    page.click("#lightbox-input")
    wait_input(page, (128, 96))
    assert not page.locator("#lightbox").evaluate("dialog => dialog.open")
    page.click("#input-remove")


# ---------------------------------------------------------------- (d) a phone, by touch


def test_on_a_phone_the_editor_fits_and_a_finger_paints(browser, solo: Cluster, tmp_path) -> None:
    page = open_page(browser, solo.url, PHONE, **TOUCH)
    try:
        page.locator("#input-file").set_input_files(
            files=[{"name": "wide.png", "mimeType": "image/png", "buffer": halves((512, 384))}])
        wait_input(page, (512, 384))
        stage = page.locator("#editor-stage")
        stage.scroll_into_view_if_needed()
        box = stage.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
        assert box["width"] > PHONE["width"] * 0.7, box
        assert abs(box["width"] / box["height"] - 512 / 384) < 0.02, box
        for selector in ("#editor .editor-tools", "#strength-field", "#input-remove"):
            found = page.locator(selector).bounding_box()
            assert found["x"] >= 0, (selector, found)
            assert found["x"] + found["width"] <= PHONE["width"], (selector, found)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        touch = "node => getComputedStyle(node).touchAction"
        assert page.locator("#mask-canvas").evaluate(touch) == "none"
        assert page.locator("#editor-stage").evaluate(touch) == "auto"

        canvas = page.locator("#mask-canvas").bounding_box()
        scrolled = page.evaluate("scrollY")
        y = canvas["y"] + canvas["height"] * 0.5
        touch_drag(page, (canvas["x"] + canvas["width"] * 0.1, y),
                   (canvas["x"] + canvas["width"] * 0.4, y + 40))
        assert page.evaluate("scrollY") == scrolled  # the finger painted; the page stayed put
        assert painted_pixels(page, 0, 256) > 500
        assert painted_pixels(page, 300) == 0
        assert strength(page) == "1"
        shot(page, "edit-phone-painted")

        before = painted_pixels(page)
        # A tap sent the moment a synthetic drag ends gives no click in headless Chromium
        # (its gesture detector is still settling); a hand is never that quick.
        page.wait_for_timeout(600)
        page.locator("label[for=tool-eraser]").tap()
        assert page.is_checked("#tool-eraser")
        canvas = page.locator("#mask-canvas").bounding_box()
        y = canvas["y"] + canvas["height"] * 0.5
        touch_drag(page, (canvas["x"] + canvas["width"] * 0.05, y),
                   (canvas["x"] + canvas["width"] * 0.45, y + 40), steps=16)
        assert painted_pixels(page) < before / 2  # the eraser took most of the stroke away
        if page.locator("#mask-clear").is_enabled():
            page.wait_for_timeout(600)
            page.locator("#mask-clear").tap()
        assert painted_pixels(page) == 0
        assert strength(page) == "0.75"  # the strength follows the mask until it is moved
        page.locator("#input-field").scroll_into_view_if_needed()
        shot(page, "edit-phone-editor")
        assert not page.errors, page.errors
    finally:
        page.context.close()


# ---------------------------------------------------------------- (e) a model that cannot edit


def test_a_model_that_cannot_edit_blocks_generate_with_the_reason(browser, solo: Cluster) -> None:
    context = browser.new_context(viewport=DESKTOP, color_scheme="light")

    def without_edits(route) -> None:
        response = route.fetch()
        body = response.json()
        for model in body["data"]:
            model["capabilities"] = [c for c in model["capabilities"]
                                     if c not in ("edit", "inpaint")]
        route.fulfill(response=response, json=body)

    context.route("**/v1/models", without_edits)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(solo.url + "/")
        page.wait_for_function("document.querySelector('#model').value === 'tiny'")
        page.wait_for_function("document.querySelector('#go').ariaDisabled === 'false'")
        # An image file dropped anywhere on the settings becomes the input.
        page.evaluate("""(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
            const form = document.querySelector('#generate');
            for (const type of ['dragover', 'drop']) {
                form.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true,
                                                         cancelable: true }));
            }
        }""", base64.b64encode(plain((64, 64), (90, 90, 90))).decode())
        wait_input(page, (64, 64))
        page.wait_for_function("document.querySelector('#go').ariaDisabled === 'true'")
        reason = page.inner_text("#go-reason")
        assert "tiny cannot edit images" in reason, reason
        assert "cannot edit images" in page.inner_text("#model-warning")
        assert "cannot edit" in page.locator("#model option[value=tiny]").inner_text()
        page.locator("#go").scroll_into_view_if_needed()
        shot(page, "edit-cannot-edit")
        page.click("#input-remove")
        page.wait_for_function("document.querySelector('#go').ariaDisabled === 'false'")
        assert page.locator("#model-warning").is_hidden()
        assert not errors, errors
    finally:
        context.close()


# ---------------------------------------------------------------- (f) an edit in the History


def submit_edit(cluster: Cluster) -> str:
    """An inpainting of the halves' left part through the API; its job id once it is done."""
    mask = Image.new("RGBA", SIZE, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 40, 56))
    out = io.BytesIO()
    mask.save(out, "PNG")
    response = httpx.post(f"{cluster.url}/v1/jobs/edits", timeout=30, files={
        "image": ("halves.png", halves(), "image/png"),
        "mask": ("mask.png", out.getvalue(), "image/png"),
    }, data={"prompt": "an edit to find in the history", "model": "tiny", "steps": "4",
             "strength": "0.9", "seed": "7"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "succeeded", job
            return job_id
        time.sleep(0.3)
    raise AssertionError("the edit did not finish")


def test_the_history_shows_an_edits_input_and_restores_it(browser, solo: Cluster) -> None:
    job_id = submit_edit(solo)
    page = open_page(browser, solo.url, DESKTOP)
    try:
        entry = page.locator(f"#history-list .entry[data-id='{job_id}']")
        entry.wait_for()
        page.wait_for_function(
            f"document.querySelector(\"#history-list .entry[data-id='{job_id}'] .entry-input img\")"
            f"?.naturalWidth === {SIZE[0]}")
        assert entry.locator(".entry-meta").inner_text().startswith("inpaint · tiny")
        entry.scroll_into_view_if_needed()
        shot(page, "edit-history")

        entry.locator(".entry-restore-button").click()
        wait_input(page, SIZE)
        page.wait_for_function("document.querySelector('#mask-canvas') && "
                               "document.querySelector('#mask-clear').disabled === false")
        # The mask as stored: the 32x48 rectangle at (8, 8), painted again in the editor.
        assert painted_pixels(page, 8, 40) == 32 * 48
        assert painted_pixels(page) == 32 * 48
        assert strength(page) == "0.9"
        assert page.input_value("#prompt") == "an edit to find in the history"
        page.locator("#input-field").scroll_into_view_if_needed()
        shot(page, "edit-history-restored")
        assert not page.errors, page.errors
    finally:
        page.context.close()

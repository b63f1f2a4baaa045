"""The web UI in real headless Chromium against a real cluster.

One browser page for the module; each test leaves it usable for the next. Screenshots of every
state go to test-artifacts/ (DCTEST_ARTIFACTS overrides) for a person to look at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster import Cluster, wait_until

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DCTEST_ARTIFACTS", Path(__file__).resolve().parents[2] /
                                "test-artifacts"))
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
API_KEY = "sk-ui-test-3f9a"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian's chromium is not installed (scripts/bootstrap test "
                              "installs it when run as root)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_cluster(cache_dir: Path) -> Iterator[Cluster]:
    """A cluster that wants an API key; its test waits until it is ready."""
    running = Cluster(cache_dir, workers=1, extra=["--api-key", API_KEY])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def page(browser, cluster: Cluster, keyed_cluster: Cluster) -> Iterator:
    """The page most tests share. (Asking for keyed_cluster starts it loading meanwhile.)"""
    context = browser.new_context(viewport=DESKTOP, color_scheme="light")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(cluster.url + "/")
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_page(browser, url: str, viewport: dict = DESKTOP, **options):
    """A new browser context (fresh storage: another device) with the UI of ``url`` loaded;
    uncaught page errors collect in ``page.errors``."""
    context = browser.new_context(viewport=viewport, color_scheme="light", **options)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    return page


def shot(page, name: str, *, full_page: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=full_page)


def set_settings(page, *, prompt: str, size: str = "256x256", steps: int = 4, n: int = 1,
                 seed: int | None = None) -> None:
    width, height = size.split("x")
    page.fill("#prompt", prompt)
    page.fill("#width", width)
    page.fill("#height", height)
    page.fill("#steps", str(steps))
    page.fill("#n", str(n))
    if seed is None:
        page.click("label[for=seed-random]")
    else:
        page.fill("#seed", str(seed))  # typing a seed makes it fixed


def newest_run(page):
    return page.locator("#runs .run").first


def record_statuses(page) -> None:
    """Keep every text a run's status shows, since a tiny job's steps pass in milliseconds."""
    page.evaluate("""() => {
        window.statusLog = [];
        new MutationObserver(() => {
            const status = document.querySelector('#runs .run .run-status');
            if (status) window.statusLog.push(status.textContent);
        }).observe(document.querySelector('#runs'),
                   {subtree: true, childList: true, characterData: true});
    }""")


def test_the_model_picker_lists_tiny_and_applies_its_defaults(page, cluster: Cluster) -> None:
    limits = httpx.get(f"{cluster.url}/v1/models").json()["data"][0]["limits"]
    assert page.locator("#model option").all_inner_texts()[0].startswith("tiny")
    page.fill("#width", "64")
    page.fill("#steps", "9")
    page.select_option("#model", "tiny")
    page.dispatch_event("#model", "change")  # choosing the model again applies its defaults
    default_w, default_h = limits["default_size"].split("x")
    assert page.input_value("#width") == default_w
    assert page.input_value("#height") == default_h
    assert page.input_value("#steps") == str(limits["default_steps"])
    assert page.get_attribute("#steps", "max") == str(limits["max_steps"])
    assert page.is_visible("#guidance")
    assert page.get_attribute("#negative-field", "hidden") is None  # in "More settings"
    checked = page.locator("#size-presets input:checked")
    assert checked.get_attribute("value") == limits["default_size"]
    presets = page.locator("#size-presets input").evaluate_all("rs => rs.map(r => r.value)")
    assert len(presets) == 5
    for preset in presets:  # every preset is a size tiny accepts
        w, h = map(int, preset.split("x"))
        assert w % limits["size_multiple"] == 0 and h % limits["size_multiple"] == 0
        assert limits["min_pixels"] <= w * h <= limits["max_pixels"]
    page.click("#size-presets label:has-text('Wide')")
    assert int(page.input_value("#width")) > int(page.input_value("#height"))
    page.wait_for_selector("#workers .worker")
    assert page.locator("#workers .worker").count() == 2
    shot(page, "start")


def test_generate_shows_progress_then_images_with_their_seeds(page) -> None:
    set_settings(page, prompt="a lighthouse at dusk", size="128x128", steps=8, n=2, seed=7)
    record_statuses(page)
    page.press("#prompt", "Control+Enter")
    run = newest_run(page)
    run.locator("figure img").first.wait_for()
    steps_seen = [text for text in page.evaluate("window.statusLog") if text.startswith("Step")]
    assert steps_seen and steps_seen[-1] == "Step 8 of 8", steps_seen
    assert run.get_attribute("data-state") == "completed"
    status = run.locator(".run-status").inner_text()  # the queue wait apart from the making
    assert status.startswith("2 images · ") and " · made in " in status, status
    assert run.locator("figcaption .seed").all_inner_texts() == ["Seed 7", "Seed 8"]
    sizes = run.locator("figure img").evaluate_all(
        "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[128, 128], [128, 128]]
    assert run.locator("a.download").first.get_attribute("download") == "a-lighthouse-at-dusk-7.png"
    shot(page, "generated")

    run.locator("button.thumb").nth(1).click()  # the full-size view
    lightbox = page.locator("#lightbox")
    assert lightbox.is_visible()
    assert "Seed 8" in page.inner_text("#lightbox-caption")
    shot(page, "lightbox")
    page.keyboard.press("Escape")
    assert not lightbox.is_visible()

    run.locator("figcaption .seed").nth(1).click()  # reuse seed 8
    assert page.is_checked("#seed-fixed") and page.input_value("#seed") == "8"


def interruptions(cluster: Cluster) -> int:
    """How many jobs a worker stopped mid-denoise (it logs "job ID interrupted")."""
    return sum(" job " in line and line.endswith(" interrupted") for line in cluster.log.lines)


def test_a_live_job_shows_its_step_and_can_be_cancelled(page, cluster: Cluster) -> None:
    set_settings(page, prompt="a slow lighthouse", size="512x512", steps=40)
    page.click("#go")
    run = newest_run(page)
    page.wait_for_function(
        "/^Step [0-9]+ of 40$/.test(document.querySelector('#runs .run .run-status').textContent)",
        timeout=30_000)
    assert run.locator("progress").get_attribute("max") == "40"
    shot(page, "progress")
    interrupted = interruptions(cluster)
    run.locator("button.run-cancel").click()
    page.wait_for_function(
        "document.querySelector('#runs .run').dataset.state === 'cancelled'", timeout=15_000)
    assert run.locator(".run-status").inner_text() == "Cancelled"
    assert run.locator("figure").count() == 0
    # The worker stops the job between two steps of 40, never runs it to its end; its slot is
    # free once it said so. (A wall-clock bound here failed on a loaded CI machine.)
    wait_until(lambda: not any(w["running"] for w in cluster.cluster_status()["workers"]),
               60, "the worker to free the cancelled job's slot")
    wait_until(lambda: interruptions(cluster) == interrupted + 1, 10,
               "the worker's log line saying it interrupted the job", cluster.log.text)
    shot(page, "cancelled")


def test_history_survives_a_reload_and_restores_settings(page) -> None:
    """The history is the server's (GET /v1/jobs): a reload, or another browser, shows it."""
    set_settings(page, prompt="a red barn in snow", size="192x344", steps=5, seed=4242)
    page.click("#go")
    newest_run(page).locator("figure img").first.wait_for()

    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    entry = page.locator("#history-list .entry", has_text="a red barn in snow")
    entry.wait_for()
    set_settings(page, prompt="something else", size="64x64", steps=2)  # seed random

    page.fill("#history-search", "barn in snow")  # the server searches for a substring
    page.wait_for_function("document.querySelectorAll('#history-list .entry').length === 1")
    page.fill("#history-search", "no such prompt")
    page.wait_for_function("document.querySelectorAll('#history-list .entry').length === 0")
    page.fill("#history-search", "RED barn")
    entry.wait_for()
    shot(page, "history")

    entry.locator(".entry-restore").click()
    assert page.input_value("#prompt") == "a red barn in snow"
    assert (page.input_value("#width"), page.input_value("#height")) == ("192", "344")
    assert page.input_value("#steps") == "5"
    assert page.is_checked("#seed-fixed") and page.input_value("#seed") == "4242"
    assert page.locator("#size-presets input:checked + label").inner_text().startswith("Tall")

    entry.locator(".entry-thumb").first.click()
    assert page.locator("#lightbox").is_visible()
    assert "/v1/images/files/" in page.get_attribute("#lightbox-image", "src")
    page.keyboard.press("Escape")
    page.fill("#history-search", "")


def test_the_form_checks_a_size_before_sending(page) -> None:
    set_settings(page, prompt="a lighthouse", size="100x33")
    runs_before = page.locator("#runs .run").count()
    page.click("#go")
    error = page.locator("#size-field .field-error")
    assert "multiples of 8" in error.inner_text() and "104\u00d732" in error.inner_text()
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.locator("#runs .run").count() == runs_before
    shot(page, "invalid-size")


def test_a_bad_request_is_shown_in_words_naming_the_field(page) -> None:
    """The server's 400, for a request that got past the form (changed on its way out)."""
    def bad_size(route) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "size": "100x33"}))

    set_settings(page, prompt="a lighthouse", size="256x256")
    page.route("**/v1/jobs", bad_size)
    try:
        page.click("#go")
        page.wait_for_function(
            "document.querySelector('#runs .run').dataset.state === 'failed'")
    finally:
        page.unroute("**/v1/jobs")
    status = newest_run(page).locator(".run-status").inner_text()
    assert status.startswith("Size: ") and "multiples of 8" in status, status
    assert page.get_attribute("#width", "aria-invalid") == "true"
    shot(page, "error")


def test_a_401_asks_for_an_api_key_and_sends_it_from_then_on(browser,
                                                              keyed_cluster: Cluster) -> None:
    keyed_cluster.wait_ready()
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    sent: list[str | None] = []
    # Every API call carries the key; stored images are fetched by URL without one (<img src>).
    page.on("request", lambda r: sent.append(r.headers.get("authorization"))
            if "/v1/" in r.url and "/v1/images/files/" not in r.url else None)
    try:
        page.goto(keyed_cluster.url + "/")
        dialog = page.locator("#key-dialog")
        dialog.wait_for()  # the model list answered 401
        assert "needs an API key" in page.inner_text("#key-reason")
        shot(page, "api-key")
        page.click("#key-cancel")
        page.wait_for_timeout(2500)  # the model list is asked for again, without nagging
        assert not dialog.is_visible()
        assert "API key is required" in page.inner_text("#form-error")
        page.click("#key-button")
        page.fill("#key-input", "sk-wrong")
        page.click("#key-dialog button[value=save]")
        page.wait_for_function("document.querySelector('#key-reason').textContent"
                               ".includes('did not accept')")
        page.fill("#key-input", API_KEY)
        page.press("#key-input", "Enter")
        page.wait_for_function("document.querySelector('#model').value === 'tiny'")
        set_settings(page, prompt="a locked lighthouse", size="64x64")
        page.click("#go")
        newest_run(page).locator("figure img").first.wait_for()
        page.wait_for_selector("#workers .worker")
        assert page.evaluate("localStorage.getItem('dc-api-key')") == API_KEY
        assert page.is_visible("#key-button")
        first_good = sent.index(f"Bearer {API_KEY}")
        assert set(sent[first_good:]) == {f"Bearer {API_KEY}"}  # every call since carries it

        page.reload()  # the key is remembered
        page.wait_for_function("document.querySelector('#model').value === 'tiny'")
        assert not dialog.is_visible()
    finally:
        context.close()


def test_copy_as_curl_and_python_make_the_same_images(page, cluster: Cluster,
                                                      tmp_path: Path) -> None:
    set_settings(page, prompt="a lighthouse's beam, \"quoted\"", size="64x64", seed=11)
    for button, name, argv in (("#copy-curl", "curl", ["bash"]),
                               ("#copy-python", "python", [sys.executable])):
        page.click(button)
        code = page.input_value("#code-text")
        if name == "python":
            assert "client.images.generate(" in code and '"seed": 11' in code
            assert "extra_body=" in code
        shot(page, f"copy-{name}")
        page.click("#code-dialog button[value=close]")
        workdir = tmp_path / name
        workdir.mkdir()
        result = subprocess.run([*argv, "-c", code], cwd=workdir, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (workdir / "seed-11.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "curl" / "seed-11.png").read_bytes() == \
        (tmp_path / "python" / "seed-11.png").read_bytes()


def test_phone_width_is_one_column_without_sideways_scrolling(page) -> None:
    page.set_viewport_size(PHONE)
    try:
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        form = page.locator("#generate").bounding_box()
        work = page.locator("main").bounding_box()
        cluster_panel = page.locator("#cluster").bounding_box()
        assert form["y"] + form["height"] <= work["y"] <= cluster_panel["y"]
        assert abs(form["x"] - work["x"]) < 1 and abs(form["width"] - work["width"]) < 1
        shot(page, "phone", full_page=True)
        page.emulate_media(color_scheme="dark")
        shot(page, "phone-dark", full_page=True)
    finally:
        page.emulate_media(color_scheme="light")
        page.set_viewport_size(DESKTOP)
    page.emulate_media(color_scheme="dark")
    shot(page, "dark")
    page.emulate_media(color_scheme="light")

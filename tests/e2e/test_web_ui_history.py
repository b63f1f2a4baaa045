"""The web UI's history, which comes from the server (GET /v1/jobs), in real headless Chromium.

One page for the module (a second browser context plays another device where a test needs
one). Jobs are made through the API as well as through the page, and each test looks for its
own prompts, since the cluster is shared with the other end-to-end tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cluster import Cluster, wait_until
from tests.e2e.test_web_ui import (
    PHONE,
    browser,
    newest_run,
    open_page,
    pytestmark,
    set_settings,
    shot,
)

__all__ = ["browser", "pytestmark"]  # the module's browser fixture and its skip markers

FINISHED = ("succeeded", "failed", "cancelled")
ENTRIES = "#history-list .entry"


@pytest.fixture(scope="module")
def page(browser, cluster: Cluster) -> Iterator:
    page = open_page(browser, cluster.url)
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def submit(cluster: Cluster, prompt: str, *, size: str = "64x64", steps: int = 1,
           **extra: Any) -> dict[str, Any]:
    response = httpx.post(f"{cluster.url}/v1/jobs", timeout=30, json={
        "prompt": prompt, "model": "tiny", "size": size, "steps": steps, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def finished(cluster: Cluster, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job once it has ended, which must be by succeeding."""
    def ended() -> dict[str, Any] | None:
        job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=10).json()
        return job if job["status"] in FINISHED else None

    job = wait_until(ended, timeout, f"job {job_id} to finish")
    assert job["status"] == "succeeded", job
    return job


def made(cluster: Cluster, prompt: str, **options: Any) -> dict[str, Any]:
    return finished(cluster, submit(cluster, prompt, **options)["id"])


def reload(page) -> None:
    page.reload()
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")


def entry_of(page, job_id: str):
    return page.locator(f"{ENTRIES}[data-id='{job_id}']")


def search(page, text: str, count: int) -> None:
    """Type a search; wait until the list shows its answer: ``count`` entries, each a match."""
    page.fill("#history-search", text)
    page.wait_for_function("""([selector, text, count]) => {
        if (document.querySelector('#history-list').ariaBusy !== 'false') return false;
        const prompts = [...document.querySelectorAll(selector + ' .entry-prompt')]
            .map((prompt) => prompt.textContent.toLowerCase());
        return prompts.length === count && prompts.every((p) => p.includes(text.toLowerCase()));
    }""", arg=[ENTRIES, text, count])


def loaded_thumbnail(page, entry):
    """The entry's first thumbnail, once the browser has loaded and decoded it."""
    image = entry.locator(".entry-thumb img").first
    image.scroll_into_view_if_needed()  # thumbnails load lazily
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=image.element_handle())
    return image


def test_a_job_made_through_the_api_shows_with_its_thumbnail(page, cluster: Cluster) -> None:
    job = made(cluster, "a copper kettle on a stove", seed=31, steps=2)
    reload(page)
    entry = entry_of(page, job["id"])
    entry.wait_for()
    assert page.locator(ENTRIES).first.get_attribute("data-id") == job["id"]  # newest first
    assert entry.locator(".entry-prompt").inner_text() == "a copper kettle on a stove"
    meta = entry.locator(".entry-meta").inner_text()
    assert meta.startswith("tiny · 64\u00d764 · 2 steps") and "seed 31" in meta, meta
    image = loaded_thumbnail(page, entry)
    assert image.get_attribute("src") == job["images"][0]["url"]
    assert image.evaluate("img => img.naturalWidth") == 64
    shot(page, "history-server")

    entry.locator(".entry-thumb").first.click()
    assert page.locator("#lightbox").is_visible()
    assert page.get_attribute("#lightbox-image", "src") == job["images"][0]["url"]
    page.keyboard.press("Escape")


def test_a_new_generation_shows_once_then_tops_the_history_when_its_card_goes(
        page, cluster: Cluster) -> None:
    set_settings(page, prompt="a violet tram at night", size="128x128", steps=3, seed=5)
    page.click("#go")
    run = newest_run(page)
    run.locator("figure img").first.wait_for()
    job_id = run.get_attribute("data-id")
    job = httpx.get(f"{cluster.url}/v1/jobs/{job_id}").json()
    url = job["images"][0]["url"]
    assert url.startswith(cluster.url + "/v1/images/files/")
    assert run.locator("figure img").first.get_attribute("src") == url
    assert not entry_of(page, job_id).count()  # shown once: as its card in the results
    run.locator(".run-remove").click()
    entry = entry_of(page, job_id)
    entry.wait_for()  # in the history at once, without a reload
    assert page.locator(ENTRIES).first.get_attribute("data-id") == job_id
    assert entry.locator(".entry-prompt").inner_text() == "a violet tram at night"
    page.wait_for_function(f"document.querySelector('{ENTRIES}').dataset.status === 'succeeded'")
    assert loaded_thumbnail(page, entry).get_attribute("src") == url


def test_another_device_sees_the_history_and_watches_a_running_job(browser, page,
                                                                   cluster: Cluster) -> None:
    earlier = made(cluster, "a paper boat on a pond")
    reload(page)
    other = open_page(browser, cluster.url)
    try:
        entry_of(other, earlier["id"]).wait_for()  # the same history, with no local storage
        assert loaded_thumbnail(other, entry_of(other, earlier["id"])).get_attribute("src") \
            == earlier["images"][0]["url"]

        set_settings(page, prompt="a very slow glacier", size="512x512", steps=50)
        page.click("#go")
        page.wait_for_function("/^Step [0-9]+ of 50$/.test("
                               "document.querySelector('#runs .run .run-status').textContent)",
                               timeout=30_000)
        job_id = newest_run(page).get_attribute("data-id")
        reload(other)
        entry = entry_of(other, job_id)
        entry.wait_for()
        assert entry.get_attribute("data-status") == "running"
        assert entry.locator(".entry-status").inner_text().startswith("Running")
        entry.locator(".entry-watch").click()
        run = newest_run(other)
        assert run.locator(".run-prompt").inner_text() == "a very slow glacier"
        other.wait_for_function("document.querySelector('#runs .run').dataset.state"
                                " === 'running'", timeout=30_000)
        shot(other, "history-watching")
        run.locator("figure img").first.wait_for(timeout=120_000)
        assert run.get_attribute("data-state") == "completed"
        # Not seen from its start here: the worker's making time (the result's timings), and
        # no wait, which the server does not report.
        status = run.locator(".run-status").inner_text()
        assert re.fullmatch(r"1 image · made in \d+(\.\d)? s", status), status
        assert run.locator("figure img").first.evaluate("img => img.naturalWidth") == 512
        assert not entry_of(other, job_id).count()  # its card shows it; the list does not
        assert not other.errors, other.errors
    finally:
        other.context.close()
    newest_run(page).locator("figure img").first.wait_for(timeout=60_000)


def test_search_finds_jobs_by_a_word_of_their_prompt(page, cluster: Cluster) -> None:
    quokka = made(cluster, "a quokka wearing a knitted scarf")
    narwhal = made(cluster, "a narwhal under Arctic ice")
    reload(page)
    search(page, "QUOKKA", 1)
    assert page.locator(ENTRIES).first.get_attribute("data-id") == quokka["id"]
    search(page, "narwhal under", 1)
    assert page.locator(ENTRIES).first.get_attribute("data-id") == narwhal["id"]
    shot(page, "history-search")
    search(page, "no such prompt anywhere", 0)
    assert "No generation matches" in page.inner_text("#history-note")
    page.fill("#history-search", "")
    entry_of(page, quokka["id"]).wait_for()
    entry_of(page, narwhal["id"]).wait_for()


def test_load_more_brings_the_older_jobs(page, cluster: Cluster) -> None:
    ids = [submit(cluster, f"paging job {number:02}")["id"] for number in range(21)]
    for job_id in ids:
        finished(cluster, job_id)
    reload(page)
    search(page, "paging job", 20)
    assert not entry_of(page, ids[0]).count()  # the oldest is on the second page
    assert page.locator(ENTRIES).first.get_attribute("data-id") == ids[-1]
    page.click("#history-more")
    page.wait_for_function(f"document.querySelectorAll('{ENTRIES}').length === 21")
    assert page.locator(ENTRIES).last.get_attribute("data-id") == ids[0]
    assert page.is_hidden("#history-more")
    search(page, "", 20)
    assert page.is_visible("#history-more")


def test_restore_fills_the_form_from_a_server_job(page, cluster: Cluster) -> None:
    job = made(cluster, "a teal bicycle by a canal", size="192x344", steps=3, n=2, seed=777,
               negative_prompt="fog", guidance=6.5, output_format="webp",
               output_compression=70, partial_images=0)
    reload(page)
    set_settings(page, prompt="something else", size="64x64", steps=2)  # seed random
    entry_of(page, job["id"]).locator(".entry-restore").click()
    assert page.input_value("#prompt") == "a teal bicycle by a canal"
    assert page.input_value("#negative_prompt") == "fog"
    assert (page.input_value("#width"), page.input_value("#height")) == ("192", "344")
    assert page.input_value("#steps") == "3"
    assert page.input_value("#guidance") == "6.5"
    assert page.input_value("#n") == "2"
    assert page.input_value("#output_format") == "webp"
    assert page.input_value("#output_compression") == "70"
    assert page.is_checked("#seed-fixed") and page.input_value("#seed") == "777"
    assert not page.is_checked("#previews")  # the job asked for no previews
    page.check("#previews")


@pytest.mark.parametrize("viewport", ["desk", "phone"])
def test_delete_asks_first_then_removes_the_job_from_the_list_and_the_server(
        viewport, browser, page, cluster: Cluster) -> None:
    kept = made(cluster, f"a saucer to keep ({viewport})")
    job = made(cluster, f"a chipped teacup to delete ({viewport})")
    if viewport == "phone":
        page = open_page(browser, cluster.url, PHONE, is_mobile=True, has_touch=True)
    else:
        reload(page)
    try:
        entry = entry_of(page, job["id"])
        entry.wait_for()
        entry.scroll_into_view_if_needed()
        entry.locator(".entry-delete").click()  # asks first, in the entry, as a run card does
        question = entry.locator(".entry-confirm")
        assert question.inner_text() == "Delete this job and its images from the server?"
        keep, yes = entry.locator(".entry-keep"), entry.locator(".entry-delete-yes")
        assert keep.is_enabled() and yes.is_enabled() and yes.inner_text() == "Delete"
        assert page.evaluate("document.activeElement.className") == "quiet entry-keep"
        assert not entry.locator(".entry-delete").count()
        boxes = [within_screen(page, part) for part in (question, yes, keep)]
        prompt = entry.locator(".entry-prompt").bounding_box()
        assert boxes[0]["y"] >= prompt["y"] + prompt["height"] - 1  # a row below the prompt
        assert boxes[1]["y"] == boxes[2]["y"]  # Delete and Keep side by side
        shot(page, f"history-delete-confirm-{viewport}")

        keep.click()  # keeps it, on the server too
        assert entry.locator(".entry-delete").is_visible() and not question.count()
        assert httpx.get(f"{cluster.url}/v1/jobs/{job['id']}").status_code == 200

        entry.locator(".entry-delete").click()
        yes.click()
        entry.wait_for(state="detached")
        assert httpx.get(f"{cluster.url}/v1/jobs/{job['id']}").status_code == 404
        reload(page)
        entry_of(page, kept["id"]).wait_for()  # the list is back from the server
        assert not entry_of(page, job["id"]).count()
        if viewport == "phone":
            assert not page.errors, page.errors
    finally:
        if viewport == "phone":
            page.context.close()


def within_screen(page, locator) -> dict:
    """The element's box, asserted to lie inside the viewport."""
    box = locator.bounding_box()
    viewport = page.viewport_size
    assert box is not None
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] + 1, (box, viewport)
    assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"] + 1, (box, viewport)
    return box


def test_offline_the_cached_list_shows_marked_offline(page, cluster: Cluster) -> None:
    job = made(cluster, "a lantern in a power cut")
    reload(page)
    entry_of(page, job["id"]).wait_for()
    assert page.get_attribute("#history", "data-offline") == "false"
    shown = page.locator(ENTRIES).count()
    page.route("**/v1/jobs*", lambda route: route.abort())
    try:
        reload(page)
        page.wait_for_function("document.querySelector('#history').dataset.offline === 'true'")
        assert page.inner_text("#history-note").startswith("Offline")
        entry = entry_of(page, job["id"])
        assert entry.locator(".entry-prompt").inner_text() == "a lantern in a power cut"
        assert page.locator(ENTRIES).count() == shown  # the first page, as last fetched
        shot(page, "history-offline")
    finally:
        page.unroute("**/v1/jobs*")
    page.evaluate("window.dispatchEvent(new Event('online'))")  # the server answers again
    page.wait_for_function("document.querySelector('#history').dataset.offline === 'false'")
    assert page.inner_text("#history-note") == ""
    entry_of(page, job["id"]).wait_for()

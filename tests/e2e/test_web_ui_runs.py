"""The web UI's run cards in real headless Chromium: where a new run shows (a phone too), queue
positions and waits, failures with Retry, what can be done with a finished run, and how the
cards and the History list share the runs.

The module runs its own cluster with one worker, so that jobs queue behind a slow one without
holding up the cluster the other tests share; every test leaves that worker idle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import Cluster, wait_until
from tests.e2e.test_web_ui import (
    DESKTOP,
    PHONE,
    browser,
    open_page,
    pytestmark,
    set_settings,
    shot,
)

__all__ = ["browser", "pytestmark"]  # the module's browser fixture and its skip markers

RUNS = "#runs .run"
JOB_URLS = ("**/v1/jobs/*/events", "**/v1/jobs/*")  # one job's events and status, not the list
DONE = re.compile(r"^(\d+) images? · waited (\d+(?:\.\d)?) s · made in (\d+(?:\.\d)?) s$")
WATCHED_DONE = re.compile(r"^1 image · made in \d+(?:\.\d)? s$")
SLOW = {"size": "768x768", "steps": 50}  # a tiny job that holds a worker's slot a while


@pytest.fixture(scope="module")
def solo(solo_cluster: Cluster) -> Cluster:
    """One worker: a slow job there makes the next ones queue."""
    return solo_cluster


@pytest.fixture(scope="module")
def desk(browser, solo: Cluster) -> Iterator:
    page = open_page(browser, solo.url, DESKTOP, permissions=["clipboard-read", "clipboard-write"])
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


@pytest.fixture(scope="module")
def phone(browser, solo: Cluster) -> Iterator:
    page = open_page(browser, solo.url, PHONE, is_mobile=True, has_touch=True)
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def card(page, job_id: str):
    return page.locator(f"{RUNS}[data-id='{job_id}']")


def newest(page):
    return page.locator(RUNS).first


def newest_id(page, count_before: int) -> str:
    """The id of the card the last Generate made, once the server has accepted its job."""
    page.wait_for_function(f"document.querySelectorAll('{RUNS}').length > {count_before}"
                           f" && document.querySelector('{RUNS}').dataset.id")
    return newest(page).get_attribute("data-id")


def settle_scroll(page) -> None:
    """Wait until a smooth scroll has come to rest."""
    page.evaluate("""() => new Promise((resolve) => {
        let last = -1, still = 0;
        const tick = () => {
            if (scrollY === last) still += 1; else still = 0;
            last = scrollY;
            if (still > 8) resolve(); else requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
    })""")


def in_view(page, locator) -> dict:
    """The element's box, asserted to lie inside the viewport, below the sticky top bar."""
    box = locator.bounding_box()
    viewport = page.viewport_size
    bar = page.locator(".topbar").bounding_box()
    assert box is not None
    assert bar["y"] + bar["height"] - 1 <= box["y"], (box, bar)
    assert box["y"] + box["height"] <= viewport["height"] + 1, (box, viewport)
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"] + 1, (box, viewport)
    return box


def record_announcements(page) -> None:
    page.evaluate("""() => {
        window.announced = [];
        new MutationObserver(() => window.announced.push(
            document.querySelector('#status').textContent))
          .observe(document.querySelector('#status'),
                   {subtree: true, childList: true, characterData: true});
    }""")


def wait_done(page, job_id: str, timeout: float = 60_000) -> str:
    page.wait_for_function(
        f"['completed', 'failed', 'cancelled'].includes("
        f"document.querySelector(\"{RUNS}[data-id='{job_id}']\")?.dataset.state)", timeout=timeout)
    return card(page, job_id).locator(".run-status").inner_text()


def idle(cluster: Cluster) -> bool:
    return not any(w["running"] for w in cluster.cluster_status()["workers"])


def hold_the_worker(cluster: Cluster, prompt: str) -> list[str]:
    """Fill the one worker with slow jobs (it runs one and holds the next: its capacity is
    two), so that the next jobs wait in the broker's queue; return their ids."""
    wait_until(lambda: idle(cluster), 120, "the worker to finish what it was doing")
    ids = []
    for number in (1, 2):
        response = httpx.post(f"{cluster.url}/v1/jobs", timeout=30,
                              json={"prompt": f"{prompt} ({number})", "model": "tiny", **SLOW})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    wait_until(lambda: len(cluster.cluster_status()["workers"][0]["running"]) == 2, 60,
               "the worker to take both slow jobs")
    return ids


def release(cluster: Cluster, job_ids: list[str]) -> None:
    for job_id in job_ids:
        httpx.post(f"{cluster.url}/v1/jobs/{job_id}/cancel", timeout=10)
    wait_until(lambda: idle(cluster), 120, "the worker to let the slow jobs go")


# ---------------------------------------------------------------- item 1: a new run is seen


def test_on_a_phone_a_new_run_scrolls_into_view_and_is_announced(phone, solo: Cluster) -> None:
    phone.evaluate("scrollTo(0, 0)")
    set_settings(phone, prompt="a kite over a phone-sized beach", size="64x64", steps=2)
    record_announcements(phone)
    before = phone.locator(RUNS).count()
    phone.locator("#go").tap()  # scrolls the button into view first, as a thumb would
    job_id = newest_id(phone, before)
    settle_scroll(phone)
    run = card(phone, job_id)
    in_view(phone, run.locator(".run-head"))
    in_view(phone, run.locator(".run-progress"))
    shot(phone, "runs-phone-started")
    status = wait_done(phone, job_id)
    assert DONE.match(status), status
    settle_scroll(phone)
    box = in_view(phone, run)
    bar = phone.locator(".topbar").bounding_box()
    assert box["y"] <= bar["y"] + bar["height"] + 24  # brought up as its image appeared
    in_view(phone, run.locator("figure img"))  # the image, whole, on the screen
    announced = phone.evaluate("window.announced")
    assert any("top of the results" in text for text in announced), announced
    assert announced[-1].startswith("Done: 1 image"), announced
    shot(phone, "runs-phone-done")


# ---------------------------------------------------------------- item 2: queue truth


def test_queued_runs_show_their_own_positions_then_wait_and_making_time(desk, phone,
                                                                       solo: Cluster) -> None:
    blocker = hold_the_worker(solo, "a slow job that holds the only worker")
    ids = []
    try:
        for steps in (2, 3, 4):  # different steps: three jobs the worker cannot batch
            set_settings(desk, prompt=f"queued behind a slow job, {steps} steps", size="64x64",
                         steps=steps)
            before = desk.locator(RUNS).count()
            desk.click("#go")
            ids.append(newest_id(desk, before))
        positions = """(ids) => ids.map((id) =>
            document.querySelector(`#runs .run[data-id='${id}']`).dataset.position)"""

        def reported() -> list[str]:  # each job's position as the server reports it now
            return [str(httpx.get(f"{solo.url}/v1/jobs/{job_id}").json()["position"])
                    for job_id in ids]

        # Each card shows the position the server reports for its job: three different ones,
        # one apart, in the order they were sent (the worker's second slot may count too).
        wait_until(lambda: desk.evaluate(positions, ids) == reported(), 30,
                   "each queued card to show its own position",
                   lambda: f"{desk.evaluate(positions, ids)} {reported()}")
        shown = [int(position) for position in desk.evaluate(positions, ids)]
        assert shown == list(range(shown[0], shown[0] + 3)), shown
        texts = [card(desk, job_id).locator(".run-status").inner_text() for job_id in ids]
        eta = httpx.get(f"{solo.url}/v1/jobs/{ids[2]}").json().get("eta_seconds")
        for text, position in zip(texts, shown, strict=True):
            ahead = "next in line" if position == 0 else \
                f"{position} job{'s' if position > 1 else ''} ahead"
            assert text.startswith(f"Queued \u2014 {ahead}"), texts
            if eta is None:
                assert "\u00b7" not in text, texts  # no estimate: none is made up
            else:
                assert re.search(r" \u00b7 (about \d+ (s|min)|starting any moment)$", text), texts
        assert len(set(texts)) == 3
        for job_id in ids:
            in_view(desk, card(desk, job_id).locator(".run-status"))
        shot(desk, "runs-queued")

        phone.reload()  # the same jobs, followed from a phone's History
        phone.wait_for_function("document.querySelector('#model').value === 'tiny'")
        entry = phone.locator(f"#history-list .entry[data-id='{ids[2]}']")
        entry.wait_for()
        assert entry.locator(".entry-status").inner_text().startswith("Queued")
        entry.locator(".entry-watch").click()
        watched = card(phone, ids[2])
        phone.wait_for_function(f"document.querySelector(\"{RUNS}[data-id='{ids[2]}']\")"
                                ".dataset.state === 'queued'")
        settle_scroll(phone)
        in_view(phone, watched.locator(".run-head"))
        assert not phone.locator(f"#history-list .entry[data-id='{ids[2]}']").count()
        shot(phone, "runs-phone-queued")
    finally:
        release(solo, blocker)
    for job_id in ids:
        text = wait_done(desk, job_id)
        match = DONE.match(text)
        assert match, text
        waited, made = float(match.group(2)), float(match.group(3))
        assert waited > made, text  # they waited for the slow job; a 64 by 64 image is quick
    # Followed from History, the run was not seen from its start: it says how long the worker
    # took to make it (the result's timings), with no wait made up.
    watched_text = wait_done(phone, ids[2])
    assert WATCHED_DONE.match(watched_text), watched_text
    shot(desk, "runs-waited-and-made")


def test_a_queued_run_shows_the_servers_estimate_of_its_wait(desk, solo: Cluster) -> None:
    """What the card says when the server reports an estimate (eta_seconds) with the
    position: the job's event stream is answered here with such an event, then let through."""
    def estimate(route) -> None:
        job_id = route.request.url.split("/")[-2]
        event = {"id": job_id, "position": 2, "eta_seconds": 41.6}
        route.fulfill(status=200, content_type="text/event-stream",
                      body=f"event: queued\ndata: {json.dumps(event)}\n\n")

    set_settings(desk, prompt="told how long it will wait", size="64x64", steps=2)
    desk.route("**/v1/jobs/*/events", estimate)
    try:
        before = desk.locator(RUNS).count()
        desk.click("#go")
        job_id = newest_id(desk, before)
        status = card(desk, job_id).locator(".run-status")
        desk.wait_for_function("(node) => node.textContent.includes('about')",
                               arg=status.element_handle())
        assert status.inner_text() == "Queued \u2014 2 jobs ahead \u00b7 about 42 s"
        shot(desk, "runs-queued-estimate")
    finally:
        desk.unroute("**/v1/jobs/*/events")
    assert wait_done(desk, job_id).startswith("1 image")


def test_on_a_laptop_a_run_started_far_down_the_page_is_brought_back(desk, solo: Cluster) -> None:
    set_settings(desk, prompt="a laptop's lighthouse, far down", size="64x64", steps=2)
    desk.evaluate("document.querySelector('#history').scrollIntoView({block: 'end'})")
    desk.evaluate("scrollBy(0, 2000)")
    assert desk.evaluate("scrollY") > 0  # the earlier tests' cards make the page tall
    before = desk.locator(RUNS).count()
    desk.press("#prompt", "Control+Enter")  # the form stays in view on a laptop
    job_id = newest_id(desk, before)
    settle_scroll(desk)
    in_view(desk, card(desk, job_id).locator(".run-head"))
    wait_done(desk, job_id)
    shot(desk, "runs-desktop-started")


def test_the_cancel_shortcut_takes_the_focused_run_else_the_newest(desk, solo: Cluster) -> None:
    blocker = hold_the_worker(solo, "a slow job before the cancel shortcut")
    ids = []
    try:
        for steps in (2, 3):
            set_settings(desk, prompt=f"to be cancelled by the shortcut, {steps}", size="64x64",
                         steps=steps)
            before = desk.locator(RUNS).count()
            desk.click("#go")
            ids.append(newest_id(desk, before))
        cancel = "import('/static/js/runs.js').then((runs) => runs.cancelLatestRun())"
        card(desk, ids[0]).locator(".run-cancel").focus()  # the older one has the focus
        assert desk.evaluate(cancel) is True
        desk.wait_for_function(f"document.querySelector(\"{RUNS}[data-id='{ids[0]}']\")"
                               ".dataset.state === 'cancelled'")
        assert card(desk, ids[1]).get_attribute("data-state") == "queued"
        desk.focus("#prompt")
        assert desk.evaluate(cancel) is True  # no run has the focus: the newest goes
        desk.wait_for_function(f"document.querySelector(\"{RUNS}[data-id='{ids[1]}']\")"
                               ".dataset.state === 'cancelled'")
        assert desk.evaluate(cancel) is False  # nothing of this page's is left to cancel
    finally:
        release(solo, blocker)


# ---------------------------------------------------------------- item 4: failures


@pytest.mark.parametrize("viewport", ["desk", "phone"])
def test_a_run_the_cluster_never_got_says_so_and_retries(viewport, request,
                                                         solo: Cluster) -> None:
    page = request.getfixturevalue(viewport)
    set_settings(page, prompt=f"sent while the cluster is away ({viewport})", size="64x64",
                 steps=2, seed=404)
    page.route("**/v1/jobs", lambda route: route.abort("connectionrefused"))
    try:
        before = page.locator(RUNS).count()
        page.click("#go")
        page.wait_for_function(f"document.querySelectorAll('{RUNS}').length > {before}"
                               f" && document.querySelector('{RUNS}').dataset.state === 'failed'")
    finally:
        page.unroute("**/v1/jobs")
    failed = newest(page)
    assert failed.get_attribute("data-reason") == "unreachable"
    assert failed.locator(".run-status").inner_text().startswith("The cluster cannot be reached")
    settle_scroll(page)
    retry = failed.locator(".run-retry")
    assert retry.is_visible() and retry.is_enabled()
    in_view(page, retry)
    assert not failed.locator(".run-delete").count()  # no job on the server to delete
    shot(page, f"runs-unreachable-{viewport}")

    count = page.locator(RUNS).count()
    retry.click()
    job_id = newest_id(page, count - 1)
    assert page.locator(RUNS).count() == count  # the new run took the failed one's place
    assert wait_done(page, job_id).startswith("1 image")
    assert card(page, job_id).locator("figcaption .seed").inner_text() == "Seed 404"


def lose_contact_with_jobs(page) -> None:
    """From now on the page cannot reach any job (its events, its status), as when the
    connection drops after the server took the job; other requests still get through."""
    for pattern in JOB_URLS:
        page.route(pattern, lambda route: route.abort("connectionreset"))


def regain_contact_with_jobs(page) -> None:
    for pattern in JOB_URLS:
        page.unroute(pattern)


def count_submissions(page) -> list[str]:
    """The URLs of the jobs the page sends from now on (POST /v1/jobs, or the images API)."""
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" and (
        r.url.endswith("/v1/jobs") or r.url.endswith("/v1/images/generations")) else None)
    return posts


def wait_failed(page, job_id: str) -> None:
    """Until the card gives up (the page reconnects a few times first, for some 15 s)."""
    page.wait_for_function(f"document.querySelector(\"{RUNS}[data-id='{job_id}']\")"
                           ".dataset.state === 'failed'", timeout=60_000)


def test_retry_after_lost_contact_follows_the_same_job_in_the_same_card(desk,
                                                                       solo: Cluster) -> None:
    blocker = hold_the_worker(solo, "a slow job while the page loses contact")
    try:
        posts = count_submissions(desk)
        set_settings(desk, prompt="a lighthouse keeper waiting out a storm", size="64x64",
                     steps=3, seed=77)
        lose_contact_with_jobs(desk)
        try:
            before = desk.locator(RUNS).count()
            desk.click("#go")
            job_id = newest_id(desk, before)
            wait_failed(desk, job_id)
            run = card(desk, job_id)
            assert run.get_attribute("data-reason") == "unreachable"
            text = run.locator(".run-status").inner_text()
            assert text.startswith("Lost contact with the cluster before the job finished"), text
            assert "Retry follows the same job again" in text and "reload" not in text, text
            retry = run.locator(".run-retry")
            settle_scroll(desk)
            assert retry.is_visible() and retry.is_enabled()
            in_view(desk, retry)
            assert not run.locator(".run-cancel").is_visible()
            shot(desk, "runs-lost-contact")
        finally:
            regain_contact_with_jobs(desk)
        retry.click()  # the job is still queued behind the slow ones: followed again
        desk.wait_for_function(f"document.querySelector(\"{RUNS}[data-id='{job_id}']\")"
                               ".dataset.state === 'queued'", timeout=15_000)
        assert run.locator(".run-status").inner_text().startswith("Queued")
        cancel = run.locator(".run-cancel")
        assert cancel.is_visible() and cancel.is_enabled()
        assert not run.locator(".run-actions").is_visible()
        assert desk.locator(RUNS).first.get_attribute("data-id") == job_id  # the same card
        shot(desk, "runs-lost-contact-following-again")
    finally:
        release(solo, blocker)
    status = wait_done(desk, job_id)
    assert run.get_attribute("data-state") == "completed"
    assert WATCHED_DONE.match(status), status  # the worker's time: this page missed the rest
    assert run.locator("figcaption .seed").inner_text() == "Seed 77"
    image = run.locator("figure img")
    desk.wait_for_function("img => img.complete && img.naturalWidth === 64",
                           arg=image.element_handle())
    assert len(posts) == 1, posts  # Retry sent nothing new
    assert httpx.get(f"{solo.url}/v1/jobs/{job_id}").json()["status"] == "succeeded"
    run.scroll_into_view_if_needed()
    shot(desk, "runs-lost-contact-finished")


def test_retry_after_lost_contact_offers_a_new_run_when_the_job_is_gone(phone,
                                                                        solo: Cluster) -> None:
    posts = count_submissions(phone)
    set_settings(phone, prompt="a sandcastle the tide took", size="64x64", steps=2, seed=88)
    lose_contact_with_jobs(phone)
    try:
        before = phone.locator(RUNS).count()
        phone.locator("#go").tap()
        job_id = newest_id(phone, before)
        wait_failed(phone, job_id)
        # Deleted on the server meanwhile (from another device, say).
        wait_until(lambda: httpx.get(f"{solo.url}/v1/jobs/{job_id}").json()["status"]
                   == "succeeded", 60, "the job to finish")
        assert httpx.delete(f"{solo.url}/v1/jobs/{job_id}").status_code in (200, 204)
    finally:
        regain_contact_with_jobs(phone)
    run = card(phone, job_id)
    run.locator(".run-retry").click()
    again = run.locator(".run-again")
    again.wait_for()
    text = run.locator(".run-status").inner_text()
    assert text.startswith("The cluster no longer has this job"), text
    assert run.get_attribute("data-reason") == "gone"
    names = run.locator(".run-actions button").all_inner_texts()
    assert names == ["Run again", "Restore settings", "Copy settings"], names  # nothing to delete
    settle_scroll(phone)
    in_view(phone, again)
    assert len(posts) == 1, posts
    shot(phone, "runs-phone-lost-job-gone")

    count = phone.locator(RUNS).count()
    again.click()  # a new job, in the old card's place
    new_id = newest_id(phone, count - 1)
    assert new_id != job_id and phone.locator(RUNS).count() == count
    assert wait_done(phone, new_id).startswith("1 image")
    assert card(phone, new_id).locator("figcaption .seed").inner_text() == "Seed 88"
    assert len(posts) == 2, posts


def test_a_run_that_fails_on_the_server_has_retry(desk, solo: Cluster) -> None:
    def failing(route) -> None:
        route.fulfill(status=503, content_type="application/json", body=json.dumps(
            {"error": {"message": "no worker serves tiny right now", "type": "server_error",
                       "param": None, "code": "no_worker"}}))

    set_settings(desk, prompt="refused by the server", size="64x64", steps=2)
    desk.route("**/v1/jobs", failing)
    try:
        desk.click("#go")
        desk.wait_for_function(f"document.querySelector('{RUNS}').dataset.state === 'failed'")
    finally:
        desk.unroute("**/v1/jobs")
    failed = newest(desk)
    assert failed.get_attribute("data-reason") == ""
    assert failed.locator(".run-status").inner_text() == "no worker serves tiny right now"
    assert failed.locator(".run-retry").is_visible()
    failed.locator(".run-remove").click()


# ---------------------------------------------------------------- item 6: result actions


def test_a_finished_run_reruns_varies_copies_restores_and_deletes(desk, solo: Cluster) -> None:
    set_settings(desk, prompt="a heron in reeds, for the actions", size="96x64", steps=2, seed=123)
    before = desk.locator(RUNS).count()
    desk.click("#go")
    first = newest_id(desk, before)
    wait_done(desk, first)
    run = card(desk, first)
    names = run.locator(".run-actions button").all_inner_texts()
    assert names == ["Re-run", "Vary", "Restore settings", "Copy settings", "Delete"], names
    for button in run.locator(".run-actions button").all():
        assert button.is_visible() and button.is_enabled()
    # The card is this run's only place on the page: History leaves it out.
    assert not desk.locator(f"#history-list .entry[data-id='{first}']").count()
    shot(desk, "runs-actions")

    run.locator(".run-rerun").click()  # the same settings and seed
    rerun = newest_id(desk, before + 1)
    wait_done(desk, rerun)
    assert card(desk, rerun).locator("figcaption .seed").inner_text() == "Seed 123"
    assert "96\u00d764" in card(desk, rerun).locator(".run-meta").inner_text()

    run.locator(".run-vary").click()  # a new random seed
    varied = newest_id(desk, before + 2)
    wait_done(desk, varied)
    seed = card(desk, varied).locator("figcaption .seed").inner_text()
    assert seed != "Seed 123"
    assert "96\u00d764" in card(desk, varied).locator(".run-meta").inner_text()

    run.locator(".run-copy").click()
    copied = json.loads(desk.evaluate("navigator.clipboard.readText()"))
    assert copied["prompt"] == "a heron in reeds, for the actions"
    assert (copied["size"], copied["steps"], copied["seed"]) == ("96x64", 2, 123)
    response = httpx.post(f"{solo.url}/v1/jobs", json=copied, timeout=30)  # what the API takes
    assert response.status_code == 202, response.text

    set_settings(desk, prompt="something else entirely", size="64x64", steps=3)
    run.locator(".run-restore").click()
    assert desk.input_value("#prompt") == "a heron in reeds, for the actions"
    assert (desk.input_value("#width"), desk.input_value("#height")) == ("96", "64")
    assert desk.is_checked("#seed-fixed") and desk.input_value("#seed") == "123"

    run.locator(".run-delete").click()  # asks first
    assert "Delete this run" in run.locator(".run-confirm").inner_text()
    shot(desk, "runs-delete-confirm")
    run.locator(".run-keep").click()
    assert run.locator(".run-delete").is_visible()
    run.locator(".run-delete").click()
    run.locator(".run-delete-yes").click()
    run.wait_for(state="detached")
    assert httpx.get(f"{solo.url}/v1/jobs/{first}").status_code == 404
    assert not desk.locator(f"#history-list .entry[data-id='{first}']").count()

    # Removed from the page (its x button), a run is listed in History again, with Restore in sight.
    card(desk, varied).locator(".run-remove").click()
    entry = desk.locator(f"#history-list .entry[data-id='{varied}']")
    entry.wait_for()
    restore = entry.locator(".entry-restore-button")
    assert restore.is_visible() and restore.inner_text() == "Restore"
    set_settings(desk, prompt="something else again", size="64x64", steps=3)
    restore.click()
    assert desk.input_value("#prompt") == "a heron in reeds, for the actions"
    assert desk.input_value("#seed") == seed.removeprefix("Seed ")
    shown = set(desk.locator(RUNS).evaluate_all("cards => cards.map((c) => c.dataset.id)"))
    listed = set(desk.locator("#history-list .entry").evaluate_all(
        "entries => entries.map((e) => e.dataset.id)"))
    assert not shown & listed, shown & listed  # no run shows twice
    entry.scroll_into_view_if_needed()
    shot(desk, "runs-history-restore")


def test_on_a_phone_the_actions_fit_the_screen(phone, solo: Cluster) -> None:
    set_settings(phone, prompt="a phone's heron", size="64x64", steps=2)
    before = phone.locator(RUNS).count()
    phone.locator("#go").tap()
    job_id = newest_id(phone, before)
    wait_done(phone, job_id)
    actions = card(phone, job_id).locator(".run-actions")
    actions.scroll_into_view_if_needed()
    settle_scroll(phone)
    for button in actions.locator("button").all():
        box = in_view(phone, button)
        assert box["height"] >= 32  # big enough for a thumb
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(phone, "runs-phone-actions")


def test_a_queued_runs_estimate_counts_down_until_the_server_says_more(
        desk, solo: Cluster) -> None:
    """The server estimates a wait when the job's place changes; between, the card counts
    down from it, to "starting any moment" and no further."""
    told = []

    def estimate(route) -> None:
        job_id = route.request.url.split("/")[-2]
        event = {"id": job_id, "position": 0, "eta_seconds": 3.0}
        # The estimate once; then streams that say nothing new (as behind a long job).
        body = ": waiting\n\n" if told else f"event: queued\ndata: {json.dumps(event)}\n\n"
        told.append(job_id)
        route.fulfill(status=200, content_type="text/event-stream", body=body)

    set_settings(desk, prompt="counted down", size="64x64", steps=2)
    desk.route("**/v1/jobs/*/events", estimate)
    try:
        before = desk.locator(RUNS).count()
        desk.click("#go")
        job_id = newest_id(desk, before)
        status = card(desk, job_id).locator(".run-status")
        desk.wait_for_function("(node) => node.textContent.includes('about 3 s')",
                               arg=status.element_handle())
        desk.wait_for_function(
            "(node) => node.textContent === 'Queued \u2014 next in line \u00b7 starting any "
            "moment'", arg=status.element_handle(), timeout=15_000)
        shot(desk, "runs-queued-countdown")
    finally:
        desk.unroute("**/v1/jobs/*/events")

"""The web UI's LoRA adapters in real headless Chromium against a real one-worker cluster with a
folder of adapters: picked for the chosen model with a weight slider, sent as `loras`, shown on
the run card and in History, carried by Re-run, Restore and the code snippets, typed as
<lora:...> prompt tags, dropped when another model lacks them, and sent with an edit; on a
phone the control fits the screen; a model without adapters says it has none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpu_worker.tiny import build_tiny_pipeline
from tests.cluster import Cluster, wait_until
from tests.e2e.test_web_ui import PHONE, browser, open_page, pytestmark, set_settings, shot
from tests.e2e.test_web_ui_edit import halves, paste_image, wait_input
from tests.e2e.test_web_ui_layout import TOUCH
from tests.e2e.test_web_ui_runs import card, newest_id, wait_done
from tests.gpu_worker.lora_fixtures import lora_folder

__all__ = ["browser", "pytestmark"]  # the browser fixture and the skip markers of test_web_ui

RUNS = "#runs .run"
LAPTOP = {"width": 1280, "height": 800}
ADAPTERS = ["ink", "styles/pastel"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The built-in tiny model's architecture: its adapters fit.
    return lora_folder(build_tiny_pipeline(), tmp_path_factory.mktemp("ui-loras"),
                       {"ink": 1, "styles/pastel": 2})


@pytest.fixture(scope="module")
def lora_cluster(cache_dir: Path, lora_dir: Path) -> Iterator[Cluster]:
    running = Cluster(cache_dir, workers=1, extra=["--lora-dir", str(lora_dir)])
    try:
        running.wait_ready()

        def announced() -> bool:
            models = httpx.get(f"{running.url}/v1/models", timeout=10).json()["data"]
            return any(m["id"] == "tiny" and m.get("loras") == ADAPTERS for m in models)

        wait_until(announced, 60, "the worker's adapters in /v1/models")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def desk(browser, lora_cluster: Cluster) -> Iterator:
    page = open_page(browser, lora_cluster.url, LAPTOP,
                     permissions=["clipboard-read", "clipboard-write"])
    yield page
    page.context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def open_more(page) -> None:
    if not page.evaluate("document.querySelector('#more-settings').open"):
        page.click("#more-settings summary")
    page.wait_for_selector("#lora-field", state="visible")


def add_adapter(page, name: str) -> None:
    open_more(page)
    page.select_option("#lora-pick", name)
    page.click("#lora-add-button")
    page.wait_for_selector(f"#lora-list .lora[data-name='{name}']")


def show_adapters(page) -> None:
    """Scroll the adapters to the middle of the settings (clear of the sticky Generate bar)."""
    page.evaluate("document.querySelector('#lora-field').scrollIntoView({block: 'center'})")


def remove_adapters(page) -> None:
    while page.locator("#lora-list .lora-remove").count():
        page.locator("#lora-list .lora-remove").first.click()


def form_adapters(page) -> list[tuple[str, str, str]]:
    """(name, slider value, number shown) of each adapter in the form."""
    return [tuple(row) for row in page.locator("#lora-list .lora").evaluate_all(
        """rows => rows.map((r) => [r.dataset.name, r.querySelector('.lora-slider').value,
                                    r.querySelector('.lora-scale').value])""")]


def record_job_posts(page) -> list[dict]:
    """The JSON body of every POST /v1/jobs the page sends from now."""
    bodies: list[dict] = []

    def seen(request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/jobs"):
            bodies.append(request.post_data_json)

    page.on("request", seen)
    return bodies


def generate(page) -> str:
    """Press Generate; the job's id once its run finished with an image."""
    count = page.locator(RUNS).count()
    page.click("#go")
    job_id = newest_id(page, count)
    assert wait_done(page, job_id).startswith("1 image"), card(page, job_id).inner_text()
    page.wait_for_function(
        f"document.querySelector(\"{RUNS}[data-id='{job_id}'] .result img\")?.complete")
    return job_id


def image_bytes(page, job_id: str) -> str:
    """The run's image as the page fetches it by its src, base64."""
    return page.evaluate("""async (selector) => {
        const response = await fetch(document.querySelector(selector).src);
        const bytes = new Uint8Array(await response.arrayBuffer());
        let text = '';
        for (const byte of bytes) text += String.fromCharCode(byte);
        return btoa(text);
    }""", f"{RUNS}[data-id='{job_id}'] .result img")


def meta(page, job_id: str) -> str:
    return card(page, job_id).locator(".run-meta").inner_text()


def test_an_adapter_is_picked_weighted_sent_shown_and_restored(desk) -> None:
    page = desk
    open_more(page)
    options = page.locator("#lora-pick option").evaluate_all("os => os.map((o) => o.value)")
    assert options == ADAPTERS
    assert page.is_hidden("#lora-none")
    add_adapter(page, "ink")
    assert page.evaluate("document.activeElement.id") == "lora-slider-0"  # ready to slide
    for _ in range(10):  # 1 → 0.5 in steps of 0.05, with the keyboard as with a finger
        page.keyboard.press("ArrowLeft")
    assert form_adapters(page) == [("ink", "0.5", "0.5")]
    assert page.locator("#lora-pick option").all_inner_texts() == ["styles/pastel"]
    set_settings(page, prompt="a lighthouse at dusk, inked", size="64x64", steps=2, seed=7)
    show_adapters(page)
    shot(page, "loras-desk-picked")

    posts = record_job_posts(page)
    inked = generate(page)
    assert posts[-1]["loras"] == [{"name": "ink", "scale": 0.5}]
    assert "LoRA ink 0.5" in meta(page, inked), meta(page, inked)

    # The same seed without the adapter: another image.
    remove_adapters(page)
    assert not form_adapters(page)
    assert page.locator("#lora-pick option").all_inner_texts() == ADAPTERS
    plain = generate(page)
    assert "loras" not in posts[-1]
    assert "LoRA" not in meta(page, plain)
    assert image_bytes(page, inked) != image_bytes(page, plain)

    # Re-run carries the adapter and its weight: the same image as the first.
    count = page.locator(RUNS).count()
    card(page, inked).locator(".run-rerun").click()
    again = newest_id(page, count)
    wait_done(page, again)
    page.wait_for_function(
        f"document.querySelector(\"{RUNS}[data-id='{again}'] .result img\")?.complete")
    assert posts[-1]["loras"] == [{"name": "ink", "scale": 0.5}]
    assert "LoRA ink 0.5" in meta(page, again)
    assert image_bytes(page, again) == image_bytes(page, inked)
    shot(page, "loras-desk-cards")

    card(page, inked).locator(".run-copy").click()
    copied = json.loads(page.evaluate("navigator.clipboard.readText()"))
    assert copied["loras"] == [{"name": "ink", "scale": 0.5}]

    card(page, inked).locator(".run-restore").click()  # the form had no adapter
    assert form_adapters(page) == [("ink", "0.5", "0.5")]
    assert "LoRA ink 0.5" in page.inner_text("#more-settings summary")

    # The snippets send them too.
    page.click("#copy-curl")
    assert '"loras": [\n    {\n      "name": "ink",\n      "scale": 0.5' in \
        page.input_value("#code-text")
    page.click("#code-dialog button[value=close]")
    page.click("#copy-python")
    python = page.input_value("#code-text")
    assert 'extra_body={' in python and '"loras": [{"name": "ink", "scale": 0.5}]' in python
    page.click("#code-dialog button[value=close]")

    # In History (once its card is removed from the page) with its adapter; Restore puts it back.
    remove_adapters(page)
    card(page, inked).locator(".run-remove").click()
    entry = page.locator(f"#history-list .entry[data-id='{inked}']")
    entry.wait_for()
    assert "LoRA ink 0.5" in entry.locator(".entry-meta").inner_text()
    entry.locator(".entry-restore-button").click()
    assert form_adapters(page) == [("ink", "0.5", "0.5")]
    assert page.input_value("#prompt") == "a lighthouse at dusk, inked"
    entry.evaluate("e => e.scrollIntoView({block: 'center'})")
    shot(page, "loras-desk-history")
    remove_adapters(page)


def test_adapters_typed_as_prompt_tags_are_shown_and_restored_to_the_list(desk) -> None:
    page = desk
    remove_adapters(page)
    set_settings(page, prompt="a harbour <lora:styles/pastel:0.7>", size="64x64", steps=2, seed=8)
    open_more(page)
    assert page.inner_text("#lora-tags") == "From the prompt's tags: styles/pastel 0.7"
    posts = record_job_posts(page)
    tagged = generate(page)
    assert "loras" not in posts[-1]  # the server reads the tag
    assert "LoRA styles/pastel 0.7" in meta(page, tagged)
    page.fill("#prompt", "something else")
    card(page, tagged).locator(".run-remove").click()
    entry = page.locator(f"#history-list .entry[data-id='{tagged}']")
    entry.wait_for()
    assert "LoRA styles/pastel 0.7" in entry.locator(".entry-meta").inner_text()
    assert entry.locator(".entry-prompt").inner_text() == "a harbour"  # the server took it out
    entry.locator(".entry-restore-button").click()
    assert page.input_value("#prompt") == "a harbour"
    assert form_adapters(page) == [("styles/pastel", "0.7", "0.7")]
    assert page.is_hidden("#lora-tags")

    # Named twice (tag and list): said before anything is sent.
    page.fill("#prompt", "a harbour <lora:styles/pastel>")
    assert "also picked here" in page.inner_text("#lora-tags")
    count = page.locator(RUNS).count()
    page.click("#go")
    assert "also picked under Adapters" in page.inner_text("#prompt-error")
    assert page.locator(RUNS).count() == count
    remove_adapters(page)
    page.fill("#prompt", "a harbour")


def test_another_model_without_the_adapter_drops_it_and_says_so(browser, lora_cluster) -> None:
    context = browser.new_context(viewport=LAPTOP, color_scheme="light")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def two_models(route) -> None:  # the cluster's tiny, and one more without adapters
        listed = route.fetch().json()
        tiny = next(m for m in listed["data"] if m["id"] == "tiny")
        listed["data"].append({**tiny, "id": "plain", "loras": [], "ready_workers": 0})
        route.fulfill(json=listed)

    page.route("**/v1/models", two_models)
    page.goto(lora_cluster.url + "/")
    page.wait_for_function("document.querySelector('#model').value === 'tiny'")
    add_adapter(page, "ink")
    add_adapter(page, "styles/pastel")
    page.select_option("#model", "plain")
    page.wait_for_function("!document.querySelector('#lora-list .lora')")
    note = page.inner_text("#lora-note")
    assert note == "ink, styles/pastel removed: plain has no such adapter.", note
    assert page.inner_text("#lora-none") == "None for plain."
    assert page.is_hidden("#lora-add") and page.is_hidden("#lora-hint")
    show_adapters(page)
    shot(page, "loras-model-switch")
    page.select_option("#model", "tiny")
    assert page.locator("#lora-pick option").all_inner_texts() == ADAPTERS
    assert page.is_hidden("#lora-none")
    context.close()
    assert not errors, errors


def test_an_edit_sends_its_adapters(desk, lora_cluster) -> None:
    page = desk
    remove_adapters(page)
    paste_image(page, halves())
    wait_input(page, (96, 64))
    add_adapter(page, "ink")
    page.evaluate("""() => {
        window.sentLoras = [];
        const fetched = window.fetch;
        window.fetch = (url, options) => {
            if (options?.body instanceof FormData) window.sentLoras.push(options.body.get('loras'));
            return fetched(url, options);
        };
    }""")
    page.fill("#prompt", "an inked edit")
    edited = generate(page)
    assert page.evaluate("window.sentLoras") == ['[{"name":"ink","scale":1}]']
    assert "LoRA ink 1" in meta(page, edited)
    job = httpx.get(f"{lora_cluster.url}/v1/jobs/{edited}", timeout=10).json()
    assert job["request"]["loras"] == [{"name": "ink", "scale": 1}]
    page.click("#input-remove")
    remove_adapters(page)


def test_on_a_phone_the_adapters_fit_the_width(browser, lora_cluster) -> None:
    page = open_page(browser, lora_cluster.url, PHONE, **TOUCH)
    add_adapter(page, "styles/pastel")
    add_adapter(page, "ink")
    show_adapters(page)
    for row in page.locator("#lora-list .lora").all():
        for part in (".lora-name", ".lora-slider", ".lora-scale", ".lora-remove"):
            found = row.locator(part).bounding_box()
            assert found and found["width"] > 20, (part, found)
            assert found["x"] >= 0 and found["x"] + found["width"] <= PHONE["width"], (part, found)
        assert row.locator(".lora-remove").bounding_box()["height"] >= 32  # a thumb's target
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.inner_text("#lora-list .lora-name >> nth=0") == "styles/pastel"
    shot(page, "loras-phone")
    page.context.close()
    assert not page.errors, page.errors


def test_a_model_without_adapters_says_it_has_none(browser, solo_cluster: Cluster) -> None:
    page = open_page(browser, solo_cluster.url, LAPTOP)
    open_more(page)
    assert page.inner_text("#lora-none") == "None for tiny."
    assert page.is_hidden("#lora-add") and page.is_hidden("#lora-list")
    show_adapters(page)
    shot(page, "loras-none")
    page.context.close()
    assert not page.errors, page.errors

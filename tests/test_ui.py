"""The dashboard (``GET /ui``) driven in headless Chromium against a real ``taskserve serve``.

One server and one browser for the module: the tests only add tasks; a second server, which
asks for API keys, serves the test of the page's key form. The browser is the system's
Chromium (Debian's ``chromium``), driven by Playwright, which never downloads one of its own
here. Screenshots of the main view, of a task and of the key form land in
``TASKSERVE_SCREENSHOTS`` (a temporary directory without it); docs/images/ holds copies of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Server, module_server, wait_until

CHROMIUM = os.environ.get("TASKSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVICE = "tests.ui_service:Studio"
TIMEOUT_MS = 15_000

pytestmark = pytest.mark.slow


def _missing(what: str) -> None:
    message = f"The dashboard tests need {what}."
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    broker = f"sqlite:///{tmp_path_factory.mktemp('db') / 'tasks.db'}"
    options = ["--workers", "2", "--concurrency", "4", "--lease", "2", "--grace", "3"]
    with module_server(tmp_path_factory, broker, *options, service=SERVICE) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright (pip install 'taskserve[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("TASKSERVE_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """A browser tab on the dashboard that fails the test on any script error or console error."""

    def __init__(self, browser: Any, server: Server) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1600, "height": 960}, color_scheme="light")
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, hash: str = "") -> Any:
        self.page.goto(f"{self.server.url}/ui{hash}")
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, studio: Server) -> Iterator[Page]:
    page = Page(browser, studio)
    yield page
    page.close()
    assert page.errors == [], f"the page logged errors: {page.errors}"


def submit(server: Server, route: str, args: dict[str, Any], **params: Any) -> str:
    response = httpx.post(f"{server.url}/{route}/submit", json=args, params=params, timeout=10)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def status(server: Server, task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.url}/tasks/{task_id}", timeout=10).json()
    return body


def finished(server: Server, task_id: str) -> None:
    wait_until(lambda: status(server, task_id)["status"] not in ("pending", "in_progress"))


@pytest.fixture(scope="module")
def seeded(studio: Server) -> Iterator[dict[str, str]]:
    """Tasks of every kind, as a service in use has: finished, failed, running, tagged."""
    ids = {}
    for i, prompt in enumerate(["a scenic mountain view", "a lighthouse at dusk", "snowy pines"]):
        ids[f"image{i}"] = submit(
            studio, "generate_image", {"prompt": prompt, "steps": 4, "pause": 0.01}, tag="team:vision"
        )
    for i in range(4):
        submit(studio, "embed", {"texts": [f"document {i}", "another"]}, tag="batch:nightly")
    for i in range(2):
        submit(studio, "transcribe", {"audio_url": f"s3://calls/2025-06-0{i + 1}.wav"}, tag="user:alice")
    ids["failed"] = submit(studio, "moderate", {"text": "please crash"}, tag="user:bob")
    submit(studio, "moderate", {"text": "a friendly note"})
    ids["long_image"] = submit(studio, "generate_image", {"prompt": "city at night", "steps": 300, "pause": 0.1})
    ids["long_call"] = submit(studio, "transcribe", {"audio_url": "s3://calls/board-meeting.wav", "seconds": 60})
    ids["later"] = submit(studio, "transcribe", {"audio_url": "s3://calls/tomorrow.wav"}, delay=3600, tag="user:carol")
    ids["cancelled"] = submit(studio, "generate_image", {"prompt": "a red bicycle", "steps": 300}, tag="team:vision")
    httpx.post(f"{studio.url}/generate_image/cancel", params={"task_id": ids["cancelled"]}, timeout=10)
    for key in ("image0", "image1", "image2", "failed"):
        finished(studio, ids[key])
    wait_until(lambda: (status(studio, ids["long_image"]).get("progress") or {}).get("fraction"))
    yield ids
    for route, key in (("generate_image", "long_image"), ("transcribe", "long_call"), ("transcribe", "later")):
        httpx.post(f"{studio.url}/{route}/cancel", params={"task_id": ids[key]}, timeout=10)


def test_the_page_shows_queues_workers_and_tasks(tab: Page, seeded: dict[str, str], shots: Path) -> None:
    page = tab.open()
    page.locator("#queues tbody tr", has_text="/generate_image").wait_for()
    page.locator(f'#tasks tr[data-task-id="{seeded["failed"]}"]').wait_for()
    assert page.locator("#workers tbody tr").count() == 2
    assert page.locator("#queues tbody tr").count() == 4
    # The full id, never shortened, and a status pill per task.
    assert page.locator(f'#tasks a[href="#/task/{seeded["image0"]}"]').inner_text() == seeded["image0"]
    assert page.locator(f'#tasks tr[data-task-id="{seeded["failed"]}"] .pill').inner_text() == "failed"
    page.locator('#tasks tr .pill[data-status="in_progress"]').first.wait_for()
    page.locator("#workers .running-ids a").first.wait_for()  # running ids come with the next heartbeat
    page.screenshot(path=str(shots / "dashboard.png"))


def test_the_dashboard_is_served_with_a_strict_content_security_policy(studio: Server) -> None:
    for path in ("/ui", "/ui/app.js", "/ui/style.css"):
        response = httpx.get(studio.url + path, timeout=10)
        assert response.status_code == 200
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "unsafe-inline" not in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(studio.url + "/ui/", timeout=10).headers["location"] == "../ui"
    assert httpx.get(studio.url + "/ui/../pyproject.toml", timeout=10).status_code == 404


def test_filters_narrow_the_table(tab: Page, seeded: dict[str, str]) -> None:
    page = tab.open()
    page.locator("#f-status button", has_text="Failed").click()
    page.locator(f'#tasks tr[data-task-id="{seeded["failed"]}"]').wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#tasks tbody .pill')].every(p => p.textContent == 'failed')"
    )
    page.select_option("#f-route", "/generate_image")
    page.locator("#tasks tr.empty").wait_for()
    assert "route=%2Fgenerate_image" in page.url and "status=failure" in page.url


def test_find_a_task_by_its_id_and_cancel_it(tab: Page, studio: Server) -> None:
    task_id = submit(studio, "transcribe", {"audio_url": "s3://calls/long.wav", "seconds": 60})
    page = tab.open()
    page.fill("#search", task_id)
    page.press("#search", "Enter")
    page.locator("#d-id", has_text=task_id).wait_for()
    assert page.url.endswith(f"#/task/{task_id}")
    page.locator("#d-cancel:enabled").click()
    page.locator('#d-status .pill[data-status="cancelled"]').wait_for()
    assert status(studio, task_id)["status"] == "cancelled"
    page.locator(f'#tasks tr[data-task-id="{task_id}"] .pill[data-status="cancelled"]').wait_for()


def test_find_a_task_in_the_table_and_cancel_it(tab: Page, studio: Server) -> None:
    task_id = submit(studio, "transcribe", {"audio_url": "s3://calls/table.wav", "seconds": 60}, tag="case:table")
    page = tab.open()
    page.fill("#f-tag", "case:table")
    page.locator(f'#tasks tr[data-task-id="{task_id}"]').click()
    page.locator("#d-id", has_text=task_id).wait_for()
    page.locator("#d-cancel:enabled").click()
    page.locator('#d-status .pill[data-status="cancelled"]').wait_for()
    assert status(studio, task_id)["status"] == "cancelled"
    assert page.locator("#d-cancel").is_disabled() and page.locator("#d-retry").is_enabled()


def test_a_failure_shows_its_traceback_and_retry_makes_a_new_attempt(
    tab: Page, studio: Server, seeded: dict[str, str], shots: Path
) -> None:
    failed = seeded["failed"]
    page = tab.open(f"#/task/{failed}")
    page.locator("[data-role=error]", has_text="ValueError").wait_for()
    traceback = page.locator("[data-role=traceback]").inner_text()
    assert "in _check" in traceback and "ui_service.py" in traceback and "blocked token" in traceback
    assert '"text": "please crash"' in page.locator("[data-role=arguments]").inner_text()
    page.screenshot(path=str(shots / "dashboard-failure.png"))
    page.click("#d-retry")
    page.wait_for_url(lambda url: "#/task/" in url and not url.endswith(failed))
    new_id = page.url.rsplit("/", 1)[-1]
    page.locator(f'#d-body a[href="#/task/{failed}"]').wait_for()  # "Retry of" links back
    page.locator('#d-status .pill[data-status="failure"]').wait_for()
    retried = status(studio, new_id)
    assert retried["retry_of"] == failed and retried["status"] == "failure" and retried["attempts"] == 1


def wait_loaded(page: Any, selector: str) -> None:
    """Until the picture has arrived and decoded, not only until its element exists."""
    page.wait_for_function("s => (document.querySelector(s) || {}).naturalWidth > 0", arg=selector)


def test_an_image_result_and_its_previews_are_shown_as_pictures(tab: Page, studio: Server, shots: Path) -> None:
    task_id = submit(studio, "generate_image", {"prompt": "a scenic mountain view", "steps": 25, "pause": 0.12})
    page = tab.open(f"#/task/{task_id}")
    wait_loaded(page, "img[data-role=preview]")
    wait_loaded(page, "img[data-role=result-image]")
    assert page.eval_on_selector("img[data-role=result-image]", "img => img.naturalWidth") == 256
    page.locator("#d-body h3", has_text="Arguments").scroll_into_view_if_needed()
    page.evaluate("document.getElementById('d-body').scrollTop = 0")
    page.screenshot(path=str(shots / "dashboard-task.png"))


def test_task_data_is_shown_as_text_never_as_markup(tab: Page, studio: Server) -> None:
    html = '<img src=x onerror="document.body.dataset.pwned=1">'
    task_id = submit(studio, "moderate", {"text": f"crash {html}"}, tag=f"note:{html}")
    finished(studio, task_id)
    page = tab.open(f"#/task/{task_id}")
    page.locator("[data-role=traceback]").wait_for()
    assert html in page.locator("[data-role=error]").inner_text()
    assert page.evaluate("document.body.dataset.pwned") is None
    assert page.locator("#d-body img").count() == 0


# -- API keys ----------------------------------------------------------------------------------

KEY_A, KEY_B, KEY_OPS = "alice-secret-1", "bob-secret-2", "ops-secret-3"
# Chromium logs every 401 answer as a console error; the page asking for a key is how it works.
REFUSED = "status of 401"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second server that asks for API keys: alice and bob see their own tasks, ops sees all."""
    broker = f"sqlite:///{tmp_path_factory.mktemp('db') / 'tasks.db'}"
    options = ["--workers", "1", "--concurrency", "4", "--lease", "2", "--grace", "3"]
    options += ["--api-key", f"alice={KEY_A}", "--api-key", f"bob={KEY_B}", "--admin-key", f"ops={KEY_OPS}"]
    with module_server(tmp_path_factory, broker, *options, service=SERVICE) as server:
        yield server


def give_key(page: Any, key: str) -> None:
    page.locator("#key-dialog[open] #key-input").fill(key)
    page.locator("#key-dialog[open] button[type=submit]").click()


def test_the_page_asks_for_a_key_keeps_it_for_the_session_and_shows_only_the_callers_tasks(
    browser: Any, guarded: Server, shots: Path
) -> None:
    from taskserve import SyncHTTPClient

    with SyncHTTPClient(guarded.url, api_key=KEY_A) as alice, SyncHTTPClient(guarded.url, api_key=KEY_B) as bob:
        mine = alice.transcribe.submit(audio_url="s3://alice/long.wav", seconds=60).id
        picture = alice.generate_image.submit(prompt="alice's lighthouse", steps=20, pause=0.1).id
        theirs = bob.transcribe.submit(audio_url="s3://bob/long.wav", seconds=60).id
    tabs: list[Page] = []
    try:
        tab = Page(browser, guarded)
        tabs.append(tab)
        refused: list[str] = []
        tab.page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
        page = tab.open()
        # No key yet: the form, and no task of anyone's behind it.
        page.locator("#key-dialog[open] #key-input").wait_for()
        assert page.locator("#tasks tbody tr[data-task-id]").count() == 0
        page.screenshot(path=str(shots / "dashboard-key.png"))
        page.keyboard.press("Escape")  # closing the form would leave the page waiting for good
        assert page.locator("#key-dialog").evaluate("d => d.open")

        give_key(page, "not-a-key")
        page.locator("#key-dialog[open] #key-error", has_text="refused").wait_for()
        assert page.locator("#tasks tbody tr[data-task-id]").count() == 0
        # While the form waits, the page does not keep polling into 401s.
        seen = len(refused)
        page.wait_for_timeout(1600)  # one polling period: nothing may happen in it
        assert len(refused) == seen and seen <= 10, refused

        give_key(page, KEY_A)
        page.locator(f'#tasks tr[data-task-id="{mine}"]').wait_for()
        page.locator(f'#tasks tr[data-task-id="{picture}"]').wait_for()
        assert not page.locator("#key-dialog").evaluate("d => d.open")
        assert page.locator(f'#tasks tr[data-task-id="{theirs}"]').count() == 0
        # Kept for this tab's session only: not in localStorage, not in a cookie.
        assert page.evaluate("sessionStorage.getItem('taskserve.apiKey')") == KEY_A
        assert page.evaluate("localStorage.length") == 0
        assert tab.context.cookies() == []
        assert page.evaluate("document.cookie") == ""

        # Pictures come through with the key too (an <img src> could not carry it).
        page.goto(f"{guarded.url}/ui#/task/{picture}")
        wait_loaded(page, "img[data-role=preview]")
        wait_loaded(page, "img[data-role=result-image]")
        assert not page.locator("#key-dialog").evaluate("d => d.open")  # a reload keeps the key

        page.locator(f'#tasks tr[data-task-id="{mine}"]').click()
        page.locator("#d-id", has_text=mine).wait_for()
        page.locator("#d-cancel:enabled").click()
        page.locator('#d-status .pill[data-status="cancelled"]').wait_for()
        with SyncHTTPClient(guarded.url, api_key=KEY_OPS) as ops:
            assert ops.transcribe.task(mine).status()["status"] == "cancelled"

        # Forgetting the key empties the page and asks again.
        page.locator("#forget-key").click()
        page.locator("#key-dialog[open] #key-input").wait_for()
        assert page.evaluate("sessionStorage.length") == 0
        assert page.locator("#tasks tbody tr[data-task-id]").count() == 0

        # A new session asks again; the admin key sees everyone's tasks.
        other = Page(browser, guarded)
        tabs.append(other)
        page = other.open()
        page.locator("#key-dialog[open] #key-input").wait_for()
        give_key(page, KEY_OPS)
        page.locator(f'#tasks tr[data-task-id="{theirs}"]').wait_for()
        page.locator(f'#tasks tr[data-task-id="{picture}"]').wait_for()
    finally:
        for tab in tabs:
            tab.close()
        with SyncHTTPClient(guarded.url, api_key=KEY_OPS) as ops:
            ops.transcribe.task(theirs).cancel()
    for tab in tabs:
        errors = [e for e in tab.errors if REFUSED not in e]
        assert errors == [], f"the page logged errors: {errors}"

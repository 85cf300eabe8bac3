"""The page in a real browser against a server in keys mode (GROK3D_AUTH=keys): it asks for the key when the server
answers 401, keeps it in the browser, runs a job with it and shows the job's model, whose files it fetched with
the key. Chromium and the helpers as in tests/test_page.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.db import sqlite_url
from pipeline.jobs import JobStore
from pipeline.keys import KeyStore
from tests.server import Server
from tests.test_page import STAGE_SLEEP_S, browser, count_loads, tab  # noqa: F401 (browser, tab: shared fixtures)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key", "GROK3D_AUTH": "keys",
           "TEST_IMAGE_SLEEP_S": STAGE_SLEEP_S, "TEST_3D_SLEEP_S": STAGE_SLEEP_S,
           "TEST_CONVERT_SLEEP_S": STAGE_SLEEP_S}
    with Server(tmp_path_factory.mktemp("keys-page"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def key(server) -> str:
    store = JobStore(sqlite_url(server.data_dir / "grok3d.db"))
    try:
        return KeyStore(store).create("browser")[1]
    finally:
        store.close()


def test_the_page_asks_for_the_key_then_runs_a_job_with_it(tab, server, key):
    tab.page.wait_for_selector(".card")  # examples need no key
    assert tab.page.locator("#key-form").is_hidden()
    tab.page.fill("#prompt", "a keyed teapot")
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_selector("#key-form:not([hidden])")
    tab.shot("key-asked")
    assert tab.text("#key-message").startswith("This server needs an API key")
    assert tab.page.locator("#error").is_hidden()

    count_loads(tab)
    tab.page.fill("#api-key", key)
    tab.page.click("#save-key")  # the prompt goes again, now with the key
    tab.page.wait_for_selector("#progress:not([hidden])")
    assert tab.page.locator("#key-form").is_hidden()
    tab.wait_viewer()
    tab.shot("key-job-done")
    assert tab.text("#result-title") == "a keyed teapot"
    # The job's files came with the key, so the viewer and the links hold object URLs of them.
    loads = tab.page.evaluate("window.loads")
    assert len(loads) == 1 and loads[0].startswith("blob:"), loads
    assert tab.dimensions() == pytest.approx([0.5, 0.3, 0.4], abs=1e-4)
    for link in ("#dl-image", "#dl-glb", "#dl-usdz"):
        assert tab.page.locator(link).get_attribute("href").startswith("blob:")
    assert tab.page.evaluate("localStorage.getItem('grok3d.apiKey')") == key
    # The key travels in a header, never in an address.
    assert not any(key in url for url in tab.requests)

    # Remembered: a reload follows the job from the address without asking again.
    tab.page.reload()
    tab.wait_viewer()
    assert tab.page.locator("#key-form").is_hidden()
    assert tab.text("#result-title") == "a keyed teapot"


def test_a_refused_key_is_forgotten_and_asked_for_again(tab):
    tab.page.evaluate("localStorage.setItem('grok3d.apiKey', 'g3d_' + 'x'.repeat(43))")
    tab.page.fill("#prompt", "a teapot")
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_selector("#key-form:not([hidden])")
    assert tab.text("#key-message").startswith("The server did not accept that API key")
    assert tab.page.evaluate("localStorage.getItem('grok3d.apiKey')") is None

"""The demo page at "/" in a real browser: Debian's chromium driven by Playwright, against the real `bentoml serve`
with the test stages of tests/stages.py behind it. Screenshots go to test-output/ for a person to look at."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trimesh
import uvicorn
from fastapi import FastAPI
from playwright import sync_api

from pipeline.web import mount_web
from tests.inprocess import AppServer
from tests.server import ROOT, Server, free_port

CHROMIUM = "/usr/bin/chromium"
# Headless chromium on a machine without a GPU: WebGL through ANGLE on Mesa's llvmpipe (software OpenGL; the Makefile
# installs it with chromium). Chromium's own SwiftShader works too, but each model-viewer load cost its GPU process
# 8-11 CPU-s there against 2.4-2.8 on llvmpipe (2 cores, measured): llvmpipe keeps the compiled shaders for the next
# page. llvmpipe is on chromium's GPU blocklist, hence --ignore-gpu-blocklist: without it there is no WebGL at all.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--use-gl=angle", "--use-angle=gl-egl", "--ignore-gpu-blocklist"]
SCREENSHOTS = ROOT / "test-output"
STAGE_SLEEP_S = "1"
LOAD_TIMEOUT_MS = 60_000  # llvmpipe compiles model-viewer's shaders on the CPU: seconds on a busy machine

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key", "TEST_IMAGE_SLEEP_S": STAGE_SLEEP_S,
           "TEST_3D_SLEEP_S": STAGE_SLEEP_S, "TEST_CONVERT_SLEEP_S": STAGE_SLEEP_S}
    with Server(tmp_path_factory.mktemp("page"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    # Never skipped: .ci/run installs chromium, and a page left untested should fail loudly.
    assert Path(CHROMIUM).exists(), "the page tests need Debian's chromium: apt-get install chromium"
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # model-viewer fires `load` even where WebGL is missing: make sure the tests below really draw the models.
        page = b.new_page()
        renderer = page.evaluate("""() => { const gl = document.createElement('canvas').getContext('webgl2');
            return gl && gl.getParameter(gl.getExtension('WEBGL_debug_renderer_info').UNMASKED_RENDERER_WEBGL); }""")
        page.close()
        assert renderer and "llvmpipe" in renderer, \
            f"chromium's WebGL is {renderer!r}, not Mesa's llvmpipe: apt-get install libegl-mesa0 libgl1-mesa-dri"
        yield b
        b.close()


class Tab:
    """One page plus what it did: JavaScript errors and every URL it requested."""

    def __init__(self, browser, server: Server, width: int = 1100, height: int = 900,
                 reduced_motion: str = "reduce") -> None:
        # Reduced motion, as a visitor may ask for: the model holds still once shown (the page then stops redrawing
        # it, which llvmpipe does on the CPU); the test below checks the page honours both preferences.
        self.context = browser.new_context(viewport={"width": width, "height": height}, reduced_motion=reduced_motion)
        self.page = self.context.new_page()
        self.page.set_default_timeout(LOAD_TIMEOUT_MS)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(server.url + "/")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(SCREENSHOTS / f"page-{name}.png"), full_page=True)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def wait_viewer(self, state: str = "loaded") -> None:
        self.page.wait_for_selector(f"#viewer[data-state={state}]")

    def dimensions(self) -> list[float]:
        d = self.page.evaluate("document.getElementById('viewer').getDimensions()")
        return [d["x"], d["y"], d["z"]]


def test_the_model_holds_still_for_visitors_who_ask_for_less_motion(browser, server):
    """prefers-reduced-motion: the viewer turns the model by itself and wiggles its prompt only for visitors who did
    not ask for less motion, and follows a change of the preference while the page is open."""
    t = Tab(browser, server, reduced_motion="no-preference")
    try:
        viewer = t.page.locator("#viewer")
        assert viewer.get_attribute("auto-rotate") is not None
        assert viewer.get_attribute("interaction-prompt") == "auto"
        t.page.emulate_media(reduced_motion="reduce")
        t.page.wait_for_function("!document.getElementById('viewer').hasAttribute('auto-rotate')")
        assert viewer.get_attribute("interaction-prompt") == "none"
    finally:
        t.context.close()
    assert t.errors == []
    still = Tab(browser, server)  # what the other tests use
    try:
        assert still.page.locator("#viewer").get_attribute("auto-rotate") is None
    finally:
        still.context.close()


@pytest.fixture()
def tab(browser, server) -> Iterator[Tab]:
    t = Tab(browser, server)
    yield t
    t.context.close()
    assert t.errors == [], t.errors


def count_loads(tab: Tab) -> None:
    """Record every `load` event of <model-viewer> in window.loads, independently of the page's own handlers."""
    tab.page.evaluate("""() => { window.loads = [];
        const v = document.getElementById('viewer');
        v.addEventListener('load', () => window.loads.push(v.getAttribute('src'))); }""")


def test_example_card_opens_and_model_viewer_loads_its_glb(tab, server):
    examples = httpx.get(server.url + "/api/examples").json()["examples"]
    first = examples[0]
    tab.page.wait_for_selector(".card")
    assert tab.page.locator(".card").count() == len(examples)
    assert tab.page.locator(".card .name").all_inner_texts() == [e["name"] for e in examples]
    count_loads(tab)
    before = len(tab.requests)
    tab.page.locator(f".card[data-job-id='{first['job_id']}']").click()
    tab.page.wait_for_function("window.loads.length > 0")
    tab.wait_viewer()
    tab.shot("example")

    asset = f"/api/asset/{first['job_id']}?asset_type="
    assert tab.page.evaluate("window.loads") == [asset + "glb"]
    viewer = tab.page.locator("#viewer")
    assert viewer.get_attribute("ios-src") == f"/api/jobs/{first['job_id']}/model.usdz"  # ends in .usdz
    assert "quick-look" in viewer.get_attribute("ar-modes") and "scene-viewer" in viewer.get_attribute("ar-modes")
    assert tab.page.evaluate("document.getElementById('viewer').loaded") is True
    # The viewer shows the example's own mesh: its size as model-viewer measures it is the GLB's on disk.
    slug = first["job_id"].removeprefix("ex_")
    extents = trimesh.load(ROOT / "examples" / slug / "model.glb").extents
    assert tab.dimensions() == pytest.approx(list(extents), abs=1e-4)
    # It opened at once: no status round trip, only the example's own files.
    opened = tab.requests[before:]
    assert not any("/api/status/" in u for u in opened), opened
    for link, kind, suffix in (("#dl-image", "image", "jpg"), ("#dl-glb", "glb", "glb"), ("#dl-usdz", "usdz", "usdz")):
        assert tab.page.locator(link).get_attribute("href") == asset + kind
        assert tab.page.locator(link).get_attribute("download") == f"{first['job_id']}.{suffix}"
    # model-viewer and everything else came from our server: no CDN.
    assert all(u.startswith(server.url) or u.startswith("data:") for u in tab.requests), tab.requests
    assert server.url + "/static/model-viewer.min.js" in tab.requests


def test_job_shows_progress_advancing_then_the_model(tab, server):
    # A MutationObserver sees every value the bar takes, however briefly.
    tab.page.evaluate("""() => { window.steps = [];
        const bar = document.getElementById('bar'), stage = document.getElementById('stage');
        const note = () => window.steps.push([bar.value, stage.textContent]);
        new MutationObserver(note).observe(stage, {childList: true, characterData: true, subtree: true}); }""")
    count_loads(tab)
    tab.page.fill("#prompt", "a red teapot")
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_function("window.steps.some(s => s[1].startsWith('Building the 3D model'))")
    tab.shot("progress")
    tab.wait_viewer()
    tab.shot("job-done")

    steps = tab.page.evaluate("window.steps")
    values = [v for v, _ in steps]
    assert values == sorted(values), steps
    assert len(set(values)) >= 3, steps
    words = " | ".join(text for _, text in steps)
    for stage in ("Painting the picture", "Building the 3D model", "Making the AR file"):
        assert stage in words, steps
    assert tab.page.locator("#progress").is_hidden()
    assert tab.text("#result-title") == "a red teapot"
    job_id = tab.page.evaluate("location.hash").removeprefix("#job=")
    assert tab.page.evaluate("window.loads") == [f"/api/asset/{job_id}?asset_type=glb"]
    # tests/stages.py makes a 0.5 x 0.3 x 0.4 m box: the viewer shows that mesh, not a leftover.
    assert tab.dimensions() == pytest.approx([0.5, 0.3, 0.4], abs=1e-4)
    status = httpx.get(f"{server.url}/api/status/{job_id}").json()
    assert status["status"] == "complete"
    # Followed over Server-Sent Events: one stream, and no status poll.
    assert [u for u in tab.requests if f"/api/status/{job_id}" in u] == [f"{server.url}/api/status/{job_id}/events"]


def test_a_broken_event_stream_falls_back_to_polling(tab, server):
    tab.page.route("**/events", lambda route: route.abort("connectionreset"))
    tab.page.fill("#prompt", "a blue teapot")
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_selector("#result:not([hidden])")
    job_id = tab.page.evaluate("location.hash").removeprefix("#job=")
    assert tab.text("#result-title") == "a blue teapot"
    assert f"{server.url}/api/status/{job_id}" in tab.requests  # polled


def test_a_chosen_picture_becomes_a_model_and_joins_the_job_list(tab, server):
    """Image to 3D from the page: a PNG chosen in the file field (as a person would pick one) goes as a form with
    the words as its caption; the model loads, the new downloads are offered, and the job's card shows its
    preview."""
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (96, 96), (250, 250, 250)).save(picture, "PNG")
    count_loads(tab)
    tab.page.set_input_files("#image", files=[{"name": "teapot.png", "mimeType": "image/png",
                                                "buffer": picture.getvalue()}])
    assert tab.text("#picked-name") == "Picture: teapot.png"
    tab.page.fill("#prompt", "my teapot")
    tab.page.click("#generate")
    tab.wait_viewer()
    tab.shot("upload-done")
    job_id = tab.page.evaluate("location.hash").removeprefix("#job=")
    status = httpx.get(f"{server.url}/api/status/{job_id}").json()
    assert status["source"] == "upload" and status["prompt"] == "my teapot"
    assert tab.text("#result-title") == "my teapot"
    assert tab.page.evaluate("window.loads") == [f"/api/asset/{job_id}?asset_type=glb"]
    assert tab.page.locator("#viewer").get_attribute("ios-src") == f"/api/jobs/{job_id}/model.usdz"
    for kind, suffix in (("glb_textured", "textured.glb"), ("obj", "obj.zip"), ("fbx", "fbx"), ("stl", "stl"),
                         ("3mf", "3mf")):
        link = tab.page.locator(f"#dl-{kind}")
        assert link.get_attribute("href") == f"/api/asset/{job_id}?asset_type={kind}"
        assert link.get_attribute("download") == f"{job_id}.{suffix}"
    assert "faces" in tab.text("#mesh-report")
    card = tab.page.locator(f"#job-list .card[data-job-id='{job_id}'] img")
    assert card.get_attribute("src") == f"/api/jobs/{job_id}/preview.jpg"
    tab.page.wait_for_function(f"document.querySelector(\"#job-list .card[data-job-id='{job_id}'] img\").naturalWidth > 0")


def test_a_dropped_picture_is_taken_too(tab):
    tab.page.evaluate("""() => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array([137, 80, 78, 71])], "dropped.png", {type: "image/png"}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""")
    assert tab.text("#picked-name") == "Picture: dropped.png"
    assert tab.page.evaluate("document.getElementById('image').files[0].name") == "dropped.png"
    tab.page.click("#clear-image")
    assert tab.page.locator("#picked").is_hidden()


def test_job_error_is_shown_in_words(tab):
    tab.page.fill("#prompt", "fail-image: a teapot")
    tab.page.click("#generate")
    tab.page.wait_for_selector("#error:not([hidden])")
    tab.shot("job-error")
    assert tab.text("#error") == "xAI rejected the prompt: test refusal."
    assert tab.page.locator("#progress").is_hidden()
    assert tab.page.locator("#result").is_hidden()


def test_a_refused_request_shows_the_servers_error(tab):
    tab.page.fill("#prompt", "x" * 1100)
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_selector("#error:not([hidden])")
    assert tab.text("#error") == "Prompt too long (max 1024 characters)"
    assert tab.page.locator("#progress").is_hidden()


def test_an_unreachable_server_is_said_in_words(tab, server):
    # The connection is refused at the browser's network layer, as it is when the server is down.
    tab.page.route(server.url + "/api/**", lambda route: route.abort("connectionrefused"))
    tab.page.fill("#prompt", "a teapot")
    tab.page.press("#prompt", "Enter")
    tab.page.wait_for_selector("#error:not([hidden])")
    tab.shot("unreachable")
    assert tab.text("#error").startswith("The server cannot be reached.")


def submit_in_a_new_tab(browser, server: Server, shot: str, prompt: str = "a teapot") -> str:
    """Submit from the page of `server`; -> the error the page shows (a screenshot goes to test-output/)."""
    t = Tab(browser, server)
    try:
        t.page.fill("#prompt", prompt)
        t.page.press("#prompt", "Enter")
        t.page.wait_for_selector("#error:not([hidden])")
        assert t.page.locator("#progress").is_hidden()
        t.shot(shot)
        return t.text("#error")
    finally:
        t.context.close()
        assert t.errors == []


def test_a_full_queue_says_so_and_when_to_try_again(browser, tmp_path):
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key", "GROK3D_QUEUE_MAX": "1",
           "GROK3D_RETRY_AFTER_S": "7", "TEST_IMAGE_SLEEP_S": "60"}
    with AppServer(tmp_path, env) as srv:  # the page showing an answer: no BentoML needed (tests/inprocess.py)
        assert httpx.post(srv.url + "/api/generate", json={"prompt": "a cat"}).status_code == 200  # fills it
        shown = submit_in_a_new_tab(browser, srv, "queue-full")
    assert shown == "Too many jobs queued, retry later (try again in 7 s)"


def test_a_server_without_an_xai_key_says_what_is_missing(browser, tmp_path):
    with AppServer(tmp_path, {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": ""}) as srv:
        shown = submit_in_a_new_tab(browser, srv, "no-xai-key")
    assert shown == "Image generation is not configured: set XAI_API_KEY"


def test_unknown_job_in_the_address_says_job_not_found(browser, server):
    t = Tab(browser, server)
    t.page.goto(server.url + "/#job=00000000")
    t.page.reload()
    t.page.wait_for_selector("#error:not([hidden])")
    assert t.text("#error") == "Job not found"
    t.context.close()
    assert t.errors == []


def test_phone_viewport_has_no_sideways_scroll_and_every_control_is_reachable_by_tab(browser, server):
    t = Tab(browser, server, width=390, height=844)
    t.page.wait_for_selector(".card")
    t.page.locator(".card").first.click()
    t.wait_viewer()
    t.shot("phone")
    assert t.page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")

    # Every visible control gets a key; then Tab walks the page from the top and must meet each one.
    controls = t.page.evaluate("""() => {
        const all = [...document.querySelectorAll('a[href], button, input, model-viewer')]
            .filter(el => el.getClientRects().length > 0);
        all.forEach((el, i) => el.dataset.key = String(i));
        return all.map(el => el.dataset.key); }""")
    assert len(controls) >= 10  # prompt, button, 3 downloads, the viewer, 3 cards, 2 footer links
    t.page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    reached: list[str] = []
    for _ in range(3 * len(controls)):
        t.page.keyboard.press("Tab")
        focus = t.page.evaluate("""() => { const el = document.activeElement, r = el.getBoundingClientRect();
            return {key: el.dataset.key || null, left: r.left, right: r.right}; }""")
        if focus["key"] is not None:
            reached.append(focus["key"])
            # What has focus can be seen: it lies within the phone's width.
            assert focus["left"] >= 0 and focus["right"] <= 390, focus
    assert set(controls) <= set(reached), (controls, reached)
    t.context.close()
    assert t.errors == []


def test_page_without_model_viewer_says_the_viewer_is_not_installed(browser, tmp_path):
    """A checkout where `npm ci --prefix web` has not run: mount_web over a web folder with no node_modules,
    served by uvicorn on 127.0.0.1. The page still loads and says in words what is missing."""
    web = tmp_path / "web"
    web.mkdir()
    for name in ("index.html", "app.js", "style.css"):
        shutil.copy(ROOT / "web" / name, web / name)
    app = FastAPI()
    mount_web(app, web)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/static/model-viewer.min.js").status_code == 404
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#notice:not([hidden])")
        page.screenshot(path=str(SCREENSHOTS / "page-no-viewer.png"), full_page=True)
        assert page.locator("#notice").inner_text().startswith("The 3D viewer is not installed on this server")
        assert page.locator("#prompt").is_visible()
        page.close()
    finally:
        uv.should_exit = True
        thread.join(10)


def test_bentoml_ui_stays_reachable_at_bentoml(browser, server):
    """Our page owns "/", so BentoML's Swagger UI is served at /bentoml (service.py calls mount_bentoml_ui); it
    still reads BentoML's own /docs.json and /static_content, which are local files: it renders offline."""
    page = browser.new_page()
    page.set_default_timeout(15_000)
    specs: list[int] = []
    page.on("response", lambda r: specs.append(r.status) if r.url == server.url + "/docs.json" else None)
    page.goto(server.url + "/bentoml")
    page.wait_for_function("(document.querySelector('.swagger-ui .info .title') || {}).textContent")
    assert "grok3d" in page.locator(".swagger-ui .info .title").text_content()
    assert specs == [200]
    page.close()


def test_fastapi_docs_stay_at_api_docs(browser, server):
    """FastAPI's docs at /api/docs render offline: Swagger UI's files come from BentoML's local copies."""
    page = browser.new_page()
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
    page.goto(server.url + "/api/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
    assert "grok3d" in page.locator(".swagger-ui .info .title").text_content()
    assert page.locator(".opblock-summary-path", has_text="/api/generate").count() == 1
    assert outside == []
    page.close()
    spec = httpx.get(server.url + "/api/openapi.json").json()
    assert "/api/generate" in spec["paths"] and "/" not in spec["paths"]  # the page's routes stay out of it
"""Answers from the field, through the app: the real xAI client in the image stage, the fake xAI server answering as
providers really do (issue 12). Served in process (tests/inprocess.py): the answers are the xAI client's and the
orchestrator's business, not BentoML's."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.fakes.xai import FakeXai
from tests.inprocess import AppServer
from tests.server import wait_job


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXai]:
    with FakeXai() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeXai) -> Iterator[AppServer]:
    env = {"GROK3D_STAGES": "tests.stages:real_image", "XAI_API_KEY": fake.api_key, "XAI_BASE_URL": fake.base_url}
    with AppServer(tmp_path_factory.mktemp("xai-served"), env) as srv:
        yield srv


def test_a_wrapped_data_uri_without_padding_makes_a_job(server: AppServer, fake: FakeXai) -> None:
    fake.configure(b64_style="wrapped", image_size=320)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job_id = client.post("/api/generate", json={"prompt": "a red teapot"}).json()["job_id"]
        body = wait_job(client, job_id)
        assert body["status"] == "complete", body
        image = client.get(f"/api/asset/{job_id}", params={"asset_type": "image"})
    [call] = fake.requests
    assert call.body["response_format"] == "b64_json" and call.status == 200
    picture = Image.open(io.BytesIO(image.content))
    assert picture.format == "JPEG" and picture.size == (320, 320)

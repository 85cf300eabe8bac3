"""The xAI image client against the fake xAI server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import StageError
from pipeline.prompts import DEFAULT_PROMPT_TEMPLATE, render_prompt
from pipeline.xai import XaiImageClient, _retry_after_s, decode_b64_image, to_jpeg
from tests.fakes.xai import MODERATION_MESSAGE, FakeXai, draw_object, fake_xai  # noqa: F401 - fixture

MakeClient = Callable[..., XaiImageClient]


@pytest.fixture
async def make_client(fake_xai: FakeXai) -> AsyncIterator[MakeClient]:
    """Clients for the fake server with fast backoff; closed after the test."""
    clients: list[XaiImageClient] = []

    def make(**overrides: Any) -> XaiImageClient:
        options: dict[str, Any] = {
            "api_key": fake_xai.api_key,
            "base_url": fake_xai.base_url,
            "timeout_s": 5.0,
            "max_retries": 3,
            "backoff_base_s": 0.01,
            "backoff_cap_s": 0.05,
        }
        options.update(overrides)
        client = XaiImageClient(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def _decoded_jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- success paths -----------------------------------------------------------------------------------
async def test_b64_data_uri_request_and_answer(fake_xai: FakeXai, make_client: MakeClient) -> None:
    client = make_client()
    jpeg = await client.generate_image("a red {teapot}")
    image = _decoded_jpeg(jpeg)
    assert image.size == (1024, 1024)
    [request] = fake_xai.requests
    assert request.headers["authorization"] == f"Bearer {fake_xai.api_key}"
    assert request.headers["content-type"].startswith("application/json")
    assert request.body["model"] == "grok-imagine-image"
    assert request.body["response_format"] == "b64_json"
    # The user's words, braces and all, inside the 3D-friendly template.
    assert request.body["prompt"] == DEFAULT_PROMPT_TEMPLATE.replace("{prompt}", "a red {teapot}")
    # The fake draws deterministically per prompt, so the picture is the one for the wrapped prompt.
    expected = np.asarray(draw_object(request.body["prompt"]).resize((64, 64)), dtype=float)
    got = np.asarray(image.convert("RGB").resize((64, 64)), dtype=float)
    assert np.abs(expected - got).mean() < 4
    other = np.asarray(draw_object("a blue {teapot}").resize((64, 64)), dtype=float)
    assert np.abs(other - got).mean() > 4


async def test_plain_base64_is_accepted(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.configure(b64_style="plain", image_size=256)
    assert _decoded_jpeg(await make_client().generate_image("a chair")).size == (256, 256)


async def test_wrapped_data_uri_without_padding_is_accepted(fake_xai: FakeXai, make_client: MakeClient) -> None:
    """Issue 12: a data URI whose base64 runs over several lines and lacks its padding, as answers arrive."""
    fake_xai.configure(b64_style="wrapped", image_size=256)
    jpeg = await make_client().generate_image("a chair")
    assert _decoded_jpeg(jpeg).size == (256, 256)


async def test_url_mode_downloads_without_the_key(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.configure(image_size=300)
    jpeg = await make_client(response_format="url").generate_image("a lamp")
    assert _decoded_jpeg(jpeg).size == (300, 300)
    assert fake_xai.requests[0].body["response_format"] == "url"
    [download] = fake_xai.downloads
    assert "authorization" not in {k.lower() for k in download.headers}


async def test_png_is_converted_to_jpeg(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.configure(image_format="png", image_size=200)
    for response_format in ("b64_json", "url"):
        jpeg = await make_client(response_format=response_format).generate_image("a mug")
        assert _decoded_jpeg(jpeg).mode == "RGB"


async def test_custom_model_and_template(fake_xai: FakeXai, make_client: MakeClient) -> None:
    client = make_client(model="grok-imagine-image-quality", prompt_template="3D object: {prompt}!")
    await client.generate_image("  a boat ")
    assert fake_xai.requests[0].body["model"] == "grok-imagine-image-quality"
    assert fake_xai.requests[0].body["prompt"] == "3D object: a boat!"


# ---- failures that are not retried ------------------------------------------------------------------
async def test_wrong_key_is_rejected_without_retries(fake_xai: FakeXai, make_client: MakeClient) -> None:
    with pytest.raises(StageError) as caught:
        await make_client(api_key="xai-wrong-key").generate_image("a cat")
    assert "rejected the API key" in caught.value.message
    assert "wrong" not in caught.value.message  # no part of the key reaches the user
    assert not caught.value.retryable
    assert len(fake_xai.requests) == 1 and fake_xai.requests[0].status == 400


async def test_401_is_a_rejected_key(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("unauthorized")
    with pytest.raises(StageError, match="rejected the API key"):
        await make_client().generate_image("a cat")
    assert [r.status for r in fake_xai.requests] == [401]


async def test_moderation_refusal_carries_xai_message(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("moderation", times=1, message="Prompt violates the usage policy")
    with pytest.raises(StageError) as caught:
        await make_client().generate_image("something forbidden")
    assert caught.value.message == "xAI rejected the prompt: Prompt violates the usage policy."
    assert len(fake_xai.requests) == 1
    fake_xai.fail("moderation")  # the default text, always
    with pytest.raises(StageError, match=f"^xAI rejected the prompt: {MODERATION_MESSAGE}$"):
        await make_client().generate_image("again")


async def test_unknown_model(fake_xai: FakeXai, make_client: MakeClient) -> None:
    with pytest.raises(StageError, match="does not offer the image model 'grok-9-image'"):
        await make_client(model="grok-9-image").generate_image("a cat")
    assert [r.status for r in fake_xai.requests] == [404]


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_answer_that_is_not_an_image(
    fake_xai: FakeXai, make_client: MakeClient, response_format: str
) -> None:
    fake_xai.fail("not_image")
    with pytest.raises(StageError, match="answer was not an image"):
        await make_client(response_format=response_format).generate_image("a cat")
    assert len(fake_xai.requests) == 1


PAYLOAD = bytes(range(256)) * 3 + b"grok3d!!"  # 776 bytes: its base64 ends in one `=`


def _wrap(text: str, width: int, newline: str) -> str:
    return newline.join(text[i : i + width] for i in range(0, len(text), width))


@pytest.mark.parametrize("payload", [PAYLOAD, PAYLOAD[:-1], PAYLOAD[:-2]], ids=["pad1", "pad2", "pad0"])
@pytest.mark.parametrize("form", [
    "{b64}",
    "data:image/jpeg;base64,{b64}",
    "data:image/png;base64,{b64}",
    "data:image/webp;base64,{b64}",
    "DATA:Image/JPEG;BASE64,{b64}",  # scheme and media type are case-insensitive
    "data:image/jpeg;name=teapot.jpg;base64,{b64}",  # a media type parameter (RFC 2397)
    "  data:image/jpeg;base64,{b64}\n",
    "{b64_unpadded}",
    "data:image/jpeg;base64,{b64_unpadded}",
    "data:image/jpeg;base64,{b64_mime}",  # MIME lines of 76 characters, CRLF
    "data:image/jpeg;base64,{b64_lf_unpadded}",
    "{b64_spaced}",
])
def test_b64_as_providers_send_it(payload: bytes, form: str) -> None:
    b64 = base64.b64encode(payload).decode()
    text = form.format(b64=b64, b64_unpadded=b64.rstrip("="), b64_mime=_wrap(b64, 76, "\r\n"),
                       b64_lf_unpadded=_wrap(b64.rstrip("="), 64, "\n"), b64_spaced=_wrap(b64, 4, " \t"))
    assert decode_b64_image(text) == payload


@pytest.mark.parametrize("b64", [
    "data:image/jpeg;base64,@@not base64@@",
    "aGVsbG8=x",  # data after the padding
    "aGVsbG8===",  # more padding than a group can need
    "aGVsb",  # 4n+1 characters: no bytes end that way
    "aGVs-G8_",  # the URL-safe alphabet is another encoding
    "data:text/html;base64,aGVsbG8=",  # not an image
    "data:image/jpeg,aGVsbG8=",  # not base64 (a percent-encoded data URI)
    "data:;base64,aGVsbG8=",
    "aGVsbG8=ä",
])
def test_anything_else_is_not_base64(b64: str) -> None:
    with pytest.raises(StageError) as caught:
        decode_b64_image(b64)
    assert caught.value.message == "xAI's answer was not an image: its b64_json was not valid base64."


@pytest.mark.parametrize("b64", ["", "aGVsbG8=", "data:image/jpeg;base64,aGVsbG8"])
def test_base64_that_is_not_a_picture(b64: str) -> None:
    with pytest.raises(StageError, match="not an image"):
        to_jpeg(decode_b64_image(b64))


def test_truncated_jpeg_is_not_an_image() -> None:
    buffer = io.BytesIO()
    draw_object("x", 128).save(buffer, format="JPEG")
    assert to_jpeg(buffer.getvalue()) == buffer.getvalue()  # a good JPEG passes through untouched
    with pytest.raises(StageError, match="not an image"):
        to_jpeg(buffer.getvalue()[: len(buffer.getvalue()) // 2])


# ---- retries -----------------------------------------------------------------------------------------
async def test_rate_limit_exhausts_retries(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("rate_limit", retry_after=None)
    with pytest.raises(StageError) as caught:
        await make_client(max_retries=3).generate_image("a cat")
    assert "still rate limiting" in caught.value.message and "3 retries" in caught.value.message
    assert not caught.value.retryable  # the client spent its retries: the orchestrator adds none
    assert [r.status for r in fake_xai.requests] == [429] * 4


async def test_retry_after_is_honoured(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("rate_limit", times=1, retry_after="1")
    fake_xai.fail("rate_limit", times=1, retry_after="0.2")
    jpeg = await make_client().generate_image("a cat")
    _decoded_jpeg(jpeg)
    first, second, third = fake_xai.requests
    assert [first.status, second.status, third.status] == [429, 429, 200]
    assert second.started - first.finished >= 0.95  # backoff alone would be ~0.01 s
    assert third.started - second.finished >= 0.18


async def test_server_errors_are_retried_then_succeed(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("server_error", times=2)
    _decoded_jpeg(await make_client().generate_image("a cat"))
    assert [r.status for r in fake_xai.requests] == [500, 500, 200]


async def test_server_errors_exhaust_retries(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("server_error")
    with pytest.raises(StageError, match=r"kept failing \(HTTP 500\) after 2 retries") as caught:
        await make_client(max_retries=2).generate_image("a cat")
    assert not caught.value.retryable  # the client spent its retries: the orchestrator adds none
    assert len(fake_xai.requests) == 3


async def test_backoff_grows_exponentially(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("server_error")
    started = time.monotonic()
    with pytest.raises(StageError):
        await make_client(max_retries=3, backoff_base_s=0.1, backoff_cap_s=10).generate_image("a cat")
    gaps = [b.started - a.finished for a, b in zip(fake_xai.requests, fake_xai.requests[1:])]
    # Equal jitter: attempt k waits between base*2^k/2 and base*2^k.
    for k, gap in enumerate(gaps):
        assert 0.1 * 2**k / 2 - 0.01 <= gap <= 0.1 * 2**k + 0.1, gaps
    assert time.monotonic() - started < 3


async def test_unreachable_xai(make_client: MakeClient) -> None:
    client = make_client(base_url=f"http://127.0.0.1:{_free_port()}/v1", max_retries=2)
    with pytest.raises(StageError, match="^xAI could not be reached") as caught:
        await client.generate_image("a cat")
    assert not caught.value.retryable  # the client spent its retries: the orchestrator adds none


async def test_timeout_is_retried_then_reported(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("slow", delay_s=1.0)
    with pytest.raises(StageError, match=r"did not answer within 0\.3 seconds"):
        await make_client(timeout_s=0.3, max_retries=1).generate_image("a cat")
    assert len(fake_xai.requests) == 2


async def test_slow_answer_within_timeout_succeeds(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.fail("slow", times=1, delay_s=0.3)
    _decoded_jpeg(await make_client(timeout_s=2).generate_image("a cat"))
    assert len(fake_xai.requests) == 1


# ---- concurrency ---------------------------------------------------------------------------------------
async def test_concurrency_cap(fake_xai: FakeXai, make_client: MakeClient) -> None:
    fake_xai.configure(image_size=128)
    fake_xai.fail("slow", delay_s=0.25)
    client = make_client(concurrency=2)
    results = await asyncio.gather(*(client.generate_image(f"thing {i}") for i in range(6)))
    assert len(results) == 6 and all(_decoded_jpeg(r) for r in results)
    assert fake_xai.max_in_flight == 2  # reached, never exceeded


# ---- pieces --------------------------------------------------------------------------------------------
def test_template_must_contain_the_placeholder() -> None:
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        XaiImageClient(api_key="k", prompt_template="a picture of something")


def test_render_prompt_keeps_words_verbatim() -> None:
    assert render_prompt("<{prompt}>", "{0} {x} %s") == "<{0} {x} %s>"
    wrapped = render_prompt(DEFAULT_PROMPT_TEMPLATE, "a robot cat")
    assert wrapped.startswith("a robot cat")
    for wish in ("one whole object", "centred", "plain light", "three-quarter view", "No text", "nothing cropped"):
        assert wish in wrapped


def test_retry_after_parsing() -> None:
    def response(value: str) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": value})

    assert _retry_after_s(response("3")) == 3.0
    assert _retry_after_s(response("0.5")) == 0.5
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (_retry_after_s(response(in_ten)) or 0) <= 10.5
    assert _retry_after_s(response("soon")) is None
    assert _retry_after_s(httpx.Response(429)) is None


async def test_admin_endpoints_program_faults(fake_xai: FakeXai, make_client: MakeClient) -> None:
    root = fake_xai.base_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{root}/_fake/faults", json={"kind": "server_error", "times": 1})).status_code == 200
        assert (await http.post(f"{root}/_fake/faults", json={"kind": "nonsense"})).status_code == 400
        await make_client().generate_image("a cat")
        seen = (await http.get(f"{root}/_fake/requests")).json()
    assert [r["status"] for r in seen["requests"]] == [500, 200]

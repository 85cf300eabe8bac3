"""The Grok image client: `POST {base_url}/images/generations` over httpx.

It wraps the user's words in a prompt template that asks for a picture TripoSR can lift into 3D, retries what
may pass later (429, 5xx, connection errors) by the policy of pipeline/retry.py (exponential backoff with jitter,
`Retry-After` honoured), caps how many calls run at once, and returns JPEG bytes. Every failure leaves as a
`StageError` with one sentence for the user. Configuration comes from the caller (pipeline/settings.py); this
module reads no environment.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import logging
import re
import time
from typing import Any, Literal

import httpx
from PIL import Image, UnidentifiedImageError

from pipeline.errors import StageError
from pipeline.prompts import DEFAULT_PROMPT_TEMPLATE, render_prompt, validate_prompt_template
from pipeline.retry import RetryPolicy

log = logging.getLogger("grok3d.xai")

DEFAULT_MODEL = "grok-imagine-image"
ResponseFormat = Literal["b64_json", "url"]
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class _Retry(Exception):
    """One attempt failed in a way that may pass; carries the sentence to show if it never does."""

    def __init__(self, final: StageError, retry_after_s: float | None = None) -> None:
        super().__init__(final.message)
        self.final = final
        self.retry_after_s = retry_after_s  # the server's Retry-After, which the retry policy honours


class XaiImageClient:
    """Implements `pipeline.stages.ImageGenerator` against the xAI image API."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://api.x.ai/v1",
        model: str = DEFAULT_MODEL,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        concurrency: int = 4,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        response_format: ResponseFormat = "b64_json",
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        max_retry_after_s: float = 120.0,
    ) -> None:
        if not api_key:
            raise ValueError("An xAI API key is required.")
        if response_format not in ("b64_json", "url"):
            raise ValueError(f"response_format must be 'b64_json' or 'url', not {response_format!r}.")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("concurrency must be at least 1 and max_retries at least 0.")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.prompt_template = validate_prompt_template(prompt_template)
        self.response_format = response_format
        self.retry_policy = RetryPolicy(max_retries=max_retries, backoff_base_s=backoff_base_s,
                                        backoff_cap_s=backoff_cap_s, max_retry_after_s=max_retry_after_s)
        self._url = base_url.rstrip("/") + "/images/generations"
        self._auth = {"Authorization": f"Bearer {api_key}"}
        # One semaphore bounds whole generate_image calls (retries and waits included), so at most
        # `concurrency` jobs are talking to xAI at once and a rate-limited burst does not grow.
        self._slots = asyncio.Semaphore(concurrency)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=True)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> XaiImageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def generate_image(self, prompt: str) -> bytes:
        """The picture for the user's `prompt` (wrapped in the template), as JPEG bytes."""
        body = {
            "model": self.model,
            "prompt": render_prompt(self.prompt_template, prompt),
            "n": 1,
            "response_format": self.response_format,
        }
        async with self._slots:
            raw = await self._with_retries(body)
        return to_jpeg(raw)

    # ---- retries ---------------------------------------------------------------------------------
    async def _with_retries(self, body: dict[str, Any]) -> bytes:
        try:
            return await self.retry_policy.run(lambda: self._attempt(body), retry_on=_is_retry,
                                               on_retry=_log_retry)
        except _Retry as retry:
            # Our retries are spent: the orchestrator must not start another round of them.
            raise StageError(retry.final.message) from None

    async def _attempt(self, body: dict[str, Any]) -> bytes:
        try:
            response = await self._http.post(self._url, json=body, headers=self._auth)
        except httpx.TimeoutException:
            raise _Retry(
                StageError(f"xAI did not answer within {self.timeout_s:g} seconds.", retryable=True)
            ) from None
        except httpx.TransportError as exc:
            raise _Retry(StageError(f"xAI could not be reached: {_describe(exc)}.", retryable=True)) from None
        if response.status_code != 200:
            raise self._http_failure(response)
        return await self._image_from(response)

    def _http_failure(self, response: httpx.Response) -> Exception:
        status, message = response.status_code, _error_message(response)
        if status == 429:
            return _Retry(
                StageError(
                    f"xAI is still rate limiting image requests after {self.max_retries} retries; try again later.",
                    retryable=True,
                ),
                _retry_after_s(response),
            )
        if status in _RETRYABLE_STATUS or status >= 500:
            log.warning("xAI answered HTTP %d: %s", status, message)
            return _Retry(
                StageError(f"xAI kept failing (HTTP {status}) after {self.max_retries} retries.", retryable=True),
                _retry_after_s(response),
            )
        if status in (401, 403) or (status == 400 and "api key" in message.lower()):
            # xAI answers a wrong key with 400 and a sentence about the key, a revoked one with 401/403.
            # Their sentence (with a hint of the key) goes to the log only.
            log.error("xAI rejected the API key (HTTP %d): %s", status, message)
            return StageError("xAI rejected the API key, so no image could be made (check XAI_API_KEY).")
        if status == 400:
            # Any other 400 on a request we built correctly is xAI refusing the prompt (moderation).
            return StageError(f"xAI rejected the prompt: {_sentence(message)}")
        if status == 404:
            return StageError(f"xAI does not offer the image model {self.model!r} to this API key.")
        return StageError(f"xAI refused the image request (HTTP {status}): {_sentence(message)}")

    # ---- decoding the answer ---------------------------------------------------------------------
    async def _image_from(self, response: httpx.Response) -> bytes:
        try:
            item = response.json()["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise StageError("xAI's answer was not an image: the response held no image data.") from None
        if not isinstance(item, dict):
            raise StageError("xAI's answer was not an image: the response held no image data.")
        if isinstance(item.get("b64_json"), str):
            return decode_b64_image(item["b64_json"])
        if isinstance(item.get("url"), str):
            return await self._download(item["url"])
        raise StageError("xAI's answer was not an image: it carried neither b64_json nor a url.")

    async def _download(self, url: str) -> bytes:
        # No Authorization header: the file lives on another host and must not see our key.
        try:
            response = await self._http.get(url)
        except httpx.TimeoutException:
            raise _Retry(
                StageError(f"xAI's image could not be downloaded within {self.timeout_s:g} seconds.", retryable=True)
            ) from None
        except httpx.TransportError as exc:
            raise _Retry(
                StageError(f"xAI's image could not be downloaded: {_describe(exc)}.", retryable=True)
            ) from None
        if response.status_code >= 500:
            raise _Retry(
                StageError(f"xAI's image could not be downloaded (HTTP {response.status_code}).", retryable=True)
            )
        if response.status_code != 200:
            raise StageError(f"xAI's image could not be downloaded (HTTP {response.status_code}).")
        return response.content


def _is_retry(exc: BaseException) -> bool:
    return isinstance(exc, _Retry)


def _log_retry(exc: BaseException, retry: int, wait_s: float) -> None:
    log.warning("xAI attempt %d failed (%s); retrying in %.2f s", retry, exc, wait_s)


# `data:image/<subtype>[;parameter=value]...;base64,` (RFC 2397; scheme and media type are case-insensitive).
_IMAGE_DATA_URI = re.compile(r"data:image/[a-z0-9!#$&^_.+-]+(?:;[^,;]+)*?;base64,", re.IGNORECASE)
_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
NOT_BASE64 = "xAI's answer was not an image: its b64_json was not valid base64."


def decode_b64_image(value: str) -> bytes:
    """Bytes from xAI's `b64_json` as providers really send it: plain base64 or a data URI of any image type
    (`data:image/jpeg;base64,...`, which xAI's own SDK strips), wrapped over lines (MIME's 76 columns), with or
    without its `=` padding. Anything else (another alphabet, stray characters, a data URI that is not an image or
    not base64) is refused with one sentence."""
    text = value.strip()
    prefix = _IMAGE_DATA_URI.match(text)
    if prefix is not None:
        text = text[prefix.end():]
    elif text[:5].lower() == "data:":
        raise StageError(NOT_BASE64)
    text = text.translate(_WHITESPACE)
    body = text.rstrip("=")
    # Padding only completes the last group of 4: at most two `=`, and 4n+1 characters cannot be base64.
    if len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise StageError(NOT_BASE64)
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise StageError(NOT_BASE64) from None


def to_jpeg(data: bytes) -> bytes:
    """`data` as JPEG: JPEG passes through once it decodes; other formats are converted."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel, so a truncated file fails here and not downstream
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data
            rgb = _flatten(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("xAI sent %d bytes that do not decode as an image: %s", len(data), exc)
        raise StageError("xAI's answer was not an image that could be decoded.") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=95)
    return out.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    """RGB; transparency goes onto white, the light background the prompt asked for."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _error_message(response: httpx.Response) -> str:
    """xAI's own sentence: `{"code": ..., "error": "..."}` (or OpenAI-style `{"error": {"message": ...}}`)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text: Any = None
    if isinstance(body, dict):
        text = body.get("error") or body.get("message") or body.get("detail")
        if isinstance(text, dict):
            text = text.get("message")
    if not isinstance(text, str) or not text.strip():
        text = response.text.strip()[:300] or response.reason_phrase or f"HTTP {response.status_code}"
    return text.strip()


def _sentence(text: str) -> str:
    """xAI's message as the end of our sentence: one trailing full stop."""
    return text.rstrip(" .") + "."


def _retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds: a number (fractions accepted) or an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: httpx.TransportError) -> str:
    return str(exc) or type(exc).__name__

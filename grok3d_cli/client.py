"""The REST API of API.md over httpx, with every failure turned into a CliError: one sentence and an exit code.

A CLI user should never see a traceback: a server that is down, a refused prompt and a failed job are all
ordinary outcomes, told in words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from urllib.parse import quote

import httpx

from pipeline.storage import create_temp

# Exit codes: the server said no (bad prompt, unknown job, failed job) versus no usable answer at all.
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3

REQUEST_TIMEOUT_S = 30.0


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def normalize_url(server: str) -> str:
    """`localhost:8000` means http://localhost:8000: people type it that way."""
    server = server.strip().rstrip("/")
    return server if "://" in server else "http://" + server


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of /api/status/{id}/events: `status` or `end`, its id, the status object."""

    kind: str
    id: str | None
    status: dict[str, Any]


class StreamBroken(Exception):
    """The event stream could not be had or broke off; the caller may resume it or poll instead."""


class Api:
    def __init__(self, server: str, timeout_s: float = REQUEST_TIMEOUT_S, *, api_key: str | None = None) -> None:
        self.url = normalize_url(server)
        # RFC 6750 §2.1; a server in open mode ignores it.
        headers = {"Authorization": f"Bearer {api_key.strip()}"} if api_key and api_key.strip() else {}
        try:
            self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        except (httpx.InvalidURL, ValueError) as exc:
            raise CliError(f"not a server address: {server!r} ({exc})", EXIT_UNREACHABLE) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise CliError(f"the server at {self.url} did not answer in time", EXIT_UNREACHABLE) from None
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the grok3d server at {self.url} ({_reason(exc)}); is it running? "
                           "Set --server or GROK3D_SERVER", EXIT_UNREACHABLE) from None

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        body = _body(response)
        if response.is_success and isinstance(body, dict):
            return body
        raise _refusal(self.url, response, body)

    def generate(self, prompt: str | None, *, image: bytes | None = None, image_name: str | None = None,
                 **options: Any) -> dict[str, Any]:
        """A prompt job (JSON), or a picture job (multipart/form-data, the prompt as its caption); `options`:
        resolution, face_limit, size_m (API.md §1)."""
        if image is None:
            return self._json("POST", "/api/generate", json={"prompt": prompt, **options})
        fields = {name: str(value) for name, value in options.items()}
        if prompt is not None:
            fields["prompt"] = prompt
        return self._json("POST", "/api/generate", files={"image": (image_name or "picture", image)}, data=fields)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/status/{_segment(job_id)}")

    def examples(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/examples")["examples"]

    def jobs(self, *, limit: int | None = None, status: str | None = None,
             cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("limit", limit), ("status", status), ("cursor", cursor)) if v is not None}
        return self._json("GET", "/api/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/jobs/{_segment(job_id)}/cancel")

    def delete(self, job_id: str) -> None:
        response = self._send("DELETE", f"/api/jobs/{_segment(job_id)}")
        if response.status_code != 204:
            raise _refusal(self.url, response, _body(response))

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's Server-Sent Events (API.md §8) from after `last_event_id`. A refusal (404) is a CliError;
        a stream that cannot be had or breaks off is StreamBroken."""
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["last-event-id"] = last_event_id
        try:
            # No read timeout of our own would fit a stream: the server's heartbeat (15 s) keeps it under 60 s.
            with self._http.stream("GET", f"/api/status/{_segment(job_id)}/events", headers=headers,
                                   timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=60.0)) as response:
                if response.status_code == 404 or not response.is_success:
                    response.read()
                    if response.status_code == 404:
                        raise _refusal(self.url, response, _body(response))
                    raise StreamBroken(f"the server answered {response.status_code}")
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise StreamBroken("the server sent no event stream")
                yield from _parse_events(response.iter_lines())
        except httpx.HTTPError as exc:
            raise StreamBroken(_reason(exc)) from None


    def download(self, job_id: str, asset_type: str, target: Path) -> None:
        """Stream an asset to a temporary file beside `target`, then rename: no half-written file is left."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(target, ".part")  # the umask's mode, not mkstemp's 0600
        try:
            with os.fdopen(fd, "wb") as f:
                self._stream_into(f, job_id, asset_type)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _stream_into(self, f, job_id: str, asset_type: str) -> None:
        try:
            # A server with GROK3D_ASSETS_REDIRECT_S answers 307 to a presigned URL of its object storage; httpx
            # drops the Authorization header when a redirect leaves the server's origin.
            with self._http.stream("GET", f"/api/asset/{_segment(job_id)}", params={"asset_type": asset_type},
                                   follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    if response.history:  # the storage refused the presigned URL, not the grok3d server
                        raise CliError(f"the object storage that {self.url} sent the download to answered "
                                       f"{response.status_code} {response.reason_phrase}", EXIT_UNREACHABLE)
                    raise _refusal(self.url, response, _body(response))
                for chunk in response.iter_bytes():
                    f.write(chunk)
        except httpx.TimeoutException:
            raise CliError(f"the server at {self.url} did not answer in time", EXIT_UNREACHABLE) from None
        except httpx.HTTPError as exc:
            raise CliError(f"the download from {self.url} broke off ({_reason(exc)})", EXIT_UNREACHABLE) from None


def _segment(job_id: str) -> str:
    """The id as one path segment: a typed `../x` or `a/b` must reach the server as an id (and be "Job not
    found"), not be resolved by the URL into another route. Dots are escaped too, since `..` alone is a step up."""
    return quote(job_id, safe="").replace(".", "%2E")


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _refusal(url: str, response: httpx.Response, body: Any) -> CliError:
    """API.md's `{"error": ...}` in words; anything else means the address is not a grok3d server."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
        if response.status_code == 429 and (after := response.headers.get("retry-after")):
            message += f" (retry after {after} s)"
        if response.status_code == 401:
            message += " (the server needs an API key: set --api-key or GROK3D_API_KEY)"
        return CliError(message, EXIT_REFUSED)
    return CliError(f"the server at {url} answered {response.status_code} {response.reason_phrase} "
                    "without a grok3d error; is it a grok3d server?", EXIT_UNREACHABLE)


def _parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """text/event-stream as the WHATWG HTML standard parses it (§9.2.6): `field: value` lines up to a blank line
    make an event; lines that start with `:` are comments (heartbeats); `data` lines join with newlines."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Event(fields.get("event", "message"), fields.get("id"), json.loads("\n".join(data)))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value

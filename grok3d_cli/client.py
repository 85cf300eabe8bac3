"""The REST API of API.md over httpx, with every failure turned into a CliError: one sentence and an exit code.

A CLI user should never see a traceback: a server that is down, a refused prompt and a failed job are all
ordinary outcomes, told in words.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from urllib.parse import quote

import httpx

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

    def generate(self, prompt: str) -> dict[str, Any]:
        return self._json("POST", "/api/generate", json={"prompt": prompt})

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/status/{_segment(job_id)}")

    def examples(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/examples")["examples"]

    def download(self, job_id: str, asset_type: str, target: Path) -> None:
        """Stream an asset to a temporary file beside `target`, then rename: no half-written file is left."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_part_file(target)
        try:
            with os.fdopen(fd, "wb") as f:
                self._stream_into(f, job_id, asset_type)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _stream_into(self, f, job_id: str, asset_type: str) -> None:
        try:
            with self._http.stream("GET", f"/api/asset/{_segment(job_id)}", params={"asset_type": asset_type}) as response:
                if not response.is_success:
                    response.read()
                    raise _refusal(self.url, response, _body(response))
                for chunk in response.iter_bytes():
                    f.write(chunk)
        except httpx.TimeoutException:
            raise CliError(f"the server at {self.url} did not answer in time", EXIT_UNREACHABLE) from None
        except httpx.HTTPError as exc:
            raise CliError(f"the download from {self.url} broke off ({_reason(exc)})", EXIT_UNREACHABLE) from None


def _create_part_file(target: Path) -> tuple[int, Path]:
    """A new `.part` file beside `target`, open for writing, with the mode any new file gets (0666 less the umask,
    0644 usually): tempfile.mkstemp's private 0600 would stay with the download through the rename, and a web
    server or another user could not read the model."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


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

"""An S3 server on loopback for the tests: moto's server mode (`python -m moto.server`), which speaks the S3 API
(PUT, GET with Range and If-None-Match, HEAD, List, Delete, SigV4 presigned URLs). Each test gets a bucket of its
own; the server is killed at the end of the session."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx

from tests.server import free_port

ACCESS_KEY, SECRET_KEY, REGION = "grok3d-test", "grok3d-test-secret", "us-east-1"


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                httpx.get(self.endpoint, timeout=2)
                return self
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def new_bucket(self) -> str:
        name = "b" + uuid.uuid4().hex[:12]
        httpx.put(f"{self.endpoint}/{name}").raise_for_status()
        return name

    def env(self, bucket: str, prefix: str = "assets") -> dict[str, str]:
        """The settings of a replica that keeps its assets in `bucket`."""
        return {"GROK3D_ASSETS_URL": f"s3://{bucket}/{prefix}", "GROK3D_S3_ENDPOINT": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

"""A webhook receiver on 127.0.0.1 for tests: it records every request and answers each path the status codes it
is told to, in order (then 200)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.server import free_port

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # Standard Webhooks' own example secret (24 bytes)


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class Receiver:
    def __init__(self) -> None:
        self.answers: dict[str, list[int]] = {}
        self.deliveries: list[Delivery] = []
        self.port = free_port()
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.arrived:
                    planned = receiver.answers.get(self.path, [])
                    code = planned.pop(0) if planned else 200
                    receiver.deliveries.append(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                        body, code))
                    receiver.arrived.notify_all()
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, path: str, count: int, timeout_s: float = 30.0) -> list[Delivery]:
        """The first `count` deliveries to `path`, once they have arrived."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.to(path)) >= count, timeout_s)
            got = self.to(path)
        assert len(got) >= count, f"{len(got)} deliveries to {path} of {count}"
        return got[:count]

    def to(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    def __enter__(self) -> "Receiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

"""A file server on 127.0.0.1 for the download tests: no request leaves the machine.

It answers ``Range: bytes=N-`` with 206 (stdlib ``SimpleHTTPRequestHandler`` ignores Range),
records every request, and can cut the next transfer after a number of bytes to stand for a
connection lost in the middle of a download.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    path: str
    range: str | None
    status: int
    bytes_sent: int


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    cut_after: int | None = None  # the next response stops after this many body bytes
    honour_range: bool = True

    def start(self) -> FileServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_GET(self):
                body = owner.files.get(self.path)
                rng = self.headers.get("Range")
                if body is None:
                    self.send_error(404)
                    owner.log.append(Served(self.path, rng, 404, 0))
                    return
                start, status = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and owner.honour_range:
                    start, status = int(m.group(1)), 206
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        owner.log.append(Served(self.path, rng, 416, 0))
                        return
                part = body[start:]
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if owner.cut_after is not None:
                    part, owner.cut_after = part[:owner.cut_after], None
                    self.close_connection = True
                self.wfile.write(part)
                self.wfile.flush()
                owner.log.append(Served(self.path, rng, status, len(part)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

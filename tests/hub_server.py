"""A local artifact HTTP server for tests: 127.0.0.1, ephemeral port, background thread.

Serves ``files`` (URL path -> bytes) with ``Range: bytes=N-`` support and
switches a test can flip at any time:

* ``cut_after_bytes`` / ``cut_requests``: for the first ``cut_requests``
  requests send only ``cut_after_bytes`` body bytes, then close the socket;
* ``corrupt``: serve the bytes with the first byte flipped;
* ``fail_requests`` / ``fail_status``: answer the first N requests with that status;
* ``ignore_range``: answer Range requests with a full 200.

Every request is logged in ``requests`` as ``(path, range_header_or_None)``.
"""

from __future__ import annotations

import http.server
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class ArtifactServer:
    """Threaded HTTP server with fault switches; use as a context manager."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after_bytes: int | None = None
    cut_requests: int = 1
    corrupt: bool = False
    fail_requests: int = 0
    fail_status: int = 503
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL with a trailing slash, e.g. ``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def __enter__(self) -> "ArtifactServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _log(self, path: str, range_header: str | None) -> int:
        with self._lock:
            self.requests.append((path, range_header))
            return len(self.requests) - 1

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                range_header = self.headers.get("Range")
                index = server._log(self.path, range_header)
                if index < server.fail_requests:
                    self.send_error(server.fail_status)
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                if server.corrupt and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                if range_header and not server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if server.cut_after_bytes is not None and index < server.cut_requests:
                    self.wfile.write(body[: server.cut_after_bytes])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

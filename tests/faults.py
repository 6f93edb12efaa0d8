"""A fault layer for the tests: an HTTP proxy in front of moto's S3 server, and a model stage that kills its worker."""

from __future__ import annotations

import http.client
import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from raycap import schema
from tests.helpers import MeanModel

EXPIRED_TOKEN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
    b"<Message>The provided token has expired.</Message></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """Forwards every request to moto; object GETs numbered `after`+1 .. `after`+`window` fail instead: a 403
    ExpiredToken (mode "expired") or a reset connection (mode "reset"). `window=None` fails every one from then on.
    Counting requests, not seconds, makes the window land mid-job on any machine."""

    def __init__(self, upstream: str, mode: str, after: int, window: int | None) -> None:
        self.upstream = urlsplit(upstream)
        self.mode, self.after, self.window = mode, after, window
        self.object_gets = 0  # object GETs seen so far
        self.failed = 0  # of which answered with the fault
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if proxy._fault(self.command, self.path):
                    if proxy.mode == "reset":
                        # SO_LINGER 0: close sends an RST, as a load balancer dropping the connection does.
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(EXPIRED_TOKEN)))
                    self.end_headers()
                    self.wfile.write(EXPIRED_TOKEN)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def _fault(self, method: str, path: str) -> bool:
        """Whether this request is an object GET inside the fault window (counting it)."""
        route, _, query = path.partition("?")
        if method != "GET" or len(route.strip("/").split("/")) < 2 or "list-type" in query:
            return False
        with self._lock:
            self.object_gets += 1
            n = self.object_gets - self.after
            if n >= 1 and (self.window is None or n <= self.window):
                self.failed += 1
                return True
        return False

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class PoisonModel(MeanModel):
    """MeanModel whose process dies (as on a segfault or an OOM kill) on the shard holding image `poison`."""

    def __init__(self, poison: str | None = None, **stage: Any) -> None:
        super().__init__(**stage)
        self.poison = poison

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        if self.poison is not None and self.poison in meta[schema.IMAGE_ID].to_pylist():
            os._exit(1)
        return super().predict(pixels, meta)

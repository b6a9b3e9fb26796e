"""A real HTTP proxy in front of the live taskcast that counts the requests passing through
it and can answer the next few of one path itself (503 with Retry-After, as taskcast does
when its queue is full). Every other request reaches the real server unchanged."""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        target = urllib.parse.urlsplit(upstream)
        self.host, self.port = target.hostname, target.port
        self.requests: Counter = Counter()  # path -> requests forwarded or answered
        self.refuse: Dict[str, int] = {}  # path -> how many more to answer 503
        self.largest: Counter = Counter()  # path -> largest request body, bytes
        #: Called with each request's path as it arrives, before it is answered.
        self.on_request: Optional[Callable[[str], None]] = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy.forward(self)

            do_GET = do_POST

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        with self.lock:
            return self.requests[path]

    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def refuse_next(self, path: str, times: int = 1) -> None:
        with self.lock:
            self.refuse[path] = times

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        path = urllib.parse.urlsplit(handler.path).path
        key = "/api/tasks/{id}/progress" if path.endswith("/progress") and path != "/api/progress" else path
        with self.lock:
            self.requests[key] += 1
            self.largest[key] = max(self.largest[key], len(body))
            refused = self.refuse.get(path, 0) > 0
            if refused:
                self.refuse[path] -= 1
        if self.on_request is not None:
            self.on_request(path)
        if refused:
            answer = b'{"error":"unavailable","message":"the proxy says so","hint":"retry"}'
            handler.send_response(503)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Retry-After", "0")
            handler.send_header("Content-Length", str(len(answer)))
            handler.end_headers()
            handler.wfile.write(answer)
            return
        upstream = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        handler.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

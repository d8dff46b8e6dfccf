"""A proxy on loopback that fails the first requests as scripted (an HTTP status, or a dropped connection) and
forwards the rest unchanged: a server having a bad moment, for the tests of retries (the Hub push, S3 transfers)."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from typing import Any
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
DROP = 0  # a scripted failure: close the connection without an answer


class Flaky(http.server.ThreadingHTTPServer):
    """A proxy on loopback in front of `upstream`: the first requests get the scripted `failures` (an HTTP status,
    or DROP), every later one is forwarded as it came (Host included, so the links the Hub hands out lead back
    here). `seen` records each request as "METHOD /path"."""

    def __init__(self, upstream: str, failures: list[int]) -> None:
        self.upstream, self.failures, self.seen = urlsplit(upstream), list(failures), []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Flaky:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Forward(http.server.BaseHTTPRequestHandler):
    server: Flaky

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _answer(self) -> None:
        body = self._body()
        with self.server.lock:
            self.server.seen.append(f"{self.command} {self.path.split('?')[0]}")
            failure = self.server.failures.pop(0) if self.server.failures else None
        if failure == DROP:
            self.close_connection = True
            return
        if failure is not None:
            data = json.dumps({"error": f"scripted {failure}"}).encode()
            self.send_response(failure)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname or "", self.server.upstream.port)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream.request(self.command, self.path, body, headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", answer.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer  # noqa: N815 (the names http.server calls)

    def log_message(self, *args: Any) -> None:
        pass

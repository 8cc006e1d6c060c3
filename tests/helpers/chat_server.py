"""A chat-completions server on loopback, for the API judge and everything that calls it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# How long a stalled request waits at most for the server to close: far past any client timeout.
STALL_LIMIT_S = 30.0


class ChatServer:
    """Speaks POST /v1/chat/completions; each request takes the next scripted behaviour.

    ``("answer", text)`` replies normally; ``("garbage", None)`` sends a body that is not JSON;
    ``("status", code)`` fails with that HTTP code and ``Retry-After: 0.01``; ``("stall", None)``
    holds the request unanswered until the server closes, so a client only gets out through its
    own timeout (``stalled`` counts the requests held right now). An empty script answers "yes".
    Use it as a context manager: the server runs inside the ``with`` block.
    """

    def __init__(self, script: list[tuple[str, Any]]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.stalled = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                kind, value = server.script.pop(0) if server.script else ("answer", "yes")
                if kind == "stall":
                    with server._lock:
                        server.stalled += 1
                    server._release.wait(STALL_LIMIT_S)
                    with server._lock:
                        server.stalled -= 1
                    kind, value = "answer", "yes"
                if kind == "status":
                    self.send_response(value)
                    self.send_header("Retry-After", "0.01")
                    self.end_headers()
                    self.wfile.write(b'{"error": "slow down"}')
                    return
                payload = b"<html>not json" if kind == "garbage" else json.dumps(
                    {"id": "x", "object": "chat.completion",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": value}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stalled request)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        # a short poll: close() waits for the serving loop to notice, up to one poll interval (0.5 s by default)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._open = False

    def __enter__(self) -> ChatServer:
        self.thread.start()
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let stalled requests go and stop serving; closing twice is harmless."""
        if not self._open:
            return
        self._open = False
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

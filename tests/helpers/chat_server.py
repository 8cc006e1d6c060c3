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

    Faults a real server or network can produce: ``("trickle", seconds)`` sends a "yes" reply (status
    line, headers and body) one byte every ``seconds``, until the client hangs up or the server closes;
    ``("busy", value)`` fails with 429 and ``Retry-After: value`` (None: no header); ``("json", obj)``
    replies 200 with ``obj`` as the JSON body; ``("cut", None)`` announces a body and sends half of it;
    ``("bad_status", None)`` answers with a line that is not HTTP; ``("hang_up", None)`` closes the
    connection without a word.
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
                if kind in ("status", "busy"):
                    self.send_response(value if kind == "status" else 429)
                    if kind == "status" or value is not None:
                        self.send_header("Retry-After", "0.01" if kind == "status" else str(value))
                    self.end_headers()
                    self.wfile.write(b'{"error": "slow down"}')
                    return
                if kind == "hang_up":
                    return  # one request per connection: returning closes it with nothing sent
                if kind == "bad_status":
                    self.wfile.write(b"HELLO from not-http\r\n\r\n")
                    return
                if kind == "trickle":
                    self._trickle(_reply_bytes(_completion("yes")), float(value))
                    return
                if kind == "json":
                    payload = json.dumps(value).encode()
                elif kind == "garbage":
                    payload = b"<html>not json"
                else:
                    payload = _completion(value)
                if kind == "cut":
                    self.wfile.write(_reply_bytes(payload)[:-(len(payload) // 2)])  # headers and half the body
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stalled request)
                    pass

            def _trickle(self, data: bytes, seconds: float) -> None:
                for i in range(len(data)):
                    try:
                        self.wfile.write(data[i:i + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client hung up: what a deadline should make it do
                    if server._release.wait(seconds):
                        return

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


def _completion(text: Any) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()


def _reply_bytes(payload: bytes) -> bytes:
    """A whole 200 reply, for behaviours that write the raw bytes themselves."""
    head = (f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + payload

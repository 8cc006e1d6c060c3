"""The API judge against a real chat-completions server on loopback."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from relvid.eval.api_judge import APIJudge, APIJudgeError, APIJudgeSettings
from relvid.eval.judge import judge_question, judge_videos


class ChatServer:
    """Speaks POST /v1/chat/completions; each request takes the next scripted behaviour."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                kind, value = server.script.pop(0) if server.script else ("answer", "yes")
                if kind == "sleep":
                    time.sleep(value)
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
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def settings(url, tmp_path, **kw):
    base = dict(base_url=url, model="qwen-vl-max", api_key_env="RELVID_TEST_JUDGE_KEY", timeout_s=0.5,
                max_retries=3, backoff_s=0.01, requests_per_minute=6000, cache_dir=str(tmp_path / "cache"))
    return APIJudgeSettings(**{**base, **kw})


IMAGES = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_request_format_key_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELVID_TEST_JUDGE_KEY", "sk-test")
    with ChatServer([("answer", "Yes.")]) as server:
        judge = APIJudge(settings(server.url, tmp_path))
        question = judge_question("handshake")
        assert judge.ask(IMAGES, question, repeat=0) == "Yes."
        assert judge.ask(IMAGES, question, repeat=0) == "Yes."  # from the cache
        assert len(server.requests) == 1 and judge.stats["cache_hits"] == 1
        # a fresh judge (another process) reads the same on-disk cache
        assert APIJudge(settings(server.url, tmp_path)).ask(IMAGES, question, 0) == "Yes."
        assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "qwen-vl-max" and body["seed"] == 0
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 5 + ["text"]
    assert "human-like handshaking interactions" in parts[-1]["text"]
    jpeg = base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])
    assert jpeg[:2] == b"\xff\xd8"


def test_timeout_429_and_malformed_reply_are_retried(tmp_path):
    script = [("sleep", 1.5), ("status", 429), ("garbage", None), ("answer", "no")]
    with ChatServer(script) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=0.3))
        t0 = time.monotonic()
        assert judge.ask(IMAGES, "q?", repeat=1) == "no"
        assert time.monotonic() - t0 < 1.4  # the slow request was abandoned at the timeout
    assert len(server.requests) == 4 and judge.stats["retries"] == 3


def test_gives_up_with_the_reasons(tmp_path):
    with ChatServer([("status", 503)] * 3) as server:
        judge = APIJudge(settings(server.url, tmp_path, max_retries=2))
        with pytest.raises(APIJudgeError, match="after 3 attempts.*HTTP 503"):
            judge.ask(IMAGES, "q?", repeat=0)
    with ChatServer([("status", 401)]) as server:
        with pytest.raises(APIJudgeError, match="401.*RELVID_TEST_JUDGE_KEY"):
            APIJudge(settings(server.url, tmp_path)).ask(IMAGES, "q?", repeat=5)
        assert len(server.requests) == 1  # not retried


def test_rate_limit_spaces_requests(tmp_path):
    sleeps = []
    with ChatServer([]) as server:
        judge = APIJudge(settings(server.url, tmp_path, requests_per_minute=60, cache_dir=None), sleep=sleeps.append)
        for r in range(3):
            judge.ask(IMAGES, "q?", repeat=r)
    assert len(sleeps) == 2 and all(0.9 < s <= 1.0 for s in sleeps)


def test_relation_accuracy_counts_unparseable_answers(tmp_path):
    videos = [torch.randint(0, 255, (13, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    # video 0: yes, no, maybe ; video 1: yes, yes, {malformed json -> retried -> "The answer is no."}
    script = [("answer", "Yes"), ("answer", "**No**, they are not."), ("answer", "I cannot tell."),
              ("answer", "yes"), ("answer", "Answer: yes"), ("garbage", None), ("answer", "The answer is no.")]
    with ChatServer(script) as server:
        judge = APIJudge(settings(server.url, tmp_path, cache_dir=None))
        result = judge_videos(judge, videos, judge_question("hug"), repeats=3)
    assert result["per_repeat"] == [1.0, 0.5, 0.0]
    assert result["mean"] == pytest.approx(0.5) and result["std"] == pytest.approx((1 / 6) ** 0.5)
    assert result["unparseable"] == 1 and result["per_video"] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert all(len(r["body"]["messages"][0]["content"]) == 6 for r in server.requests)

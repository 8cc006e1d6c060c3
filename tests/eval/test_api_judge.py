"""The API judge against a real chat-completions server on loopback (tests/helpers/chat_server.py)."""

import base64

import pytest
import torch

from relvid.eval.api_judge import APIJudge, APIJudgeError
from relvid.eval.judge import judge_question, judge_videos
from tests.helpers.judge import IMAGES, FakeClock, settings


def test_request_format_key_and_cache(tmp_path, monkeypatch, chat_server):
    monkeypatch.setenv("RELVID_TEST_JUDGE_KEY", "sk-test")
    with chat_server([("answer", "Yes.")]) as server:
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


def test_timeout_429_and_malformed_reply_are_retried(tmp_path, chat_server):
    clock = FakeClock()
    script = [("stall", None), ("status", 429), ("garbage", None), ("answer", "no")]
    with chat_server(script) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=0.3), sleep=clock.sleep, clock=clock)
        assert judge.ask(IMAGES, "q?", repeat=1) == "no"
        assert server.stalled == 1  # the first request is still unanswered: it was abandoned at the timeout
    assert len(server.requests) == 4 and judge.stats["retries"] == 3
    # backoff_s after the timeout, the 429's Retry-After (0.01), backoff_s * 2**2 after the garbage; the
    # rate limit (6000 a minute: 0.01 s apart) is already met each time, so it adds no wait of its own
    assert clock.sleeps == [0.01, 0.01, 0.04]


def test_gives_up_with_the_reasons(tmp_path, chat_server):
    with chat_server([("status", 503)] * 3) as server:
        judge = APIJudge(settings(server.url, tmp_path, max_retries=2))
        with pytest.raises(APIJudgeError, match="after 3 attempts.*HTTP 503"):
            judge.ask(IMAGES, "q?", repeat=0)
    with chat_server([("status", 401)]) as server:
        with pytest.raises(APIJudgeError, match="401.*RELVID_TEST_JUDGE_KEY"):
            APIJudge(settings(server.url, tmp_path)).ask(IMAGES, "q?", repeat=5)
        assert len(server.requests) == 1  # not retried


def test_rate_limit_spaces_requests(tmp_path, chat_server):
    clock = FakeClock()
    with chat_server([]) as server:
        judge = APIJudge(settings(server.url, tmp_path, requests_per_minute=60, cache_dir=None), sleep=clock.sleep,
                         clock=clock)
        for r in range(3):
            judge.ask(IMAGES, "q?", repeat=r)
    assert clock.sleeps == [1.0, 1.0]  # 60 a minute: the 2nd and 3rd requests each wait the full second


def test_relation_accuracy_counts_unparseable_answers(tmp_path, chat_server):
    videos = [torch.randint(0, 255, (13, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    # video 0: yes, no, maybe ; video 1: yes, yes, {malformed json -> retried -> "The answer is no."}
    script = [("answer", "Yes"), ("answer", "**No**, they are not."), ("answer", "I cannot tell."),
              ("answer", "yes"), ("answer", "Answer: yes"), ("garbage", None), ("answer", "The answer is no.")]
    with chat_server(script) as server:
        judge = APIJudge(settings(server.url, tmp_path, cache_dir=None))
        result = judge_videos(judge, videos, judge_question("hug"), repeats=3)
    assert result["per_repeat"] == [1.0, 0.5, 0.0]
    assert result["mean"] == pytest.approx(0.5) and result["std"] == pytest.approx((1 / 6) ** 0.5)
    assert result["unparseable"] == 1 and result["per_video"] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert all(len(r["body"]["messages"][0]["content"]) == 6 for r in server.requests)

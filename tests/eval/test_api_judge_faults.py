"""The API judge against servers and networks that misbehave: slow, cut-off, garbled, or asking for
impossible waits. A real loopback server (tests/helpers/chat_server.py); time is a fake clock wherever
the test does not need real time to pass."""

from __future__ import annotations

import time

import pytest
import torch

from relvid.eval.api_judge import APIJudge, APIJudgeError
from relvid.eval.judge import judge_question, judge_videos
from tests.helpers.judge import IMAGES, FakeClock, settings


class SkippingClock:
    """Real monotonic time (a request's deadline must pass while bytes trickle in), plus the judge's
    own waits (backoff, rate limit), which are recorded and skipped rather than slept."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._skipped = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return time.monotonic() - self._start + self._skipped

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._skipped += seconds


def test_trickling_reply_is_abandoned_at_the_request_deadline(tmp_path, chat_server):
    """timeout_s bounds the whole request: a server sending a byte every 0.05 s never lets one socket
    read wait 0.3 s, yet the request must end after 0.3 s (the whole reply would take seconds)."""
    clock = SkippingClock()
    with chat_server([("trickle", 0.05)] * 2) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=0.3, max_retries=1), sleep=clock.sleep, clock=clock)
        with pytest.raises(APIJudgeError, match=r"after 2 attempts.*timed out.*timeout_s=0\.3"):
            judge.ask(IMAGES, "q?", repeat=0)
    assert len(server.requests) == 2 and judge.stats["retries"] == 1


def test_trickling_reply_within_the_deadline_is_read(tmp_path, chat_server):
    clock = SkippingClock()
    with chat_server([("trickle", 0.001)]) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=5.0), sleep=clock.sleep, clock=clock)
        assert judge.ask(IMAGES, "q?", repeat=0) == "yes"
    assert judge.stats["retries"] == 0


FAULTS = {
    "cut_off_body": ("cut", "yes"),  # http.client.IncompleteRead
    "not_http": ("bad_status", None),  # http.client.BadStatusLine
    "hang_up": ("hang_up", None),  # http.client.RemoteDisconnected
    "not_json": ("garbage", None),
    "no_choices": ("json", {"id": "x"}),
    "empty_choices": ("json", {"choices": []}),
    "no_message": ("json", {"choices": [{"index": 0}]}),
    "no_content": ("json", {"choices": [{"message": {"role": "assistant"}}]}),
    "null_content": ("json", {"choices": [{"message": {"content": None}}]}),
    "json_list": ("json", ["yes"]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_malformed_or_cut_off_reply_is_retried(tmp_path, chat_server, fault):
    clock = FakeClock()
    with chat_server([FAULTS[fault], ("answer", "no")]) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=5.0), sleep=clock.sleep, clock=clock)
        assert judge.ask(IMAGES, "q?", repeat=0) == "no"
    assert len(server.requests) == 2 and judge.stats["retries"] == 1 and clock.sleeps == [0.01]


@pytest.mark.parametrize("fault", ["cut_off_body", "not_http", "hang_up", "no_content"])
def test_malformed_reply_every_time_fails_with_an_api_judge_error(tmp_path, chat_server, fault):
    clock = FakeClock()
    with chat_server([FAULTS[fault]] * 3) as server:
        judge = APIJudge(settings(server.url, tmp_path, timeout_s=5.0, max_retries=2), sleep=clock.sleep, clock=clock)
        with pytest.raises(APIJudgeError, match="no answer after 3 attempts"):
            judge.ask(IMAGES, "q?", repeat=0)
    assert len(server.requests) == 3


def test_unusable_retry_after_falls_back_to_the_backoff_and_waits_are_capped(tmp_path, chat_server):
    clock = FakeClock()
    script = [("busy", "-5"), ("busy", "nan"), ("busy", "soon"), ("busy", "inf"), ("busy", "1e9"),
              ("busy", "Wed, 21 Oct 2015 07:28:00 GMT"), ("busy", "86400"), ("busy", "0.25"), ("busy", None),
              ("answer", "yes")]
    with chat_server(script) as server:
        judge = APIJudge(settings(server.url, tmp_path, max_retries=9, backoff_s=0.01, max_backoff_s=2.0),
                         sleep=clock.sleep, clock=clock)
        assert judge.ask(IMAGES, "q?", repeat=0) == "yes"
    # attempt k without a usable Retry-After waits backoff_s * 2**k, never more than max_backoff_s; a
    # usable one is honoured up to max_backoff_s. The rate limit (0.01 s apart) is met by every wait.
    assert clock.sleeps == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 2.0, 0.25, 2.0]


def test_final_error_says_the_last_problem_the_attempts_and_what_is_cached(tmp_path, chat_server):
    videos = [torch.randint(0, 255, (13, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    question = judge_question("hug")
    cache = tmp_path / "cache"
    clock = FakeClock()
    # three judgements answered, then the server keeps failing on the fourth
    with chat_server([("answer", "yes")] * 3 + [("status", 503)] * 3) as server:
        judge = APIJudge(settings(server.url, tmp_path, max_retries=2), sleep=clock.sleep, clock=clock)
        with pytest.raises(APIJudgeError) as failure:
            judge_videos(judge, videos, question, repeats=2)
    message = str(failure.value)
    assert "no answer after 3 attempts (judge.max_retries=2)" in message
    assert "last attempt: HTTP 503" in message
    assert f"3 answers are cached in {cache}" in message and "rerun" in message
    # the rerun the message promises: only the missing judgement is asked
    with chat_server([("answer", "no")]) as server:
        result = judge_videos(APIJudge(settings(server.url, tmp_path), sleep=clock.sleep, clock=clock), videos,
                              question, repeats=2)
    assert len(server.requests) == 1 and result["per_video"] == [1.0, 0.5]


def test_final_error_without_a_cache_says_a_rerun_starts_over(tmp_path, chat_server):
    clock = FakeClock()
    with chat_server([("hang_up", None)] * 2) as server:
        judge = APIJudge(settings(server.url, tmp_path, max_retries=1, cache_dir=None), sleep=clock.sleep, clock=clock)
        with pytest.raises(APIJudgeError, match=r"after 2 attempts.*not cached \(judge\.cache_dir is unset\)"):
            judge.ask(IMAGES, "q?", repeat=0)


def test_a_server_that_is_not_there_is_retried_then_named(tmp_path):
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    clock = FakeClock()
    judge = APIJudge(settings(url, tmp_path, max_retries=2), sleep=clock.sleep, clock=clock)
    with pytest.raises(APIJudgeError) as failure:
        judge.ask(IMAGES, "q?", repeat=0)
    message = str(failure.value)
    assert "after 3 attempts" in message and "refused" in message.lower() and url.split("/v1")[0] in message
    assert len(clock.sleeps) == 2  # it waited between the attempts instead of giving up at once

"""Shared by the API-judge tests: a fake clock, judge settings for a loopback server, test images."""

from __future__ import annotations

import torch

from relvid.config import JudgeConfig


class FakeClock:
    """Stands in for time.monotonic and time.sleep: time moves only when the judge sleeps, and every
    sleep is recorded, so the waits are exact and the test never sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def settings(url, tmp_path, **kw) -> JudgeConfig:
    """An API judge on the loopback server at ``url``, fast retries, answers cached under tmp_path."""
    base = dict(base_url=url, model="qwen-vl-max", api_key_env="RELVID_TEST_JUDGE_KEY", timeout_s=0.5,
                max_retries=3, backoff_s=0.01, requests_per_minute=6000, cache_dir=str(tmp_path / "cache"))
    return JudgeConfig(kind="api", **{**base, **kw})


IMAGES = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

"""A VLM judge behind any OpenAI-compatible chat-completions API.

Qwen-VL-Max through DashScope's compatible mode, or a vLLM / SGLang server running Qwen2.5-VL:
set the base URL (".../v1"), the model name and the name of the environment variable that holds
the API key. Keyframes go as base64 JPEG data URLs. Every request has a timeout; timeouts,
connection errors, 429, 5xx and malformed replies are retried with exponential backoff (429's
Retry-After is honoured); requests are spaced to a rate limit; answers are cached on disk, keyed
by model, question, images, repeat and sampling settings, so a rerun costs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from relvid.config import JudgeConfig
from relvid.errors import UserError
from relvid.eval.judge import jpeg_bytes
from relvid.files import atomic_write

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class APIJudgeError(UserError, RuntimeError):
    """The judge API refused a request or kept failing after all retries."""


class APIJudge:
    """Judge.ask over HTTP with retries, a rate limit and an on-disk answer cache."""

    def __init__(self, settings: JudgeConfig, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.base_url or not settings.model:
            raise ValueError("api judge: base_url and model are both required (e.g. --judge-url "
                             "http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-VL-7B-Instruct)")
        self.settings = settings
        self.name = f"api:{settings.model}"
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self._sleep, self._clock = sleep, clock
        self._last_request: float | None = None
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    # --- cache --------------------------------------------------------------------------------
    def _cache_key(self, image_hashes: list[str], question: str, repeat: int) -> str:
        s = self.settings
        blob = json.dumps({"model": s.model, "question": question, "images": image_hashes, "repeat": repeat,
                           "temperature": s.temperature, "max_tokens": s.max_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.settings.cache_dir is None else Path(self.settings.cache_dir) / key[:2] / f"{key}.json"

    def _cache_put(self, path: Path, answer: str) -> None:
        atomic_write(path, json.dumps({"model": self.settings.model, "answer": answer}))

    # --- HTTP ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _wait_for_rate_limit(self) -> None:
        interval = 60.0 / self.settings.requests_per_minute
        if self._last_request is not None:
            wait = self._last_request + interval - self._clock()
            if wait > 0:
                self._sleep(wait)
        self._last_request = self._clock()

    def _post(self, body: bytes) -> tuple[str | None, str, float | None]:
        """One request: (answer or None, what went wrong, Retry-After seconds). Fatal errors raise."""
        self._wait_for_rate_limit()
        self.stats["requests"] += 1
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace")
            if err.code in _RETRY_STATUS:
                retry_after = err.headers.get("Retry-After") if err.headers else None
                try:
                    wait = float(retry_after) if retry_after is not None else None
                except ValueError:
                    wait = None
                return None, f"HTTP {err.code}: {detail}", wait
            hint = f" (is ${self.settings.api_key_env} set?)" if err.code in (401, 403) else ""
            raise APIJudgeError(f"{self.url}: HTTP {err.code}{hint}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            return None, f"{type(err).__name__}: {reason}", None
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"malformed reply: {raw[:200]!r}", None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            return None, f"malformed reply content: {content!r}"[:200], None
        return content, "", None

    def ask(self, images: Tensor, question: str, repeat: int) -> str:
        jpegs = [jpeg_bytes(img) for img in images]
        key = self._cache_key([hashlib.sha256(j).hexdigest() for j in jpegs], question, repeat)
        cache = self._cache_path(key)
        if cache is not None and cache.is_file():
            self.stats["cache_hits"] += 1
            return json.loads(cache.read_text(encoding="utf-8"))["answer"]
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(j).decode()}}
                   for j in jpegs]
        content.append({"type": "text", "text": question})
        s = self.settings
        body = json.dumps({"model": s.model, "messages": [{"role": "user", "content": content}],
                           "temperature": s.temperature, "max_tokens": s.max_tokens, "seed": int(repeat)}).encode()
        problems = []
        for attempt in range(s.max_retries + 1):
            answer, problem, retry_after = self._post(body)
            if answer is not None:
                if cache is not None:
                    self._cache_put(cache, answer)
                return answer
            problems.append(problem)
            if attempt < s.max_retries:
                self.stats["retries"] += 1
                wait = retry_after if retry_after is not None else s.backoff_s * 2 ** attempt
                self._sleep(min(wait, s.max_backoff_s))
        raise APIJudgeError(f"{self.url}: no answer after {s.max_retries + 1} attempts: " + "; ".join(problems[-3:]))

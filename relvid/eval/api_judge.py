"""A VLM judge behind any OpenAI-compatible chat-completions API.

Qwen-VL-Max through DashScope's compatible mode, or a vLLM / SGLang server running Qwen2.5-VL:
set the base URL (".../v1"), the model name and the name of the environment variable that holds
the API key. Keyframes go as base64 JPEG data URLs. Every request has a deadline (``timeout_s``
bounds the whole request, however slowly a server trickles its reply); timeouts, connection
errors, 429, 5xx and malformed or cut-off replies are retried with exponential backoff (a usable
Retry-After is honoured, up to ``max_backoff_s``); requests are spaced to a rate limit; answers are
cached on disk, keyed by model, question, images, repeat and sampling settings, so a rerun costs
nothing for what was already answered.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import io
import json
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from relvid.config import JudgeConfig
from relvid.errors import InputError, UserError
from relvid.eval.judge import jpeg_bytes
from relvid.files import atomic_write

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Retry-After in seconds (RFC 9110's delay-seconds, decimals allowed as some servers send them). An HTTP
# date, a negative, NaN, infinite or otherwise unreadable value is ignored: the backoff applies.
_RETRY_AFTER = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


class _DeadlinePassed(TimeoutError):
    """The request's deadline passed while its reply was still coming in."""


class _DeadlineReader(io.RawIOBase):
    """Reads a response socket so that no read outlasts the request's deadline: each read first
    checks the clock, then gives the socket only the time that is left. A per-read socket timeout
    alone lets a server that sends a byte now and then hold a request forever."""

    def __init__(self, sock: socket.socket, deadline: float, clock: Callable[[], float]) -> None:
        super().__init__()
        # makefile keeps the socket open after the connection object lets go of it (Connection: close)
        self._raw = sock.makefile("rb", buffering=0)
        self._sock, self._deadline, self._clock = sock, deadline, clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - self._clock()
        if left <= 0:
            raise _DeadlinePassed("the request's deadline passed")
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTPResponse whose status line, headers and body are all read through a _DeadlineReader."""

    def __init__(self, sock: socket.socket, *args, deadline: float, clock: Callable[[], float], **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the plain reader made by HTTPResponse; nothing was read from it yet
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline, clock))


class _DeadlineOpening:
    """Mixed into urllib's HTTP(S) handlers (so proxies and TLS settings work as for urlopen): every
    connection they open reads its response under one deadline."""

    deadline: float
    clock: Callable[[], float]

    def do_open(self, http_class, req, **kwargs):
        def connect(*args, **kw):
            connection = http_class(*args, **kw)
            connection.response_class = functools.partial(_DeadlineResponse, deadline=self.deadline, clock=self.clock)
            return connection

        return super().do_open(connect, req, **kwargs)


class _HTTPHandler(_DeadlineOpening, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_DeadlineOpening, urllib.request.HTTPSHandler):
    pass


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for, or None when it gives no usable number."""
    match = _RETRY_AFTER.fullmatch(value) if value is not None else None
    return float(match.group(1)) if match else None


class APIJudgeError(UserError, RuntimeError):
    """The judge API refused a request or kept failing after all retries."""


class APIJudge:
    """Judge.ask over HTTP with retries, a rate limit and an on-disk answer cache."""

    def __init__(self, settings: JudgeConfig, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.base_url or not settings.model:
            raise InputError("api judge: judge.base_url and judge.model are both required (e.g. --judge-url "
                             "http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-VL-7B-Instruct)")
        if not str(settings.base_url).startswith(("http://", "https://")):
            raise APIJudgeError(f"judge.base_url {settings.base_url!r}: must start with http:// or https:// "
                                "(e.g. http://localhost:8000/v1)")
        self.settings = settings
        self.name = f"api:{settings.model}"
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self._sleep, self._clock = sleep, clock
        self._last_request: float | None = None
        # answers: judgements this judge returned (from the server or the cache), all on disk when caching
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "answers": 0}

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

    def _opener(self, deadline: float) -> urllib.request.OpenerDirector:
        handlers = [_HTTPHandler(), _HTTPSHandler()]
        for handler in handlers:
            handler.deadline, handler.clock = deadline, self._clock
        return urllib.request.build_opener(*handlers)

    def _post(self, body: bytes) -> tuple[str | None, str, float | None]:
        """One request: (answer or None, what went wrong, Retry-After seconds). Fatal errors raise.

        The request, from connecting to the last byte of the reply, ends by ``timeout_s`` after it starts.
        """
        self._wait_for_rate_limit()
        self.stats["requests"] += 1
        timeout = float(self.settings.timeout_s)
        deadline = self._clock() + timeout
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        try:
            with self._opener(deadline).open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            try:
                detail = err.read()[:300].decode("utf-8", "replace")
            except (http.client.HTTPException, OSError) as read_err:
                detail = f"(reply body unreadable: {self._describe(read_err, timeout)})"
            if err.code in _RETRY_STATUS:
                return None, f"HTTP {err.code}: {detail}", _retry_after(err.headers.get("Retry-After") if err.headers
                                                                         else None)
            hint = f" (is ${self.settings.api_key_env} set?)" if err.code in (401, 403) else ""
            raise APIJudgeError(f"{self.url}: HTTP {err.code}{hint}: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise APIJudgeError(f"{self.url}: the server's TLS certificate does not verify ({reason}); "
                                    "fix judge.base_url or the machine's CA certificates") from None
            return None, self._describe(err, timeout), None
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

    @staticmethod
    def _describe(err: BaseException, timeout: float) -> str:
        """What went wrong with one request, in words a user can act on."""
        reason = getattr(err, "reason", err)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return f"timed out: no whole reply within timeout_s={timeout:g} s"
        if isinstance(err, http.client.IncompleteRead):
            return f"reply cut off: {err!r}"
        text = str(reason) or repr(reason)
        return f"{type(reason).__name__}: {text}"[:300]

    def _cache_note(self) -> str:
        """What a rerun will not have to ask again."""
        folder = self.settings.cache_dir
        if folder is None:
            return "answers are not cached (judge.cache_dir is unset), so a rerun asks everything again"
        n = self.stats["answers"]
        return (f"{n} answer{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} cached in {folder}; rerun to "
                "continue: cached answers are not asked again")

    def ask(self, images: Tensor, question: str, repeat: int) -> str:
        jpegs = [jpeg_bytes(img) for img in images]
        key = self._cache_key([hashlib.sha256(j).hexdigest() for j in jpegs], question, repeat)
        cache = self._cache_path(key)
        if cache is not None and cache.is_file():
            self.stats["cache_hits"] += 1
            self.stats["answers"] += 1
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
                self.stats["answers"] += 1
                return answer
            problems.append(problem)
            if attempt < s.max_retries:
                self.stats["retries"] += 1
                wait = retry_after if retry_after is not None else s.backoff_s * 2 ** attempt
                self._sleep(min(wait, s.max_backoff_s))
        earlier = "; ".join(problems[-4:-1])
        raise APIJudgeError(
            f"{self.url}: no answer after {len(problems)} attempts (judge.max_retries={s.max_retries}); the last "
            f"attempt: {problems[-1]}" + (f"; before it: {earlier}" if earlier else "") + f". {self._cache_note()}")

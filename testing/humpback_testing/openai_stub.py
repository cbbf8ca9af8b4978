"""A tiny OpenAI-compatible completions server on loopback, for tests and benchmarks.

    .venv/bin/python -m humpback_testing.openai_stub --port 8000 [--text ok] [--delay-s 0.05]

prints `listening on http://127.0.0.1:PORT/v1` once it serves, and runs until killed. It answers

- `POST /v1/completions` like vLLM: `{id, object: "text_completion", created, model, choices, usage}`,
  one choice per prompt (a string or a list of strings). The completion is `text` (a string, or
  in-process a function of the prompt), cut to `max_tokens` whitespace tokens with
  `finish_reason: "length"`, else `"stop"`. With `"logprobs": k` in the request the choice carries
  `{tokens, token_logprobs, top_logprobs, text_offset}`; `top_logprobs` (say `{"5": -0.1, "4": -2.4}`)
  is the entry for every token, else each token alone with logprob -0.1.
- `POST /v1/chat/completions` like vLLM's chat API: `{..., object: "chat.completion", choices:
  [{index, message: {role: "assistant", content}, logprobs, finish_reason}]}`; the "prompt" the text
  function sees is the messages' contents joined by blank lines (a stand-in for a chat template).
  With `"logprobs": true, "top_logprobs": k` the choice carries `{"content": [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}]}`, the chat API's shape. `chat_only=True` answers
  `/v1/completions` with 404, like a judge served only behind the chat API.
- `GET /health` (200, empty) and `GET /v1/models`.

Failure injection: the first `fail_first` requests, and every request whose prompt contains
`fail_on`, answer `status_on_fail` with an OpenAI error body (and `Retry-After: retry_after` when
set); `delay_s` delays every answer, and `jitter_s` adds a random delay in [0, jitter_s] to each, so
concurrent requests are answered in random order. `model`, when set, is the only model served (404 otherwise,
as vLLM does). `stats` counts requests, failures, requests in flight and the most at once, and
keeps the last `Authorization` header.

In an event loop: `stub = await start_stub(...)`, then `stub.url`, `stub.stats`, `await stub.close()`;
`stub.behaviour` holds the options and may be changed while it serves (`stub.behaviour.delay_s = 0`).
From sync code: `with StubServer(...) as stub:` runs the same server on a thread with its own loop.
For benchmarks run it as a separate process (the command above) so server and client do not share
one core's GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["StubHandle", "StubServer", "StubStats", "start_stub"]

_TOKEN = re.compile(r"\s*\S+|\s+")


@dataclass
class StubStats:
    requests: int = 0  # POST /v1/completions and /v1/chat/completions received
    chat_requests: int = 0  # of which /v1/chat/completions
    failed: int = 0  # answered with an injected failure
    in_flight: int = 0
    max_in_flight: int = 0
    prompts: int = 0  # prompts completed
    logprobs: int | None = None  # the "logprobs" (top-K) of the last request that asked for them
    authorization: str | None = field(default=None, repr=False)  # the last Authorization header


@dataclass
class _Behaviour:
    text: str | Callable[[str], str]
    top_logprobs: dict | None
    delay_s: float
    jitter_s: float
    fail_first: int
    status_on_fail: int
    fail_on: str | None
    retry_after: float | None
    model: str | None
    chat_only: bool = False


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"host: the stub serves on loopback only (127.0.0.1, ::1, localhost), got {host!r}")


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _logprobs(tokens: list[str], top: dict | None) -> dict:
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [-0.1] * len(tokens),
        "top_logprobs": [dict(top) if top is not None else {token: -0.1} for token in tokens],
        "text_offset": offsets,
    }


def _chat_logprobs(tokens: list[str], top: dict | None) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(token, -0.1), "top_logprobs": [entry(t, lp) for t, lp in (top or {token: -0.1}).items()]}
        for token in tokens
    ]}


def _app(behaviour: _Behaviour, stats: StubStats) -> web.Application:
    b = behaviour

    async def completions(request: web.Request) -> web.Response:
        if b.chat_only:
            return _error(404, "Not Found: this server serves /v1/chat/completions only", "NotFoundError")
        return await _answer(request, chat=False)

    async def chat_completions(request: web.Request) -> web.Response:
        stats.chat_requests += 1
        return await _answer(request, chat=True)

    async def _answer(request: web.Request, chat: bool) -> web.Response:
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if auth := request.headers.get("Authorization"):
                stats.authorization = auth
            try:
                body = json.loads(await request.read())
            except ValueError as e:
                return _error(400, f"Request body is not JSON: {e}")
            field_name = "messages" if chat else "prompt"
            if not isinstance(body, dict) or field_name not in body or "model" not in body:
                return _error(400, f"The request needs 'model' and '{field_name}'")
            if chat:
                messages = body["messages"]
                if not (isinstance(messages, list) and messages and all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)):
                    return _error(400, "'messages' must be a non-empty list of {role, content} objects")
                if isinstance(body.get("logprobs"), int) and not isinstance(body.get("logprobs"), bool):
                    return _error(400, "chat 'logprobs' is a boolean; the count goes in 'top_logprobs'")
                body["prompt"] = "\n\n".join(m["content"] for m in messages)
            if b.model is not None and body["model"] != b.model:
                return _error(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            if not all(isinstance(p, str) for p in prompts):
                return _error(400, "'prompt' must be a string or a list of strings")
            if b.delay_s or b.jitter_s:
                await asyncio.sleep(b.delay_s + random.uniform(0.0, b.jitter_s))
            if stats.requests <= b.fail_first or (b.fail_on is not None and any(b.fail_on in p for p in prompts)):
                stats.failed += 1
                headers = {"Retry-After": f"{b.retry_after:g}"} if b.retry_after is not None else None
                return _error(b.status_on_fail, f"stub failure (HTTP {b.status_on_fail})", "stub_error", headers)
            max_tokens = body.get("max_tokens")
            logprobs = body.get("logprobs") if not chat else (body.get("top_logprobs") if body.get("logprobs") else None)
            if logprobs is not None:
                stats.logprobs = logprobs
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for index, prompt in enumerate(prompts):
                text = b.text(prompt) if callable(b.text) else b.text
                tokens = _TOKEN.findall(text)
                finish = "stop"
                if isinstance(max_tokens, int) and len(tokens) > max_tokens:
                    tokens, finish = tokens[:max_tokens], "length"
                    text = "".join(tokens)
                if chat:
                    choices.append({
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": _chat_logprobs(tokens, b.top_logprobs) if logprobs is not None else None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    })
                else:
                    choices.append({
                        "index": index,
                        "text": text,
                        "logprobs": _logprobs(tokens, b.top_logprobs) if logprobs is not None else None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    })
                prompt_tokens += len(_TOKEN.findall(prompt))
                completion_tokens += len(tokens)
            stats.prompts += len(prompts)
            return web.json_response({
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            })
        finally:
            stats.in_flight -= 1

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        name = b.model or "stub"
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "humpback-stub", "root": name}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


class StubHandle:
    """A running stub: `url` (…/v1), `stats`, `behaviour` (its options, live), and `await close()`."""

    def __init__(self, runner: web.AppRunner, url: str, stats: StubStats, behaviour: _Behaviour):
        self._runner, self.url, self.stats, self.behaviour = runner, url, stats, behaviour

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_stub(host: str = "127.0.0.1", port: int = 0, *, text: str | Callable[[str], str] = "ok",
                     top_logprobs: dict | None = None, delay_s: float = 0.0, jitter_s: float = 0.0,
                     fail_first: int = 0,
                     status_on_fail: int = 503, fail_on: str | None = None, retry_after: float | None = None,
                     model: str | None = None, chat_only: bool = False) -> StubHandle:
    """Start the stub in the running loop on `host:port` (0: a free port)."""
    _check_loopback(host)
    stats = StubStats()
    behaviour = _Behaviour(text, top_logprobs, delay_s, jitter_s, fail_first, status_on_fail, fail_on, retry_after,
                           model, chat_only)
    runner = web.AppRunner(_app(behaviour, stats), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return StubHandle(runner, f"http://{shown}:{bound[1]}/v1", stats, behaviour)


class StubServer:
    """`start_stub` on a thread with its own event loop, for sync code: `with StubServer(...) as stub`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any):
        self._args = (host, port)
        self._options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handle: StubHandle | None = None

    @property
    def url(self) -> str:
        assert self._handle is not None, "StubServer is not started"
        return self._handle.url

    @property
    def stats(self) -> StubStats:
        assert self._handle is not None, "StubServer is not started"
        return self._handle.stats

    @property
    def behaviour(self) -> _Behaviour:
        assert self._handle is not None, "StubServer is not started"
        return self._handle.behaviour

    def start(self) -> StubServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._handle = loop.run_until_complete(start_stub(*self._args, **self._options))
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._handle.close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="openai-stub", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m humpback_testing.openai_stub", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--text", default="ok", help="the completion of every prompt")
    p.add_argument("--top-logprobs", type=json.loads, default=None, metavar="JSON",
                   help='the top_logprobs entry of each token, e.g. \'{"5": -0.1, "4": -2.3}\'')
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument("--jitter-s", type=float, default=0.0, help="plus a random delay up to this: answers out of order")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--status-on-fail", type=int, default=503)
    p.add_argument("--fail-on", default=None, help="fail every request whose prompt contains this")
    p.add_argument("--retry-after", type=float, default=None)
    p.add_argument("--model", default=None, help="the only model served (default: any)")
    p.add_argument("--chat-only", action="store_true", help="serve /v1/chat/completions only (404 on /v1/completions)")
    args = p.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("host", "port")}

    async def serve() -> None:
        stub = await start_stub(args.host, args.port, **options)
        print(f"listening on {stub.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await stub.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())

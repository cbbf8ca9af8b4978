"""One asyncio client for the OpenAI-compatible APIs (what `vllm serve` exposes): completions and chat.

Used by the augment, rewrite, curate and evaluate stages against a vLLM server::

    settings = ClientSettings(base_url="http://vllm-augment:8000/v1", model="humpback-m0",
                              api_key=os.environ.get("VLLM_API_KEY"), concurrency=64)

    def build(record):                      # record -> (prompt, request parameters)
        return PROMPT.format(text=record["text"]), {"max_tokens": 256, "temperature": 0.7}

    def handle(record, choice):             # record, choices[0] -> output record, or None to drop it
        text = choice["text"].strip()
        return {"id": record["id"], "instruction": text, "output": record["text"]} if text else None

    async with CompletionsClient(settings) as client:
        stats = await run_completions(client, records, build, handle, store=store,
                                      prefix="ns/run/augment-m0", checkpoint_every=1000)
    # stats: completed, skipped_done, dropped, retries, seconds, records_per_second, prompt_tokens,
    #        completion_tokens, shards_written, rejected_by_server, prompt_too_long, rejected_examples

`CompletionsClient.complete(prompt, **params)` POSTs `{"model", "prompt", **params}` to
`{base_url}/completions` and returns `choices[0]` (`text`, `logprobs`, `finish_reason`, ...) with
the response's `usage` added under `"usage"`. With `ClientSettings(api="chat")` it POSTs
`{"model", "messages": [{"role": "user", "content": prompt}], **params}` to
`{base_url}/chat/completions` instead, so the server applies the model's chat template (external
judges and rewriters; our own trained models keep the completions API with our template), and
hands back the same shape: `text` is the message's content, a completions-style `logprobs:
k` parameter is sent as `logprobs: true, top_logprobs: k`, and the chat response's
`logprobs.content` comes back as the completions shape `{tokens, token_logprobs, top_logprobs}`.
So every caller, `run_completions` and the engines reads one shape from either API. Connection errors, timeouts and HTTP 408/429/5xx are
retried `max_retries` times with exponential backoff and full jitter (a uniform delay in
[0, min(backoff_max_s, backoff_base_s * 2**attempt)]); a `Retry-After` header (seconds or an HTTP
date) replaces that delay, capped at `backoff_max_s`. Any other 4xx raises `CompletionError` at once
with the server's message. The API key goes in an `Authorization: Bearer` header and nowhere else:
not in logs, reprs or error messages.

`run_completions` keeps at most `concurrency` requests in flight (that many worker coroutines
pulling from one shared iterator, so millions of records never become millions of tasks) and
checkpoints to the store:

- Outputs: every `checkpoint_every` finished records one new shard `PREFIX/part-NNNNN.jsonl`
  (a plain `ShardWriter` shard, so downstream stages read it with `list_shards` /
  `iter_shard_records`), numbered on from the highest shard already there. Only one process may
  number shards under a prefix: stages call this under their lease (`humpback_runtime.lease`). Each output record
  carries the input's id under `id_field` (added when `handle` leaves it out). Records within and
  across shards are in completion order, not input order: join on the id.
- Dropped records (`handle` returned None) go, as `{id_field: id}`, to a separate shard set
  `PREFIX/dropped/part-NNNNN.jsonl`, written just before the output shard of the same checkpoint.
  `list_shards(store, PREFIX)` lists only the folder's own shards, so readers of the outputs never
  see them, and a restart does not ask the server again for records it already decided to drop.
- Exactly-once by id: on start the ids in both shard sets are read and those input records are
  skipped. A shard is written whole or not at all, so records in flight (or finished but not yet
  checkpointed) when the process dies are simply redone by the next run. Input ids must be unique:
  a repeated id raises `CompletionError`.
- A record the server refuses for what it is (HTTP 400, 413 or 422: a prompt longer than the
  context, a bad prompt) is dropped, never retried: `{id_field: id, "rejected": "HTTP 400: <the
  server's message>"}` goes to the dropped shards and `rejected_by_server` counts it (the first
  ones in `rejected_examples`). A prompt that `check_prompt` says cannot fit (the engine knows the
  model's context and tokenizer) is dropped the same way without being sent, marked
  `"before_sending": true` and counted as `prompt_too_long`. Only when more than `max_rejected`
  records (earlier attempts, and both kinds, included) are refused does the run fail: then it is
  the requests, not the records.
- A record that still fails after its retries fails the run: the other requests are cancelled,
  what already finished is flushed to a last shard, then `CompletionError` (naming the record id,
  the URL and the last status or error) is raised. The same flush happens on any other error or
  on cancellation, so finished work is never silently lost.

Progress (:mod:`humpback_runtime.progress`): records done of `total`, tokens, retries and the last
retried error go to the stage's `_PROGRESS.json` every few seconds and to a bar on a terminal (plain
log lines otherwise); each written checkpoint resets the checkpoint age.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from humpback_runtime.storage import ShardWriter, StorageError, Store, iter_shard_records, list_shards

__all__ = ["ClientSettings", "CompletionError", "CompletionsClient", "REJECT_STATUSES", "rejected_records",
           "run_completions"]

log = logging.getLogger(__name__)

APIS = ("completions", "chat")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # plus every other 5xx
# The server refuses this record (context length, a prompt it cannot take): drop it and go on.
REJECT_STATUSES = frozenset({400, 413, 422})
_REJECTED_EXAMPLES = 5
DROPPED_FOLDER = "dropped"
_SHARD_INDEX = re.compile(r"part-(\d+)\.")
_MESSAGE_LIMIT = 500  # characters of a server's error body kept in a message


class CompletionError(RuntimeError):
    """A completion failed for good, or the input cannot be completed exactly once.

    Attributes (None where they do not apply): `record_id`, `url`, `status` (the last HTTP status),
    `attempts` and `reason` (the last status line / error, or the server's message).
    """

    def __init__(self, reason: str, *, url: str | None = None, status: int | None = None,
                 attempts: int | None = None, record_id: Hashable | None = None):
        self.reason, self.url, self.status, self.attempts, self.record_id = reason, url, status, attempts, record_id
        super().__init__(self._message())

    def _message(self) -> str:
        if self.url is None:
            return self.reason
        subject = "Completion request"
        if self.record_id is not None:
            subject += f" for record {self.record_id!r}"
        if self.attempts is not None and self.attempts > 1:
            return f"{subject} to {self.url} failed after {self.attempts} attempts: {self.reason}"
        return f"{subject} to {self.url} failed: {self.reason}"

    def for_record(self, record_id: Hashable) -> CompletionError:
        """The same error, naming the record it was for."""
        return CompletionError(self.reason, url=self.url, status=self.status, attempts=self.attempts,
                               record_id=record_id)


@dataclass
class ClientSettings:
    """Where and how to send completion requests. `api_key` is never logged nor shown in the repr."""

    base_url: str  # the API root, ending in /v1: http://vllm-augment:8000/v1
    model: str  # the served model name (vllm serve --served-model-name)
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 64  # requests in flight, and the connection pool's size
    max_retries: int = 5  # retries after the first attempt
    timeout_s: float = 600.0  # one attempt, connecting to the last byte of the response
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    api: str = "completions"  # "completions" (/completions, a prompt) or "chat" (/chat/completions, messages)

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api: expected 'completions' or 'chat', got {self.api!r}")
        self.base_url = self.base_url.rstrip("/")
        if not re.fullmatch(r"https?://[^/]+(/.*)?/v1", self.base_url):
            raise ValueError(f"base_url: expected the API root, http(s)://HOST[:PORT]/.../v1 "
                             f"(e.g. http://vllm:8000/v1), got {self.base_url!r}")
        if not self.model:
            raise ValueError("model: expected the served model name, got an empty string")
        for name in ("concurrency",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries: expected an integer >= 0, got {self.max_retries!r}")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected seconds >= 0, got {getattr(self, name)!r}")


def _import_aiohttp():
    try:
        import aiohttp
    except ImportError as e:  # pragma: no cover - aiohttp is a core dependency
        raise ImportError("The completions client needs aiohttp (pip install aiohttp)") from e
    return aiohttp


def _server_message(body: bytes) -> str:
    """The message of an OpenAI / vLLM error body, else the body itself, shortened."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif payload.get("message"):  # vLLM's {"object": "error", "message": ...}
            text = str(payload["message"])
        elif payload.get("detail"):  # FastAPI's validation errors
            text = str(payload["detail"])
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "…"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class CompletionsClient:
    """Async context manager owning one aiohttp session whose connection pool holds `concurrency`."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.chat = settings.api == "chat"
        self.url = f"{settings.base_url}/chat/completions" if self.chat else f"{settings.base_url}/completions"
        self.retries = 0  # retries made by every request so far
        self.last_error: str | None = None  # of the last failed attempt, for the progress file
        self._session = None
        self._aiohttp = _import_aiohttp()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"
        self._retry_errors = (self._aiohttp.ClientError, asyncio.TimeoutError)

    async def __aenter__(self) -> CompletionsClient:
        aiohttp = self._aiohttp
        s = self.settings
        connector = aiohttp.TCPConnector(limit=s.concurrency, limit_per_host=s.concurrency,
                                         ttl_dns_cache=300, enable_cleanup_closed=True)
        # total=None on the session: each request sets its own timeout below.
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                              raise_for_status=False, auto_decompress=True)
        self._timeout = aiohttp.ClientTimeout(total=s.timeout_s or None)
        log.info("Opened completions client for %s (model %s, concurrency %d, %d retries, timeout %gs)",
                 self.url, s.model, s.concurrency, s.max_retries, s.timeout_s)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.backoff_max_s)
        return random.uniform(0.0, min(s.backoff_max_s, s.backoff_base_s * 2 ** attempt))

    async def complete(self, prompt: str, **params: Any) -> dict:
        """choices[0] of the completion of `prompt`, plus `"usage"`; `params` go in the request body."""
        if self._session is None:
            raise RuntimeError("CompletionsClient is not open: use it as `async with CompletionsClient(...)`")
        body = json.dumps(self._body(prompt, params)).encode()
        max_retries = self.settings.max_retries
        attempt = 0
        while True:
            status: int | None = None
            retry_after = None
            try:
                async with self._session.post(self.url, data=body, headers=self._headers,
                                              timeout=self._timeout) as resp:
                    status = resp.status
                    data = await resp.read()
                    if status == 200:
                        return self._choice(data)
                    reason = f"HTTP {status}: {_server_message(data)}"
                    if status not in RETRY_STATUSES and status < 500:
                        raise CompletionError(reason, url=self.url, status=status, attempts=attempt + 1)
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except self._retry_errors as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if status is not None:
                    reason = f"HTTP {status}, then {reason}"
            self.last_error = reason
            if attempt >= max_retries:
                raise CompletionError(reason, url=self.url, status=status, attempts=attempt + 1)
            delay = self._delay(attempt, retry_after)
            log.debug("Retrying completion request to %s in %.2fs (attempt %d of %d): %s",
                      self.url, delay, attempt + 2, max_retries + 1, reason)
            self.retries += 1
            attempt += 1
            await asyncio.sleep(delay)

    def _body(self, prompt: str, params: dict) -> dict:
        if not self.chat:
            return {"model": self.settings.model, "prompt": prompt, **params}
        params = dict(params)
        top = params.pop("logprobs", None)
        if top is not None:  # completions: logprobs=K; chat: logprobs=true, top_logprobs=K
            params["logprobs"] = True
            params["top_logprobs"] = int(top)
        return {"model": self.settings.model, "messages": [{"role": "user", "content": prompt}], **params}

    def _choice(self, data: bytes) -> dict:
        kind = "chat completions" if self.chat else "completions"
        try:
            payload = json.loads(data)
            choice = payload["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError(f"choices[0] is a {type(choice).__name__}")
            if self.chat:
                choice = _chat_choice(choice)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CompletionError(f"HTTP 200 but not an OpenAI {kind} response ({e}): "
                                  f"{_server_message(data)}", url=self.url, status=200) from None
        choice["usage"] = payload.get("usage") or {}
        return choice


def _chat_choice(choice: dict) -> dict:
    """A chat choice in the completions shape: `text`, `finish_reason`, `logprobs` {tokens, token_logprobs,
    top_logprobs: [{token: logprob}]}; the original message stays under `message`."""
    message = choice["message"]
    if not isinstance(message, dict):
        raise TypeError(f"choices[0].message is a {type(message).__name__}")
    content = message.get("content")
    logprobs = None
    entries = (choice.get("logprobs") or {}).get("content")
    if entries is not None:
        logprobs = {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or []} for e in entries],
        }
    return {"index": choice.get("index", 0), "text": content if isinstance(content, str) else "",
            "finish_reason": choice.get("finish_reason"), "logprobs": logprobs, "message": message}


# --- running many records with checkpoints ---------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    prefix = prefix.rstrip("/")
    return f"{prefix}/{name}" if prefix else name


def _scan(store: Store, prefix: str, id_field: str, done: set) -> int:
    """Add the ids of the shards under `prefix` to `done`; returns the next free shard index."""
    keys = list_shards(store, prefix)
    for key, record in _records_with_keys(store, keys):
        if not isinstance(record, dict) or id_field not in record:
            raise StorageError(f"{store.url(key)}: a record has no {id_field!r} field, so the run cannot "
                               f"resume exactly once (is another stage writing under {store.url(prefix)}?)")
        done.add(record[id_field])
    indices = [int(m.group(1)) for k in keys if (m := _SHARD_INDEX.match(k.rsplit("/", 1)[-1]))]
    return max(indices, default=-1) + 1


def rejected_records(store: Store, prefix: str, examples: int = _REJECTED_EXAMPLES) -> dict[str, Any]:
    """The records under `prefix` refused over every attempt: {"count", "examples", "before_sending"}.

    `count` holds both kinds: refused by the server, and dropped before sending because the prompt
    could not fit the context (`before_sending` of them).
    """
    count, before_sending, kept = 0, 0, []
    for record in iter_shard_records(store, list_shards(store, _join(prefix, DROPPED_FOLDER))):
        if isinstance(record, dict) and record.get("rejected"):
            count += 1
            before_sending += bool(record.get("before_sending"))
            if len(kept) < examples:
                kept.append({"id": record.get("id"), "reason": record["rejected"]})
    return {"count": count, "examples": kept, "before_sending": before_sending}


def _records_with_keys(store: Store, keys: list[str]) -> Iterator[tuple[str, Any]]:
    for key in keys:
        for record in iter_shard_records(store, [key]):
            yield key, record


class _Checkpointer:
    """Collects finished records and writes them as one output shard (+ one dropped shard) per batch.

    Shard indices are taken when a batch is cut, so writes never race for a name. Writes run on one
    background thread, in order, so the event loop keeps the requests flowing meanwhile.
    """

    def __init__(self, store: Store, prefix: str, id_field: str, every: int, next_out: int, next_dropped: int,
                 on_written: Callable[[], None] = lambda: None):
        self.store, self.prefix, self.id_field, self.every = store, prefix, id_field, every
        self.on_written = on_written
        self.dropped_prefix = _join(prefix, DROPPED_FOLDER)
        self.next_out, self.next_dropped = next_out, next_dropped
        self.outputs: list[dict] = []
        self.dropped: list[dict] = []
        self.shards_written = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="humpback-checkpoint")

    @property
    def pending(self) -> int:
        return len(self.outputs) + len(self.dropped)

    def _cut(self):
        outputs, dropped = self.outputs, self.dropped
        self.outputs, self.dropped = [], []
        out_index = dropped_index = None
        if outputs:
            out_index, self.next_out = self.next_out, self.next_out + 1
        if dropped:
            dropped_index, self.next_dropped = self.next_dropped, self.next_dropped + 1
        return self._executor.submit(self._write, outputs, out_index, dropped, dropped_index)

    async def maybe_flush(self) -> None:
        if self.pending >= self.every:
            await asyncio.wrap_future(self._cut())  # only this worker waits: backpressure if storage lags

    def close(self) -> None:
        """Write what is left and wait for every write (blocking: the run is over)."""
        try:
            if self.pending:
                self._cut().result()
        finally:
            self._executor.shutdown(wait=True)

    def _write(self, outputs: list[dict], out_index: int | None, dropped: list[dict], dropped_index: int | None):
        # Dropped ids first: if the process dies between the two, the outputs are simply redone.
        for prefix, records, index in ((self.dropped_prefix, dropped, dropped_index),
                                       (self.prefix, outputs, out_index)):
            if records:
                with ShardWriter(self.store, prefix, records_per_shard=len(records), start_index=index) as writer:
                    for record in records:
                        writer.write(record)
                self.shards_written += 1
                self.on_written()
                log.debug("Checkpointed %d records to %s", len(records), self.store.url(writer.shards[0]))


async def run_completions(
    client: CompletionsClient,
    records: Iterable[dict],
    build: Callable[[dict], tuple[str, dict]],
    handle: Callable[[dict, dict], dict | None],
    *,
    store: Store,
    prefix: str,
    id_field: str = "id",
    checkpoint_every: int = 1000,
    total: int | None = None,
    desc: str = "completions",
    max_rejected: int | None = None,
    check_prompt: Callable[[str, dict], str | None] | None = None,
) -> dict[str, Any]:
    """Complete every record not already under `prefix`, checkpointing shards; returns the stats.

    `build(record)` gives `(prompt, params)`; `handle(record, choice)` the output record, or None to
    drop it. `total` (the number of input records, if known) sizes the progress bar. `max_rejected`:
    how many records may be refused (by the server: HTTP 400/413/422, or by `check_prompt`) before
    the run fails; None: no limit. `check_prompt(prompt, params)` gives the reason a prompt cannot be
    sent (longer than the context), or None.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected an integer >= 1, got {checkpoint_every!r}")
    done: set = set()
    next_out = _scan(store, prefix, id_field, done)
    n_done_outputs = len(done)
    next_dropped = _scan(store, _join(prefix, DROPPED_FOLDER), id_field, done)
    if done:
        log.info("Resuming %s: %d records already done (%d written, %d dropped); skipping them",
                 store.url(prefix), len(done), n_done_outputs, len(done) - n_done_outputs)

    from humpback_runtime import progress

    stats = {"completed": 0, "skipped_done": 0, "dropped": 0, "prompt_tokens": 0, "completion_tokens": 0,
             "rejected_by_server": 0, "prompt_too_long": 0}
    rejected_before = rejected_records(store, prefix, examples=0)["count"] if max_rejected is not None else 0
    rejected_examples: list[dict] = []
    retries_before = client.retries
    # Counts every input record: those done by an earlier attempt start the count (not the rate).
    bar = progress.track(desc, total=total, done=len(done) if total is not None else 0)
    checkpoints = _Checkpointer(store, prefix, id_field, checkpoint_every, next_out, next_dropped,
                                on_written=bar.checkpoint)

    def todo() -> Iterator[tuple[Hashable, dict]]:
        seen: set = set()
        for position, record in enumerate(records):
            try:
                rid = record[id_field]
            except (KeyError, TypeError):
                raise CompletionError(f"Input record {position} has no {id_field!r} field: "
                                      f"exactly-once needs an id on every record") from None
            if rid in seen:
                raise CompletionError(f"Duplicate record id {rid!r} in the input (record {position}): "
                                      f"exactly-once needs unique ids")
            seen.add(rid)
            if rid in done:
                stats["skipped_done"] += 1
                continue
            yield rid, record

    pending = todo()  # one iterator shared by the workers; next() never awaits, so no two run it at once

    async def refuse(rid: Hashable, reason: str, error: CompletionError | None) -> None:
        """Drop a record refused for what it is, with the reason; fail past `max_rejected`."""
        if error is None:
            checkpoints.dropped.append({id_field: rid, "rejected": reason, "before_sending": True})
            stats["prompt_too_long"] += 1
        else:
            checkpoints.dropped.append({id_field: rid, "rejected": reason})
            stats["rejected_by_server"] += 1
        if len(rejected_examples) < _REJECTED_EXAMPLES:
            rejected_examples.append({"id": rid, "reason": reason})
            log.warning("Record %r dropped: %s", rid, reason)
        n_rejected = rejected_before + stats["rejected_by_server"] + stats["prompt_too_long"]
        if max_rejected is not None and n_rejected > max_rejected:
            raise CompletionError(
                f"{n_rejected} records were refused, more than the {max_rejected} allowed "
                f"(inference.maxRejectedFraction); the last, {rid!r}: {reason}",
                url=error.url if error else None, status=error.status if error else None) from error
        bar.update(1)
        await checkpoints.maybe_flush()

    async def worker() -> None:
        for rid, record in pending:
            try:
                prompt, params = build(record)
                too_long = check_prompt(prompt, params) if check_prompt is not None else None
            except Exception as e:
                e.add_note(f"while building the request for record {rid!r}")
                raise
            if too_long:
                await refuse(rid, too_long, None)  # the server would refuse it: never send it
                continue
            try:
                choice = await client.complete(prompt, **params)
            except CompletionError as e:
                if e.status not in REJECT_STATUSES:
                    raise e.for_record(rid) from e
                # The server refuses this record, not requests of this kind: drop it with the reason.
                await refuse(rid, e.reason, e)
                continue
            usage = choice.get("usage") or {}
            stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
            stats["completion_tokens"] += usage.get("completion_tokens") or 0
            try:
                output = handle(record, choice)
            except Exception as e:
                e.add_note(f"while handling the completion of record {rid!r}")
                raise
            if output is None:
                checkpoints.dropped.append({id_field: rid})
                stats["dropped"] += 1
            else:
                got = output.setdefault(id_field, rid)
                if got != rid:
                    raise CompletionError(f"handle() returned {id_field}={got!r} for record {rid!r}: "
                                          f"the output must keep the input's id")
                checkpoints.outputs.append(output)
                stats["completed"] += 1
            bar.update(1, tokens=(usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0))
            bar.retries = client.retries - retries_before
            if getattr(client, "last_error", None):
                bar.error(client.last_error, count=False)
            await checkpoints.maybe_flush()

    start = time.perf_counter()
    workers = [asyncio.create_task(worker()) for _ in range(client.settings.concurrency)]
    try:
        finished, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        for task in finished:
            if task.exception() is not None:
                bar.error(str(task.exception()))
                raise task.exception()
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        bar.close()
        try:
            checkpoints.close()
        except Exception:
            # Raise the write error itself only when nothing else went wrong.
            log.exception("Failed to checkpoint %d finished records under %s; the next run redoes them",
                          checkpoints.pending, store.url(prefix))
            if _succeeded(workers):
                raise

    seconds = time.perf_counter() - start
    processed = stats["completed"] + stats["dropped"]
    result = {
        "completed": stats["completed"],
        "skipped_done": stats["skipped_done"],
        "dropped": stats["dropped"],
        "retries": client.retries - retries_before,
        "seconds": round(seconds, 3),
        "records_per_second": round(processed / seconds, 1) if seconds > 0 else 0.0,
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "shards_written": checkpoints.shards_written,
        "rejected_by_server": stats["rejected_by_server"],
        "prompt_too_long": stats["prompt_too_long"],
        "rejected_examples": rejected_examples,
    }
    log.info("Completed %d records under %s (%d dropped, %d already done, %d retries) in %.1fs, %.1f records/s",
             result["completed"], store.url(prefix), result["dropped"], result["skipped_done"], result["retries"],
             seconds, result["records_per_second"])
    return result


def _succeeded(tasks: list[asyncio.Task]) -> bool:
    return all(t.done() and not t.cancelled() and t.exception() is None for t in tasks)

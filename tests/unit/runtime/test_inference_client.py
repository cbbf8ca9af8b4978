"""The completions client against the OpenAI stub on loopback: retries, bounds, checkpoints, restarts."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

from humpback_runtime.inference.client import (  # noqa: E402
    ClientSettings,
    CompletionError,
    CompletionsClient,
    _retry_after,
    run_completions,
)
from humpback_runtime.storage import iter_shard_records, list_shards, open_store  # noqa: E402
from humpback_testing.openai_stub import StubServer, start_stub  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
PREFIX = "ns/run/augment-m0"


def _settings(url: str, **overrides) -> ClientSettings:
    options = {"model": "tiny", "concurrency": 8, "backoff_base_s": 0.001, "backoff_max_s": 0.01}
    return ClientSettings(base_url=url, **{**options, **overrides})


def _records(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "text": f"document {i}"} for i in range(start, start + n)]


def build(record: dict) -> tuple[str, dict]:
    return f"Instruction for: {record['text']}", {"max_tokens": 16, "temperature": 0.0}


def handle(record: dict, choice: dict) -> dict:
    return {"id": record["id"], "instruction": choice["text"], "output": record["text"]}


async def _run(url: str, store, records, *, handle=handle, checkpoint_every: int = 10, **overrides) -> dict:
    async with CompletionsClient(_settings(url, **overrides)) as client:
        return await run_completions(client, records, build, handle, store=store, prefix=PREFIX,
                                     checkpoint_every=checkpoint_every, total=len(records))


def _ids(store, prefix: str = PREFIX) -> list:
    return [r["id"] for r in iter_shard_records(store, list_shards(store, prefix))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


# --- the stub -------------------------------------------------------------------------------------

def test_stub_answers_like_vllm_completions_with_logprobs_and_length_limit():
    async def main():
        import aiohttp

        stub = await start_stub(text="a b c", top_logprobs={"5": -0.1, "4": -2.3})
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{stub.url}/completions",
                                        json={"model": "m", "prompt": "x y", "logprobs": 2, "max_tokens": 2}) as r:
                    body = await r.json()
                async with session.get(f"{stub.url}/models") as r:
                    models = await r.json()
                async with session.get(stub.url.removesuffix("/v1") + "/health") as r:
                    health = r.status
        finally:
            await stub.close()
        return body, models, health

    body, models, health = asyncio.run(main())
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == "a b" and choice["finish_reason"] == "length" and choice["index"] == 0
    assert choice["logprobs"]["tokens"] == ["a", " b"]
    assert choice["logprobs"]["text_offset"] == [0, 1]
    assert choice["logprobs"]["top_logprobs"] == [{"5": -0.1, "4": -2.3}] * 2
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert models["data"][0]["object"] == "model" and health == 200


def test_stub_refuses_to_listen_beyond_loopback():
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(start_stub("0.0.0.0"))


# --- settings and single requests -------------------------------------------------------------------

def test_settings_name_the_field_and_expected_shape():
    with pytest.raises(ValueError, match=r"base_url: expected .*/v1"):
        ClientSettings(base_url="http://vllm:8000", model="m")
    with pytest.raises(ValueError, match="concurrency: expected an integer >= 1"):
        ClientSettings(base_url="http://vllm:8000/v1/", model="m", concurrency=0)
    assert ClientSettings(base_url="http://vllm:8000/v1/", model="m").base_url == "http://vllm:8000/v1"


def test_complete_returns_the_first_choice_with_usage():
    with StubServer(text="the answer") as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url)) as client:
                return await client.complete("question?", max_tokens=5, logprobs=1)

        choice = asyncio.run(main())
    assert choice["text"] == "the answer" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == ["the", " answer"]
    assert choice["usage"]["completion_tokens"] == 2


API = pytest.mark.parametrize("api", ["completions", "chat"])


def _stub(api: str, **options) -> StubServer:
    """A stub that serves the chat route only when the client speaks chat: no fallback can hide a bug."""
    return StubServer(chat_only=api == "chat", **options)


def test_chat_api_sends_messages_and_reads_the_chat_response_in_the_completions_shape():
    with StubServer(text="the answer", chat_only=True, top_logprobs={"5": -0.1, "4": -2.5}) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, api="chat")) as client:
                return await client.complete("question?", max_tokens=5, logprobs=2)

        choice = asyncio.run(main())
    assert stub.stats.chat_requests == 1 == stub.stats.requests
    assert choice["text"] == "the answer" and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "the answer"}
    assert choice["logprobs"]["tokens"] == ["the", " answer"]
    assert choice["logprobs"]["top_logprobs"][0] == {"5": -0.1, "4": -2.5}
    assert choice["usage"]["completion_tokens"] == 2


def test_chat_only_server_refuses_the_completions_api():
    with StubServer(chat_only=True) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url)) as client:
                await client.complete("p")

        with pytest.raises(CompletionError, match="404"):
            asyncio.run(main())


def test_api_setting_is_checked():
    with pytest.raises(ValueError, match="api: expected 'completions' or 'chat'"):
        _settings("http://127.0.0.1:1/v1", api="responses")


@API
def test_503_is_retried_with_backoff_then_succeeds(api):
    with _stub(api, fail_first=3, status_on_fail=503) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, max_retries=3, api=api)) as client:
                return await client.complete("p"), client.retries

        choice, retries = asyncio.run(main())
    assert choice["text"] == "ok" and retries == 3 and stub.stats.requests == 4


@API
def test_retry_after_header_is_honoured(api):
    with _stub(api, fail_first=1, status_on_fail=429, retry_after=0.4) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, backoff_base_s=0.001, backoff_max_s=5,
                                                   api=api)) as client:
                start = time.perf_counter()
                await client.complete("p")
                return time.perf_counter() - start

        elapsed = asyncio.run(main())
    assert elapsed >= 0.4 and stub.stats.requests == 2


def test_retry_after_reads_seconds_and_http_dates():
    assert _retry_after("2") == 2.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= _retry_after(in_ten) <= 10


def test_400_fails_at_once_with_the_servers_message():
    with StubServer(fail_first=1, status_on_fail=400) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, max_retries=5)) as client:
                await client.complete("p")

        with pytest.raises(CompletionError, match=r"HTTP 400: stub failure \(HTTP 400\)") as info:
            asyncio.run(main())
    assert stub.stats.requests == 1 and info.value.status == 400
    assert f"{stub.url}/completions" in str(info.value)


def test_unknown_model_fails_at_once_with_vllms_404():
    with StubServer(model="served") as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, model="other")) as client:
                await client.complete("p")

        with pytest.raises(CompletionError, match="HTTP 404: The model `other` does not exist"):
            asyncio.run(main())
    assert stub.stats.requests == 1


def test_unreachable_server_is_retried_then_named_in_the_error():
    url = f"http://127.0.0.1:{_free_port()}/v1"

    async def main():
        async with CompletionsClient(_settings(url, max_retries=2)) as client:
            await client.complete("p")

    with pytest.raises(CompletionError, match=r"to http://127\.0\.0\.1:\d+/v1/completions failed after 3 attempts: "
                                              r"ClientConnectorError") as info:
        asyncio.run(main())
    assert info.value.attempts == 3 and info.value.status is None


def test_slow_answers_time_out_and_are_retried():
    with StubServer(delay_s=0.5) as stub:
        async def main():
            async with CompletionsClient(_settings(stub.url, timeout_s=0.05, max_retries=1)) as client:
                await client.complete("p")

        with pytest.raises(CompletionError, match="failed after 2 attempts: .*Timeout"):
            asyncio.run(main())
    assert stub.stats.requests == 2


def test_api_key_is_sent_as_bearer_and_never_logged_or_shown(caplog, store):
    key = "sk-very-secret-0123"
    caplog.set_level(logging.DEBUG)
    with StubServer(fail_on="document 3", status_on_fail=503) as stub:
        settings = _settings(stub.url, api_key=key, max_retries=1)

        async def main():
            async with CompletionsClient(settings) as client:
                await run_completions(client, _records(5), build, handle, store=store, prefix=PREFIX)

        with pytest.raises(CompletionError) as info:
            asyncio.run(main())
    assert stub.stats.authorization == f"Bearer {key}"
    assert key not in caplog.text and key not in str(info.value) and key not in repr(settings)
    assert "Retrying completion request" in caplog.text  # the retries were logged, without the key


# --- run_completions ---------------------------------------------------------------------------------

def test_outputs_are_checkpointed_every_n_records(store):
    with StubServer(text="Write about it.") as stub:
        stats = asyncio.run(_run(stub.url, store, _records(25), checkpoint_every=10))
    shards = list_shards(store, PREFIX)
    assert [k.rsplit("/", 1)[-1] for k in shards] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert [len(list(iter_shard_records(store, [k]))) for k in shards] == [10, 10, 5]
    records = {r["id"]: r for r in iter_shard_records(store, shards)}
    assert set(records) == {f"r{i}" for i in range(25)}
    assert records["r7"] == {"id": "r7", "instruction": "Write about it.", "output": "document 7"}
    assert stats["completed"] == 25 and stats["dropped"] == stats["skipped_done"] == stats["retries"] == 0
    assert stats["completion_tokens"] == 25 * 3 and stats["prompt_tokens"] == 25 * 4
    assert stats["shards_written"] == 3 and stats["records_per_second"] > 0
    assert not store.list(f"{PREFIX}/dropped")


@API
def test_at_most_concurrency_requests_are_in_flight(store, api):
    with _stub(api, delay_s=0.02) as stub:
        asyncio.run(_run(stub.url, store, _records(40), concurrency=3, api=api))
    assert stub.stats.max_in_flight == 3 and stub.stats.requests == 40


@API
def test_a_record_failing_all_retries_fails_the_run_and_keeps_what_finished(store, api):
    records = _records(10)
    route = "chat/completions" if api == "chat" else "completions"
    with _stub(api, fail_on="document 5", status_on_fail=503) as stub:
        with pytest.raises(CompletionError) as info:
            asyncio.run(_run(stub.url, store, records, concurrency=1, max_retries=2, checkpoint_every=2, api=api))
    err = info.value
    assert err.record_id == "r5" and err.status == 503 and err.attempts == 3
    assert f"record 'r5' to {stub.url}/{route} failed after 3 attempts: HTTP 503" in str(err)
    # r0-r3 were checkpointed during the run, r4 by the flush on the way out.
    assert sorted(_ids(store)) == ["r0", "r1", "r2", "r3", "r4"]

    with _stub(api) as stub:
        stats = asyncio.run(_run(stub.url, store, records, checkpoint_every=2, api=api))
    assert stats["skipped_done"] == 5 and stats["completed"] == 5 and stub.stats.requests == 5
    assert Counter(_ids(store)) == Counter(r["id"] for r in records)


def test_dropped_records_are_remembered_and_not_redone(store):
    def keep_odd(record, choice):
        return handle(record, choice) if int(record["id"][1:]) % 2 else None

    records = _records(12)
    with StubServer() as stub:
        stats = asyncio.run(_run(stub.url, store, records, handle=keep_odd, checkpoint_every=4))
    assert stats["completed"] == 6 and stats["dropped"] == 6
    assert sorted(_ids(store)) == sorted(f"r{i}" for i in range(1, 12, 2))
    assert sorted(_ids(store, f"{PREFIX}/dropped")) == sorted(f"r{i}" for i in range(0, 12, 2))

    with StubServer() as stub:
        stats = asyncio.run(_run(stub.url, store, records, handle=keep_odd, checkpoint_every=4))
    assert stub.stats.requests == 0 and stats["skipped_done"] == 12 and stats["completed"] == stats["dropped"] == 0


def test_duplicate_input_ids_are_rejected(store):
    records = _records(3) + [{"id": "r1", "text": "again"}]
    with StubServer() as stub:
        with pytest.raises(CompletionError, match="Duplicate record id 'r1' in the input"):
            asyncio.run(_run(stub.url, store, records))
    assert Counter(_ids(store)) <= Counter(["r0", "r1", "r2"])  # whatever finished, once


def test_output_without_the_id_gets_it_and_a_changed_id_is_refused(store):
    with StubServer() as stub:
        asyncio.run(_run(stub.url, store, _records(3), handle=lambda r, c: {"text": c["text"]}))
        assert sorted(_ids(store)) == ["r0", "r1", "r2"]
        with pytest.raises(CompletionError, match="must keep the input's id"):
            asyncio.run(_run(stub.url, store, _records(1, start=3), handle=lambda r, c: {"id": "other"}))


_KILLED_RUN = textwrap.dedent("""
    import asyncio, json, sys
    from humpback_runtime.inference.client import ClientSettings, CompletionsClient, run_completions
    from humpback_runtime.storage import open_store

    url, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    records = [{"id": f"r{i}", "text": f"document {i}"} for i in range(n)]

    async def main():
        settings = ClientSettings(base_url=url, model="tiny", concurrency=4)
        async with CompletionsClient(settings) as client:
            await run_completions(client, records, lambda r: (r["text"], {}),
                                  lambda r, c: {"id": r["id"], "instruction": c["text"]},
                                  store=open_store(root), prefix=%r, checkpoint_every=5)

    asyncio.run(main())
""" % PREFIX)


def test_killed_run_resumes_exactly_once(tmp_path, store):
    n = 400
    with StubServer(delay_s=0.02) as stub:  # 4 in flight, 20 ms each: ~2 s for the whole run
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, stub.url, store.uri, str(n)], cwd=ROOT,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while len(list_shards(store, PREFIX)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run wrote no shards"
            time.sleep(0.005)
        proc.kill()  # SIGKILL: no flush on the way out
        proc.wait()
        proc.stderr.close()
    first = _ids(store)
    assert 15 <= len(first) < n and len(set(first)) == len(first)

    with StubServer() as stub:
        stats = asyncio.run(_run(stub.url, store, _records(n), checkpoint_every=50))
    assert stub.stats.requests == n - len(first) < n
    assert stats["skipped_done"] == len(first) and stats["completed"] == n - len(first)
    assert Counter(_ids(store)) == Counter(f"r{i}" for i in range(n))  # every id, exactly once
    indices = [int(k.rsplit("part-", 1)[1].split(".")[0]) for k in list_shards(store, PREFIX)]
    assert len(indices) == len(set(indices))  # the rerun numbered its shards after the first run's


def test_cancelled_run_flushes_what_finished(store):
    async def main(url):
        task = asyncio.create_task(_run(url, store, _records(200), concurrency=4, checkpoint_every=1000))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with StubServer(delay_s=0.02) as stub:
        asyncio.run(main(stub.url))
    ids = _ids(store)
    assert 0 < len(ids) < 200 and len(ids) == len(set(ids))
    assert len(list_shards(store, PREFIX)) == 1


def test_stub_runs_as_a_separate_process():
    proc = subprocess.Popen([sys.executable, "-m", "humpback_testing.openai_stub", "--port", "0", "--text", "hi"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]

        async def main():
            async with CompletionsClient(_settings(url)) as client:
                return await client.complete("p")

        assert asyncio.run(main())["text"] == "hi"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_module_docstring_example_shape_matches_the_stats(store):
    with StubServer() as stub:
        stats = asyncio.run(_run(stub.url, store, _records(2)))
    assert set(stats) == {"completed", "skipped_done", "dropped", "retries", "seconds", "records_per_second",
                          "prompt_tokens", "completion_tokens", "shards_written", "rejected_by_server",
                          "prompt_too_long", "rejected_examples"}
    json.dumps(stats)  # goes into the manifest as is


# --- a record the server refuses (issue 10) --------------------------------------------------------

@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_record_the_server_refuses_is_dropped_with_its_reason_and_the_run_goes_on(store, status):
    from humpback_runtime.inference.client import rejected_records

    async def main(stub_url):
        async with CompletionsClient(_settings(stub_url)) as client:
            return await run_completions(client, _records(20), build, handle, store=store, prefix=PREFIX,
                                         checkpoint_every=5, max_rejected=1)

    with StubServer(fail_on="document 7", status_on_fail=status) as stub:
        stats = asyncio.run(main(stub.url))
        assert stub.stats.requests == 20  # refused once, never retried
    assert stats["rejected_by_server"] == 1 and stats["completed"] == 19
    assert stats["rejected_examples"] == [{"id": "r7", "reason": f"HTTP {status}: stub failure (HTTP {status})"}]
    assert sorted(_ids(store)) == sorted(f"r{i}" for i in range(20) if i != 7)
    assert rejected_records(store, PREFIX) == {"count": 1, "examples": stats["rejected_examples"], "before_sending": 0}
    # Exactly once: a rerun asks for nothing, not even the refused record.
    with StubServer(fail_on="document 7", status_on_fail=status) as stub:
        again = asyncio.run(main(stub.url))
        assert stub.stats.requests == 0 and again["skipped_done"] == 20


def test_more_refusals_than_allowed_fail_the_run(store):
    async def main(stub_url):
        async with CompletionsClient(_settings(stub_url, concurrency=1)) as client:
            return await run_completions(client, _records(20), build, handle, store=store, prefix=PREFIX,
                                         checkpoint_every=5, max_rejected=1)

    with StubServer(fail_on="document 1", status_on_fail=400) as stub:  # document 1, 10..19: 11 refused
        with pytest.raises(CompletionError, match=r"2 records were refused, more than the 1 allowed"):
            asyncio.run(main(stub.url))


def test_a_prompt_that_cannot_fit_is_dropped_before_sending_and_counts_as_refused(tmp_path):
    """check_prompt (the engine's context limit) drops a record without a request; refusals of both
    kinds share max_rejected."""
    from humpback_runtime.inference.client import rejected_records

    def check(prompt: str, params: dict) -> str | None:
        return "prompt too long for the context" if "document 3" in prompt or "document 11" in prompt else None

    async def main(stub_url, store, max_rejected):
        async with CompletionsClient(_settings(stub_url, concurrency=1)) as client:
            return await run_completions(client, _records(20), build, handle, store=store, prefix=PREFIX,
                                         checkpoint_every=5, max_rejected=max_rejected, check_prompt=check)

    store = open_store(str(tmp_path / "a"))
    seen: list[str] = []
    with StubServer(text=lambda prompt: seen.append(prompt) or "ok", fail_on="document 7", status_on_fail=400) as stub:
        stats = asyncio.run(main(stub.url, store, max_rejected=3))
        assert stub.stats.requests == 18  # the two long prompts were never sent
    assert seen and not any("document 3" in p or "document 11" in p for p in seen)
    assert stats["prompt_too_long"] == 2 and stats["rejected_by_server"] == 1 and stats["completed"] == 17
    refused = rejected_records(store, PREFIX)
    assert refused["count"] == 3 and refused["before_sending"] == 2
    assert {"id": "r3", "reason": "prompt too long for the context"} in refused["examples"]

    # Two too long plus one refused by the server are more than the 2 allowed: the run fails.
    with StubServer(fail_on="document 7", status_on_fail=400) as stub:
        with pytest.raises(CompletionError, match=r"3 records were refused, more than the 2 allowed"):
            asyncio.run(main(stub.url, open_store(str(tmp_path / "b")), max_rejected=2))

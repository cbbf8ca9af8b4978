"""Inference sized to the hardware: concurrency auto, the vLLM block, whole shards for in-process
vLLM, the capacity-limited stub the occupancy bench runs against, and the prompt layout that lets
vLLM's prefix cache share the curation rubric."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import types

import pytest

from humpback_runtime import prompts
from humpback_runtime.inference.models import make_engine
from humpback_runtime.spec import InferenceSpec, SpecError, SystemPrompts
from humpback_testing.openai_stub import start_stub


def test_concurrency_auto_is_replicas_times_max_num_seqs() -> None:
    spec = InferenceSpec()
    assert spec.concurrency == "auto" and spec.vllm.max_num_seqs == 256
    assert spec.client_concurrency(replicas=3) == 768
    assert InferenceSpec(vllm={"maxNumSeqs": 64}).client_concurrency(replicas=2) == 128
    assert InferenceSpec(concurrency=10).client_concurrency(replicas=8) == 10  # explicit wins


@pytest.mark.parametrize("bad", [0, -3, "many"])
def test_concurrency_must_be_auto_or_a_positive_integer(bad) -> None:
    from humpback_runtime.spec import parse_run

    with pytest.raises(SpecError, match="inference.concurrency"):
        parse_run({"apiVersion": "humpback.dev/v1alpha1", "kind": "BacktranslationRun", "metadata": {"name": "x"},
                   "spec": {"baseModel": "m", "seed": {"source": "s"}, "corpus": {"source": "c"},
                            "inference": {"concurrency": bad}}})


def test_server_client_keeps_every_replicas_batch_in_flight() -> None:
    spec = InferenceSpec(vllm={"maxNumSeqs": 128})
    engine = make_engine(spec, "train-m0", endpoint="http://127.0.0.1:9/v1", replicas=4)
    assert engine.settings.concurrency == 512
    engine = make_engine(spec.model_copy(update={"concurrency": 7}), "train-m0", endpoint="http://127.0.0.1:9/v1",
                         replicas=4)
    assert engine.settings.concurrency == 7


def test_in_process_vllm_gets_whole_shards_and_the_spec_options(monkeypatch, tmp_path) -> None:
    # vLLM itself is not in this environment: a stand-in module records what the engine would load.
    fake = types.ModuleType("vllm")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    spec = InferenceSpec(engine="vllm", checkpoint_every=2000,
                         vllm={"maxNumSeqs": 512, "gpuMemoryUtilization": 0.8, "maxModelLen": 4096})
    engine = make_engine(spec, tmp_path)
    assert engine.batch_size == 2000  # one LLM.generate per shard; vLLM batches inside it
    assert engine.llm_options == {"max_num_seqs": 512, "gpu_memory_utilization": 0.8,
                                  "enable_prefix_caching": True, "max_model_len": 4096}


def test_capacity_limited_stub_runs_at_most_capacity_sequences_at_once() -> None:
    async def main():
        stub = await start_stub(capacity=2, seq_delay_s=0.2)
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(stub.url + "/completions", json={"model": "m", "prompt": f"p{i}"}) as r:
                    assert r.status == 200
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(6)))
            wall = time.perf_counter() - t0
            async with session.get(stub.url.removesuffix("/v1") + "/stats") as r:
                stats = await r.json()
        await stub.close()
        return wall, stats

    wall, stats = asyncio.run(main())
    assert wall >= 0.6  # six sequences through two slots: three rounds of 0.2 s
    assert stats["busy_seconds"] == pytest.approx(1.2) and stats["prompts"] == 6


def test_curation_prompts_share_the_rubric_as_one_leading_prefix() -> None:
    # vLLM's prefix cache reuses the KV blocks of a common leading text: everything up to and
    # including the rubric must be identical for every candidate, and nothing of the pair before it.
    system = prompts.inference_system(SystemPrompts())
    pairs = [("What is a whale?", "A large marine mammal."), ("Name a prime.", "Seven is prime.")]
    for build in (prompts.curation_prompt, prompts.curation_logprob_prompt):
        for sys_text in (None, system):
            a, b = (build(i, r, system=sys_text) for i, r in pairs)
            shared = os.path.commonprefix([a, b])
            rubric_end = a.index(prompts.CURATION_RUBRIC) + len(prompts.CURATION_RUBRIC)
            assert len(shared) >= rubric_end, "the rubric must come before any pair-specific text"
            assert pairs[0][0] not in shared and pairs[1][0] not in shared
            assert len(prompts.CURATION_RUBRIC) > 0.5 * len(shared)  # the rubric is most of the shared text

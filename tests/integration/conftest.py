"""Fixtures of the training tests (test_training_*.py): the tiny model, built once per session, and
forward examples from the shipped oasst1 pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from humpback_runtime.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def examples():
    """32 forward examples (the seed system text, oasst1 pairs): tests take what they need."""
    from humpback_runtime import prompts
    from humpback_runtime.spec import SystemPrompts

    system = prompts.seed_system(SystemPrompts())
    with open(ROOT / "examples" / "data" / "oasst1_pairs.jsonl", encoding="utf-8") as fh:
        pairs = [json.loads(line) for _, line in zip(range(32), fh)]
    return [prompts.forward_example(p["instruction"], p["response"], system) for p in pairs]

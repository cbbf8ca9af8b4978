"""The import boundary: the operator never loads model code; the runtime never loads the operator.

Each check runs in a fresh interpreter, so what other tests imported cannot hide a violation.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "vllm", "deepspeed", "datasets", "accelerate", "safetensors")


def loaded_modules(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}


def test_the_operator_loads_no_model_code():
    modules = loaded_modules("import humpback_operator")
    assert "kopf" in modules  # the check sees what the operator really imports
    assert not modules.intersection(HEAVY), sorted(modules.intersection(HEAVY))


@pytest.mark.parametrize("module", ["humpback_runtime.cli", "humpback_runtime.stages", "humpback_runtime.runner"])
def test_the_runtime_never_loads_kopf(module):
    modules = loaded_modules(f"import {module}")
    assert "humpback_runtime" in modules
    assert "kopf" not in modules and "humpback_operator" not in modules

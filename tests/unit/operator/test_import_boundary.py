"""The import boundary: the operator never loads model code; the runtime never loads the operator.

Each check runs in a fresh interpreter, so what other tests imported cannot hide a violation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "vllm", "deepspeed", "datasets", "accelerate", "safetensors")


def loaded_modules(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}


def test_the_operator_loads_no_model_code():
    # What `kopf run -m humpback_operator.backtranslationrun` imports: every handler module.
    modules = loaded_modules("import humpback_operator.backtranslationrun")
    assert "kopf" in modules  # the check sees what the operator really imports
    assert not modules.intersection(HEAVY), sorted(modules.intersection(HEAVY))


def test_the_operator_package_registers_nothing_on_import():
    # Handlers register when backtranslationrun is imported; the package itself loads no kopf.
    modules = loaded_modules("import humpback_operator")
    assert "humpback_operator" in modules
    loaded = modules.intersection({"kopf", "prometheus_client"})
    assert not loaded, f"import humpback_operator imported {sorted(loaded)}"


@pytest.mark.parametrize("module", ["humpback_runtime.cli", "humpback_runtime.stages", "humpback_runtime.runner"])
def test_the_runtime_never_loads_kopf(module):
    modules = loaded_modules(f"import {module}")
    assert "humpback_runtime" in modules
    assert "kopf" not in modules and "humpback_operator" not in modules


def test_humpback_render_loads_neither_kopf_nor_prometheus_nor_model_code():
    # The builders are pure: rendering a run's objects needs only the light runtime modules and PyYAML.
    example = REPO / "examples" / "llama2-7b-paper.yaml"
    code = ("import contextlib, io\n"
            "from humpback_runtime.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    rc = main(['render', {str(example)!r}])\n"
            "assert rc == 0 and 'kind: PyTorchJob' in out.getvalue(), (rc, out.getvalue())")
    modules = loaded_modules(code)
    assert "humpback_operator" in modules  # the check sees the builders being imported
    loaded = modules.intersection({"kopf", "prometheus_client", *HEAVY})
    assert not loaded, f"humpback render imported {sorted(loaded)}"

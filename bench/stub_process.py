"""The OpenAI stub (`python -m humpback_testing.openai_stub`) in its own process, for the benches
that measure the client against it (client_overhead.py, exactly_once.py, inference_occupancy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_stub(text: str, *args: str) -> tuple[subprocess.Popen, str]:
    """(the stub's process, its base URL): it answers every completion with `text`; `args` are
    more of its options (`--capacity 128`, say). Stop it with `proc.terminate()`."""
    proc = subprocess.Popen([sys.executable, "-m", "humpback_testing.openai_stub", "--port", "0", "--text", text, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"the stub did not start: {line!r}")
    return proc, line.split()[-1]

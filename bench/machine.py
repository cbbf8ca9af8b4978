"""What a bench ran on, for its result file (dedup.py, prepare_corpus.py)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**versions: str) -> dict:
    """The CPU, its cores, Python's version and the `versions` of the libraries a bench compares."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), **versions}

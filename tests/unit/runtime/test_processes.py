"""How a stage process stops on signals (`humpback_runtime/processes.py`)."""

from __future__ import annotations

import signal
import subprocess
import sys

# A child that starts with SIGINT ignored, as a background job of a script does (nohup, make):
# Python then leaves SIGINT ignored, and a stage ignored the Ctrl-C `humpback run` forwards to it.
CHILD = """
import os, signal, sys, time
from humpback_runtime import processes
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
processes.stop_on_signals()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


def test_a_stage_started_with_sigint_ignored_still_stops_on_sigint():
    done = subprocess.run([sys.executable, "-c", CHILD], timeout=60, capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 130, done.stderr

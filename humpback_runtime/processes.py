"""How a stage process stops (on SIGTERM, SIGHUP or SIGINT, and when the runner that started it
dies), and whether another process of this host is still alive.

`humpback stage` calls `stop_on_signals()`: SIGTERM and SIGHUP (what `timeout`, systemd, CI
cancellation and a closed terminal send) then stop the stage the way Ctrl-C does, by raising
KeyboardInterrupt in the main thread, so finished work is flushed, the lease released and
temporary files removed. Python's default for SIGTERM would end the process without any of that.
SIGINT gets Ctrl-C's handler back where the process started with it ignored.

`die_with_parent(pid)`: a stage started by `humpback run` gets SIGTERM when the runner dies, even by
SIGKILL (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere a thread that watches the parent PID). A stage
of a runner that is gone must not keep writing: a new runner would start a second writer (the lease
refuses it, but the orphan would hold the stage until it finished).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

__all__ = ["PARENT_ENV", "die_with_parent", "exit_code", "pid_alive", "pid_namespace", "stop_on_signals"]

log = logging.getLogger(__name__)

# Set by `humpback run` on the stages it starts: its own PID.
PARENT_ENV = "HUMPBACK_PARENT_PID"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1

_received: list[int] = []


def _stop(signum: int, frame) -> None:
    first = not _received
    _received.append(signum)
    if first:
        log.warning("Received %s: stopping the stage (finished work is kept)", signal.Signals(signum).name)
        raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop this process like Ctrl-C (KeyboardInterrupt), once; and so does
    SIGINT even where it was ignored when the process started (a background job of a script, under
    nohup or make), in which case Python leaves it ignored: `humpback run` forwards a Ctrl-C to its
    stage as SIGINT, and an ignored one let the stage run on to its end."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_code(default: int = 130) -> int:
    """128 + the signal that stopped the process (130 for Ctrl-C)."""
    return 128 + _received[0] if _received else default


def die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM when `parent_pid` (the process that started this one) exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the parent instead", ctypes.get_errno())
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="humpback-parent-watch", daemon=True).start()


def pid_namespace() -> str | None:
    """This process's PID namespace: two containers of one host number different processes alike."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this PID namespace exists and has not died.

    A killed process whose parent has not reaped it yet (a zombie: its runner died with it and the
    init process of a container may never reap) still answers signal 0, but it writes nothing more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]  # the field after "(comm)"
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 is all we know
        return True
    return state not in ("Z", "X")

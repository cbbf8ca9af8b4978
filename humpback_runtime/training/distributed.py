"""The process group and the process environment: a world of one without torchrun, DeepSpeed's
module state reset between runs, barriers and broadcasts that are no-ops in a world of one."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Collectives wait this long (seconds) at most: rank 0 uploading a 7B checkpoint (~80 GB with the
# optimizer) to S3 keeps the others at a barrier for many minutes; torch's default is 30 min.
DIST_TIMEOUT_S = 2 * 3600
_INSTALL_HINT = "pip install 'humpback[train]'"


def require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - only without the extra
        raise ImportError(f"training needs {module!r}, which is not installed: {_INSTALL_HINT}") from e


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_env() -> Iterator[bool]:
    """Yields whether this call owns the process group (a single process, not under torchrun).

    A lone process becomes a world of one: RANK/WORLD_SIZE/LOCAL_RANK and MASTER_* on a free
    loopback port, so that DeepSpeed (which otherwise tries MPI discovery) and accelerate (which
    otherwise asks a process group that does not exist) take the same path as under torchrun; the
    group is torn down by :func:`teardown`. The environment is restored afterwards: accelerate
    leaves ``ACCELERATE_USE_DEEPSPEED=true`` behind, which would put the next run in this process
    under DeepSpeed even with zeroStage 0.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "humpback" / "torch_extensions"))
    saved = dict(os.environ)
    owns = not ("WORLD_SIZE" in os.environ and "RANK" in os.environ)
    if owns:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield owns
    finally:
        for k in set(os.environ) - set(saved):
            del os.environ[k]
        for k, v in saved.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def _reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's module-level handles on the destroyed process group (its communication
    backend and cached clones of the world group); the next engine would otherwise use them."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    for name, value in list(vars(ds_groups).items()):
        if name.startswith("_") and name[1:2].isupper() and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(ds_groups, name, {} if isinstance(value, dict) else None)
    for name in ("mpu", "mesh_device"):
        if hasattr(ds_groups, name):
            setattr(ds_groups, name, None)


def teardown(owns_group: bool) -> None:
    """Leave the process as we found it, so that a second train() in the same process works."""
    import torch

    if owns_group:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if "deepspeed" in sys.modules:
            _reset_deepspeed_groups()
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    with contextlib.suppress(Exception):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _DropGradAccumMismatch(logging.Filter):
    """accelerate warns "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    DeepSpeed config has N" under every DeepSpeed run: the Trainer accumulates itself and hands
    accelerate 1 on purpose (transformers ``create_accelerator_and_postprocess``). Not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Gradient accumulation steps mismatch" not in record.getMessage()


GRAD_ACCUM_FILTER = _DropGradAccumMismatch()


def disable_cpu_shm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op when it creates a process
    group. Only inference all-reduce (tensor parallel) uses it; training collectives go through
    torch.distributed. Marking it incompatible skips the build (and the need for a compiler)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def process_group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if (dist := process_group()) is not None:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if (dist := process_group()) is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


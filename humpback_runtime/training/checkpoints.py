"""Resumable checkpoints in the store: which one to resume, what makes two attempts the same job,
and copying folders between local disk and the store."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from humpback_runtime.prompts import TEMPLATE_VERSION, TrainingExample
from humpback_runtime.storage import ObjectNotFound, Store

if TYPE_CHECKING:
    from humpback_runtime.training import TrainRequest

log = logging.getLogger("humpback_runtime.training")

COMPLETE = "_COMPLETE"  # marker written last into a checkpoint folder and into model/
KEEP_CHECKPOINTS = 1  # the newest complete one; older ones are deleted once it is complete


def examples_digest(examples: list[TrainingExample]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.prompt, ex.completion):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def training_key(request: TrainRequest, data_digest: str) -> str:
    """What makes two attempts the same job: a checkpoint of another key is never resumed."""
    payload = {
        "base_model": request.base_model,
        "settings": request.settings.model_dump(mode="json"),
        "data": data_digest,
        "fingerprint": request.card.get("fingerprint"),
        "templates": TEMPLATE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:32]



def upload_dir(store: Store, local: Path, prefix: str, skip: tuple[str, ...] = ()) -> int:
    n = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel in skip:
            continue
        store.upload_file(path, f"{prefix}/{rel}")
        n += 1
    return n


def download_prefix(store: Store, prefix: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    n = 0
    cut = len(prefix) + 1 if prefix else 0
    for key in store.list(prefix):
        rel = key[cut:]
        if rel in skip:
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, dest)
        n += 1
    return n


def read_marker(store: Store, key: str) -> dict | None:
    try:
        marker = store.read_json(key)
    except ObjectNotFound:
        return None
    except Exception as e:  # a corrupt marker counts as absent
        log.warning("Ignoring unreadable marker %s (%s)", store.url(key), e)
        return None
    return marker if isinstance(marker, dict) else None


def checkpoint_steps(store: Store, prefix: str) -> dict[int, bool]:
    """step -> complete (``_COMPLETE`` present) for the folders under ``{prefix}/checkpoints``."""
    root = f"{prefix}/checkpoints"
    steps: dict[int, bool] = {}
    for key in store.list(root):
        parts = key[len(root) + 1:].split("/")
        if len(parts) >= 2 and parts[0].startswith("step-") and parts[0][5:].isdigit():
            step = int(parts[0][5:])
            steps[step] = steps.get(step, False) or parts[1:] == [COMPLETE]
    return steps


def checkpoint_prefix(prefix: str, step: int) -> str:
    return f"{prefix}/checkpoints/step-{step}"


def choose_checkpoint(store: Store, prefix: str, key: str, world_size: int, zero: int) -> tuple[int | None, list[int]]:
    """(step to resume from or None, steps to delete) for the checkpoints in the store."""
    steps = checkpoint_steps(store, prefix)
    usable: list[int] = []
    stale: list[int] = []
    for step, complete in sorted(steps.items()):
        if not complete:
            stale.append(step)  # a partial upload: an attempt died while uploading it
            continue
        marker = read_marker(store, f"{checkpoint_prefix(prefix, step)}/{COMPLETE}") or {}
        if marker.get("training_key") != key:
            log.warning("Deleting checkpoint %s: it belongs to another training request (base model, "
                        "settings, data or fingerprint changed)", store.url(checkpoint_prefix(prefix, step)))
            stale.append(step)
        elif zero and marker.get("world_size") != world_size:
            log.warning("Deleting checkpoint %s: DeepSpeed ZeRO state of %s processes cannot be resumed "
                        "by %s processes; training starts over", store.url(checkpoint_prefix(prefix, step)),
                        marker.get("world_size"), world_size)
            stale.append(step)
        else:
            usable.append(step)
    latest = usable[-1] if usable else None
    stale += usable[:-KEEP_CHECKPOINTS]  # older than the one kept
    return latest, sorted(set(stale))



def stored_metrics(store: Store, prefix: str, key: str) -> dict | None:
    marker = read_marker(store, f"{prefix}/model/{COMPLETE}")
    if not marker or marker.get("training_key") != key:
        return None
    metrics = read_marker(store, f"{prefix}/train_metrics.json")
    return metrics


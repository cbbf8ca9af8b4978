"""What a stage's `_SUCCESS.json` vouches for, and checking the store against it.

A finished stage's manifest lists every object it leaves under its prefix (keys relative to the
prefix), each with its byte size, SHA-256 and, for JSONL / Parquet shards, its record count::

    "objects": {"part-00000.jsonl": {"bytes": 48213, "sha256": "9f2c…", "records": 50}, …}

Every object under the prefix is listed except the stage's control files (`_SUCCESS.json`,
`_LEASE.json`, `_ATTEMPT.json`) and its `_tmp/` scratch prefix. A stage checks the sizes of its
inputs against their producers' manifests before it starts (one listing per input), and the
checksums and record counts while it reads the records anyway (`RunContext.records`); `humpback
verify RUN.yaml` checks both for every stage. Manifests written before this field existed (no
"objects") still count as done: their stage is not re-run for it, only reported as unverifiable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from humpback_runtime.lease import LEASE
from humpback_runtime.storage import SUCCESS, StorageError, Store, object_info

__all__ = ["ATTEMPT", "CONTROL_FILES", "LEASE", "TMP", "Verification", "describe_outputs", "verify_outputs"]

ATTEMPT = "_ATTEMPT.json"  # which fingerprint the partial outputs under a prefix belong to
TMP = "_tmp"  # scratch objects of the attempt in progress; the next attempt removes them
CONTROL_FILES = frozenset({SUCCESS, ATTEMPT, LEASE})


def _is_output(rel: str) -> bool:
    return rel not in CONTROL_FILES and not rel.startswith(f"{TMP}/")


def describe_outputs(store: Store, prefix: str) -> dict[str, dict]:
    """The "objects" field of the manifest of the stage under `prefix`: every output object."""
    cut = len(prefix) + 1
    return {key[cut:]: object_info(store, key, size)
            for key, size in store.list_sizes(prefix).items() if _is_output(key[cut:])}


@dataclass
class Verification:
    """The outcome of checking a stage's objects against its manifest."""

    checked: int = 0  # objects compared
    verifiable: bool = True  # False: the manifest predates "objects"
    problems: list[str] = field(default_factory=list)  # one line per damaged object, naming it

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_outputs(store: Store, prefix: str, manifest: Mapping, *, checksums: bool = False) -> Verification:
    """Compare the objects under `prefix` with `manifest["objects"]`: presence and size, and with
    `checksums` their SHA-256 and record counts (reading every object)."""
    objects = manifest.get("objects")
    if not isinstance(objects, Mapping):
        result = Verification(verifiable=False)
        # Old manifests list their record shards at least: a deleted one is still found.
        records = (manifest.get("outputs") or {}).get("records")
        if isinstance(records, list):
            present = store.list_sizes(prefix)
            result.problems += [f"{store.url(k)}: missing (listed in the manifest)"
                                for k in records if isinstance(k, str) and k not in present]
        return result
    result = Verification()
    present = store.list_sizes(prefix)
    for rel, expected in sorted(objects.items()):
        key = f"{prefix}/{rel}"
        result.checked += 1
        size = present.get(key)
        if size is None:
            result.problems.append(f"{store.url(key)}: missing (the manifest lists {expected.get('bytes')} bytes)")
        elif size != expected.get("bytes"):
            result.problems.append(f"{store.url(key)}: {size} bytes, the manifest says {expected.get('bytes')}")
        elif checksums:
            try:
                actual = object_info(store, key, size, cached=False)
            except StorageError as e:
                result.problems.append(f"{store.url(key)}: unreadable ({e})")
                continue
            for name in ("sha256", "records"):
                if name in expected and actual.get(name) != expected[name]:
                    result.problems.append(f"{store.url(key)}: {name} {actual.get(name)}, the manifest says "
                                           f"{expected[name]}")
    return result

"""Where a run's artifacts live in the store: `<namespace>/<run name>/<stage>/…` under the storage URI.

The one home of that layout; the stages, the runners, the report and the operator ask it.
Standard library only: the operator imports it.
"""


def run_prefix(namespace: str, run: str) -> str:
    """The store prefix of a run: every stage's folder is under it."""
    return f"{namespace}/{run}"


def stage_prefix(namespace: str, run: str, stage: str) -> str:
    """The store prefix a stage writes its outputs and its `_SUCCESS.json` under."""
    return f"{run_prefix(namespace, run)}/{stage}"

"""The humpback operator: runs BacktranslationRuns on Kubernetes, stage by stage.

    kopf run -m humpback_operator --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz

Handlers register when this package is imported (that is how `kopf run -m` finds them); the pure
parts (`children`, `names`, `reconcile`) import without side effects of their own.
"""

from humpback_operator import backtranslationrun, child_events  # noqa: E402,F401  (registers handlers)

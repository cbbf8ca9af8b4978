"""The humpback operator: runs BacktranslationRuns on Kubernetes, stage by stage.

    kopf run -m humpback_operator.backtranslationrun --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz

Importing the package registers nothing: the Kopf handlers register when `backtranslationrun`
is imported, which is what `kopf run -m` does. So the pure builders
(`children`, `names`, `backends`, `config`, `reconcile`) import without kopf or prometheus_client,
and `humpback render` uses them without the operator's libraries.
"""

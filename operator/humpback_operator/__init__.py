"""The humpback operator: runs BacktranslationRuns on Kubernetes, stage by stage.

    kopf run -m humpback_operator --standalone --all-namespaces --liveness=http://0.0.0.0:8080/healthz
"""

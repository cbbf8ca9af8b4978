"""report: one self-contained HTML page about the run (counts, histograms, yield, losses, win rates).

    humpback stage report --spec RUN.yaml
"""

from __future__ import annotations

from typing import Any

from humpback_runtime.context import RunContext
from humpback_runtime.plan import Stage


def run_report(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    from humpback_runtime.report import build_report, collect_report_inputs

    inputs = collect_report_inputs(ctx.store, ctx.run_prefix, ctx.plan)
    key = f"{prefix}/index.html"
    ctx.store.write_text(key, build_report(**inputs))
    return {"outputs": {"report": key, "url": ctx.store.url(key), "count": 1}}

"""The report stage: one self-contained HTML page about a run.

    humpback stage report --spec examples/tiny-cpu.yaml      # writes <run>/report/index.html

The stage does::

    inputs = collect_report_inputs(store, f"{namespace}/{run}", plan)   # manifests + shard samples
    store.write_text(f"{namespace}/{run}/report/index.html", build_report(**inputs))

The page has inline CSS, plots as base64 PNG ``data:`` URIs (matplotlib, Agg, no pyplot state),
no JavaScript and no external URL; every piece of user or run text is HTML-escaped. Without
matplotlib the tables are still there and each plot says why it is missing. A section whose data
is absent says "not available (...)" with the reason: the stage was not run, the field is not in
its manifest, no judge was configured.

Manifest fields read (``<namespace>/<run>/<stage>/_SUCCESS.json``); every one is optional:

==================  =================================================================================
every stage         ``fingerprint``, ``resumed``, ``timings.seconds``, ``outputs.count`` (records
                    written), ``outputs.records`` (shard keys; else the ``part-*`` shards directly
                    under the stage folder are read), ``humpbackVersion``
prepare-seed        ``counts``: ``pairs``, ``records`` and every ``dropped_*`` (SeedCounts);
                    shard records ``instruction``, ``response``
prepare-corpus      ``counts``: ``read``, ``kept`` and what each filter removed (``missing_text``,
                    ``too_short``, ``too_long``, ``boilerplate``, ``exact_duplicate``,
                    ``near_duplicate``; CorpusCounts), ``lsh_candidates`` and ``lsh_rejected``
                    (candidate pairs verified, and under the threshold); shard records ``text``
augment             ``outputs.count`` (candidates) and ``counts`` (any integers; ``dropped_*`` /
                    ``*_dropped`` keys are listed as drops); shard records ``instruction``,
                    ``response`` (or ``output``, or ``text``)
rewrite, rewrite-k  ``counts`` (any integers), shown like augment's
curate-k            ``scored`` and ``selected`` (top level or under ``counts``); ``mode``
                    (``"generate"`` | ``"logprobs"``); ``threshold``; ``scores.histogram``
                    (``{"1": n, ..., "5": n}``), ``scores.unparsable`` (generate mode) and, in
                    logprobs mode, ``scores.expected_histogram`` (``{"4.25": n, ...}``: expected
                    score, rounded as the stage likes, to count). Shard records are the curated
                    pairs ``instruction``, ``response``, ``score`` (and ``expected``). A stage that
                    writes every scored candidate instead marks the kept ones ``"selected": true``;
                    the report then takes the scores from the records.
train-*             ``metrics.train_loss``: ``[[step, loss], ...]`` (or ``[{"step", "loss"}, ...]``)
evaluate            ``evaluation``: what :func:`humpback_runtime.evaluation.evaluate` returns:
                    ``judged``, ``note``, ``sets.<set>.pairs.<A-vs-B>`` with ``a``, ``b``,
                    ``win_rate``, ``stderr``, ``n``, ``wins``, ``ties``, ``losses``, ``unparsed``,
                    ``position_consistency``; ``sets.<set>.reference.models.<model>`` (win rate against
                    reference outputs, ``length_controlled_win_rate``, ``avg_length``); ``sets.<set>
                    .mt_bench.<model>`` (``score``, ``turn_1``, ``turn_2``, ``categories``)
==================  =================================================================================
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from urllib.parse import quote
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from humpback_runtime.progress import format_duration, format_line, read_progress
from humpback_runtime.storage import StorageError, Store, iter_shard_records, list_shards, output_shards, read_success

__all__ = ["build_report", "collect_report_inputs"]

log = logging.getLogger(__name__)

_EXAMPLE_CHARS = 600
_CI_Z = 1.96  # error bars: 95% normal interval, +-1.96 standard errors

# Series order and colours of the length plots; curated-k follow in iteration order.
_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


# --- reading a run --------------------------------------------------------------------------------

def collect_report_inputs(store: Store, run_prefix: str, plan: Any, *, max_records: int = 100_000,
                          examples: int = 3, side_by_side: int = 3) -> dict[str, Any]:
    """Everything :func:`build_report` needs, read from a run's folder: ``build_report(**inputs)``.

    ``run_prefix`` is ``<namespace>/<run>``; ``plan`` the run's :class:`~humpback_runtime.plan.Plan`
    (its stage names, order and settings; the report stage itself is left out of ``manifests``).
    Reads each stage's ``_SUCCESS.json`` (``_PROGRESS.json`` where there is none) and, for the
    histograms, at most ``max_records`` records per stage (the first shards). Missing manifests,
    fields and shards are no error: the report says "not available".
    """
    stages = [s for s in plan.stages if s.family != "report"]
    manifests: dict[str, dict | None] = {s.name: read_success(store, f"{run_prefix}/{s.name}") for s in stages}
    progress = {s.name: p for s in stages if not manifests[s.name]
                and (p := read_progress(store, f"{run_prefix}/{s.name}"))}

    loss_curves: dict[str, list[tuple[int, float]]] = {}
    for s in stages:
        if s.family == "train" and manifests[s.name]:
            curve = _loss_curve(_get(manifests[s.name], "metrics", "train_loss"))
            if curve:
                loss_curves[s.name] = curve

    def records(name: str) -> Iterator[dict]:
        return _stage_records(store, f"{run_prefix}/{name}", manifests.get(name), max_records)

    lengths: dict[str, dict[str, list[int]]] = {}
    scores: dict[int, Any] = {}
    picked: dict[str, list[dict]] = {}
    curation: dict[int, dict[str, Any]] = {}
    if manifests.get("prepare-seed"):
        lengths["seed"] = _lengths(records("prepare-seed"))
    if manifests.get("augment"):
        lengths["candidates"] = _lengths(r for r in records("augment") if not r.get("dropped"))
    curate = sorted((s.iteration, s.name) for s in stages if s.family == "curate")  # the plan knows them
    for k, name in curate:
        manifest = manifests.get(name)
        if not manifest:
            continue
        settings = _curation_settings(plan, name, k)
        basis = _selection_basis(manifest.get("mode") or settings.get("mode"), settings.get("selectBy"))
        rows = list(records(name))
        chosen = _current_selection(store, run_prefix, stages, k, name)
        if chosen is not None:  # curate-k stores every score; the curated pairs are the current selection
            manifests[name] = manifest = {**manifest, "selected": chosen.get("selected"), "selection": chosen.get("id")}
            field = "expected" if manifest.get("mode") == "logprobs" else "score"
            scores[k] = [float(r[field]) for r in rows if _is_number(r.get(field))]
            curated = list(_stage_records(store, chosen.get("prefix", ""), chosen, max_records))
            lengths[f"curated-{k}"] = _lengths(curated)
            if curated:
                picked[f"curated-{k}"] = [_example(r) for r in curated[:examples]]
            continue
        marked = any("selected" in r for r in rows)
        curated = [r for r in rows if r.get("selected") is True] if marked else rows
        lengths[f"curated-{k}"] = _lengths(curated)
        scored = rows if marked else list(_scored_records(store, manifest, max_records))
        values = [float(r["score"]) for r in scored if _is_number(r.get("score"))]
        if values:  # the very score selection compared with the threshold
            scores[k] = values
        else:
            histogram = _score_histogram(manifest, basis)
            if histogram:
                scores[k] = histogram
        threshold = _get(manifest, "scores", "threshold")
        if threshold is None:
            threshold = manifest.get("threshold", settings.get("threshold"))
        curation[k] = {
            "basis": basis, "threshold": threshold if _is_number(threshold) else None,
            "expected": [float(r["expected"]) for r in scored if _is_number(r.get("expected"))],
            "mass": [float(r["mass"]) for r in scored if _is_number(r.get("mass"))],
            **_example_pairs(scored, threshold if _is_number(threshold) else None, examples),
        }
        if curated:
            picked[f"curated-{k}"] = [_example(r) for r in curated[:examples]]
    evaluation = _get(manifests.get("evaluate"), "evaluation")
    answers = _answers(store, evaluation, side_by_side) if isinstance(evaluation, Mapping) else {}
    return {
        "manifests": manifests,
        "run": {"name": getattr(plan, "run_name", None), "namespace": getattr(plan, "namespace", None),
                "prefix": run_prefix, "storage": store.url(run_prefix)},
        "loss_curves": loss_curves,
        "lengths": lengths,
        "scores": scores,
        "win_rates": evaluation if isinstance(evaluation, dict) else None,
        "examples": picked,
        "curate_stages": curate,
        "plan_stages": plan.names(),
        "settings": _settings(plan),
        "progress": progress,
        "curation": curation,
        "answers": answers,
        "artifacts": _artifacts(store, run_prefix, plan, manifests),
    }


def _current_selection(store: Store, run_prefix: str, stages: list, k: int, curate_stage: str) -> dict | None:
    """The manifest of curate-k's selection with the run's current settings (train-mk's), if made."""
    from humpback_runtime.plan import selection_id

    train = next((s for s in stages if s.family == "train" and s.iteration == k), None)
    settings = (train.settings or {}).get("selection") if train is not None else None
    if not settings:
        return None
    return read_success(store, f"{run_prefix}/{curate_stage}/selected/{selection_id(settings)}")
def _curation_settings(plan: Any, curate_stage: str, k: int | None) -> dict[str, Any]:
    """curate-k's scoring settings with the selection train-mk uses (threshold, selectBy, ...): the
    selection is not part of curate-k's settings, since it is made from the stored scores."""
    settings = dict(_get(plan[curate_stage].settings, "curation") or {})
    train = next((s for s in plan.stages if s.family == "train" and s.iteration == k), None)
    selection = _get(train.settings, "selection") if train is not None else None
    return {**settings, **selection} if isinstance(selection, Mapping) else settings


def _selection_basis(mode: Any, select_by: Any) -> str:
    """What curation compared with the threshold: argmax or expected (logprobs), or the parsed score."""
    if mode == "logprobs":
        return "expected" if select_by == "expected" else "argmax"
    return "score"


_BASIS_LABEL = {"argmax": "most likely score (argmax)", "expected": "expected score",
                "score": "parsed score (generate)"}


def _scored_records(store: Store, manifest: Mapping, limit: int) -> Iterator[dict]:
    """Every scored candidate: the score shards the curate manifest lists under outputs.scores."""
    keys = _get(manifest, "outputs", "scores")
    if keys is None and isinstance(_get(manifest, "outputs", "selection"), Mapping):
        keys = _get(manifest, "outputs", "records")  # curate-k keeps scores only: every record is one
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return
    try:
        for i, record in enumerate(iter_shard_records(store, keys)):
            if i >= limit:
                return
            if isinstance(record, dict):
                yield record
    except StorageError as e:
        log.warning("Could not read the curation scores for the report: %s", e)


def _example_pairs(scored: list[dict], threshold: float | None, n: int) -> dict[str, list[dict]]:
    """The best pairs, the borderline ones (closest to the threshold, both sides) and the rejected."""
    rated = [r for r in scored if _is_number(r.get("score"))]
    if not rated:
        return {"best": [], "borderline": [], "rejected": []}
    key = lambda r: (float(r["score"]), float(r.get("expected") or 0))  # noqa: E731
    ranked = sorted(rated, key=key, reverse=True)
    best = ranked[:n]
    if threshold is None:
        return {"best": [_example(r) for r in best], "borderline": [], "rejected": []}
    kept = [r for r in ranked if float(r["score"]) >= threshold]
    dropped = [r for r in ranked if float(r["score"]) < threshold]
    half = max(1, n // 2)  # the lowest kept and the highest dropped
    border = (kept[-half:] if kept else []) + dropped[:half]
    rejected = dropped[::-1][:n]
    return {"best": [_example(r) for r in best], "borderline": [_example(r) for r in border],
            "rejected": [_example(r) for r in rejected if r not in border]}


def _answers(store: Store, evaluation: Mapping, n: int) -> dict[str, Any]:
    """Per set: the first `n` prompts with every model's answer, and every answer's length."""
    from humpback_runtime.evaluation import load_eval_set

    out: dict[str, Any] = {}
    for set_name, entry in (evaluation.get("sets") or {}).items():
        models = _get(entry, "answers")
        if not isinstance(models, Mapping):
            continue
        texts: dict[str, dict[str, str]] = {}
        for model, info in models.items():
            prefix = _get(info, "prefix")
            if not isinstance(prefix, str):
                continue
            try:
                texts[model] = {str(r.get("id")): r.get("answer") for r in
                                iter_shard_records(store, list_shards(store, prefix)) if isinstance(r, dict)}
            except StorageError as e:
                log.warning("Could not read the answers of %s for the report: %s", model, e)
        if not texts:
            continue
        try:
            prompts = [(str(r["id"]), r.get("instruction")) for r in load_eval_set(str(entry.get("source")))]
        except Exception as e:  # noqa: BLE001 - the answers still stand without their prompts
            log.info("Prompts of set %s not readable for the report (%s); showing ids", set_name, e)
            prompts = [(i, None) for i in sorted(next(iter(texts.values())))]
        shown = [(pid, text) for pid, text in prompts if all(pid in t for t in texts.values())][:n]
        out[set_name] = {
            "models": list(texts),
            "prompts": [{"id": pid, "instruction": text, "answers": {m: texts[m][pid] for m in texts}}
                        for pid, text in shown],
            "lengths": {m: [len(a) for a in t.values() if isinstance(a, str)] for m, t in texts.items()},
        }
    return out


def _settings(plan: Any) -> list[tuple[str, Any]]:
    """The run's settings a reader needs to judge the results, from the plan's stage settings."""
    def setting(stage: str, *path: str) -> Any:
        return _get(plan[stage].settings, *path) if stage in plan else None

    curate = next((s for s in plan.stages if s.family == "curate"), None)
    train = next((s.name for s in plan.stages if s.family == "train" and s.role == "seed"), None)
    curation = _curation_settings(plan, curate.name, curate.iteration) if curate else None
    rows: list[tuple[str, Any]] = [
        ("base model", setting(train, "baseModel") if train else None),
        ("seed source", _source(setting("prepare-seed", "seed"))),
        ("corpus source", _source(setting("prepare-corpus", "corpus"))),
        ("corpus length window (chars)", _window(setting("prepare-corpus", "corpus"))),
        ("iterations", sum(1 for s in plan.stages if s.family == "curate")),
    ]
    if isinstance(curation, Mapping):
        mode = curation.get("mode")
        rows += [("curation mode", mode), ("curation threshold", curation.get("threshold")),
                 ("selection compares", _BASIS_LABEL[_selection_basis(mode, curation.get("selectBy"))]),
                 ("instruction only", curation.get("instructionOnly"))]
    rewrite = next((s.name for s in plan.stages if s.family == "rewrite"), None)
    rows.append(("rewriting", "yes" if rewrite else "no"))
    training = setting(train, "training") if train else None
    if isinstance(training, Mapping):
        rows += [("learning rate", f"{training.get('learningRate')} → {training.get('finalLearningRate')}"),
                 ("batch size", training.get("batchSize")), ("training steps", training.get("steps") or "by data size")]
    evaluation = setting("evaluate", "evaluation")
    if isinstance(evaluation, Mapping):
        sets = ", ".join(f"{s.get('name')} ({s.get('source')})" for s in evaluation.get("sets") or [])
        judge = evaluation.get("judge")
        rows += [("evaluation sets", sets or None),
                 ("judge", f"{judge.get('model')} at {_without_userinfo(judge.get('endpoint'))}"
                  if isinstance(judge, Mapping) else "none (answers only)")]
    return [(k, v) for k, v in rows if v is not None]


def _source(spec: Any) -> str | None:
    if not isinstance(spec, Mapping):
        return None
    extra = [f"{k} {spec[k]}" for k in ("format", "maxExamples", "maxDocuments") if spec.get(k) is not None]
    return f"{spec.get('source')}" + (f" ({', '.join(extra)})" if extra else "")


def _window(spec: Any) -> str | None:
    if not isinstance(spec, Mapping) or spec.get("minChars") is None:
        return None
    return f"{spec.get('minChars')}–{spec.get('maxChars')}"


def _without_userinfo(url: Any) -> str:
    text = str(url)
    scheme, sep, rest = text.partition("://")
    return f"{scheme}{sep}{rest.split('@', 1)[1]}" if sep and "@" in rest.split("/", 1)[0] else text


def _artifacts(store: Store, run_prefix: str, plan: Any, manifests: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, what, key relative to the run) for every artifact a finished stage wrote."""
    out: list[tuple[str, str, str]] = []
    for s in plan.stages:
        m = manifests.get(s.name)
        if s.family == "report" or not m:
            continue
        if s.family == "train":
            out.append((s.name, "model (safetensors, tokenizer, model card)", f"{s.name}/model/"))
        elif s.family == "curate":
            out.append((s.name, f"selected pairs ({_num(_count(m, 'selected'))})", f"{s.name}/selected/"))
            out.append((s.name, "every scored candidate", f"{s.name}/"))
        elif s.family == "evaluate":
            out.append((s.name, "answers per set and model", f"{s.name}/answers/"))
            if _get(m, "evaluation", "judged"):
                out.append((s.name, "judgments per pair of models", f"{s.name}/judgments/"))
        else:
            out.append((s.name, f"records ({_num(_get(m, 'outputs', 'count'))})", f"{s.name}/"))
        out.append((s.name, "manifest", f"{s.name}/_SUCCESS.json"))
    return out


def _stage_records(store: Store, prefix: str, manifest: dict | None, limit: int) -> Iterator[dict]:
    try:
        for i, record in enumerate(iter_shard_records(store, output_shards(store, prefix, manifest))):
            if i >= limit:
                return
            if isinstance(record, dict):
                yield record
    except StorageError as e:
        log.warning("Could not read the records of %s for the report: %s", store.url(prefix), e)


def _response_text(record: Mapping) -> Any:
    for field in ("response", "output", "text"):
        if isinstance(record.get(field), str):
            return record[field]
    return None


def _lengths(records: Iterable[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"instruction": [], "response": []}
    for r in records:
        if isinstance(r.get("instruction"), str):
            out["instruction"].append(len(r["instruction"]))
        if isinstance(response := _response_text(r), str):
            out["response"].append(len(response))
    return out


def _example(record: dict) -> dict:
    return {"instruction": record.get("instruction"), "response": _response_text(record),
            "score": record.get("score"), "expected": record.get("expected")}


def _score_histogram(manifest: dict, basis: str = "score") -> dict[float, float] | None:
    # `histogram` counts argmax (or the parsed score); `expected_histogram` the expected score.
    field = "expected_histogram" if basis == "expected" else "histogram"
    raw = _get(manifest, "scores", field)
    if not isinstance(raw, Mapping):
        raw = _get(manifest, "scores", "histogram")
    if not isinstance(raw, Mapping):
        return None
    out = {}
    for key, count in raw.items():
        try:
            value = float(key)
        except (TypeError, ValueError):
            continue
        if _is_number(count) and count > 0:
            out[value] = float(count)
    return out or None


def _loss_curve(raw: Any) -> list[tuple[int, float]]:
    curve = []
    if not isinstance(raw, list):
        return curve
    for point in raw:
        if isinstance(point, Mapping):
            step, loss = point.get("step"), point.get("loss")
        elif isinstance(point, (list, tuple)) and len(point) == 2:
            step, loss = point
        else:
            continue
        if _is_number(step) and _is_number(loss):
            curve.append((int(step), float(loss)))
    return curve


# --- small helpers --------------------------------------------------------------------------------

def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if math.isfinite(value) else _e(value)
    return _e(value)


def _na(reason: str) -> str:
    return f'<p class="na">not available ({_e(reason)})</p>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """`rows` hold already-escaped HTML cells; the header is escaped here (none: no header row)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    klass = f' class="{_e(cls)}"' if cls else ""
    thead = f"<thead><tr>{head}</tr></thead>" if header else ""
    return f"<table{klass}>{thead}<tbody>{body}</tbody></table>"


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of labels and values, the labels as row headers (no empty header row)."""
    body = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_num(v)}</td></tr>' for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _count(manifest: Any, field: str) -> Any:
    value = _get(manifest, field)
    return value if value is not None else _get(manifest, "counts", field)


# --- plots ----------------------------------------------------------------------------------------

class _Plots:
    """Matplotlib figures rendered to PNG data URIs; `missing` says why there are none."""

    def __init__(self) -> None:
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self.missing = "matplotlib is not installed: pip install matplotlib"
            return
        self.missing = None
        self._figure, self._canvas = Figure, FigureCanvasAgg
        self._version = matplotlib.__version__

    def figure(self, ncols: int = 1, width: float = 8.0, height: float = 3.2):
        fig = self._figure(figsize=(width, height), dpi=100, layout="constrained")
        self._canvas(fig)
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
        return fig, axes

    def img(self, fig, alt: str) -> str:
        buf = io.BytesIO()
        # No metadata: matplotlib would otherwise stamp its version and home page into the PNG.
        fig.savefig(buf, format="png", metadata={"Software": None})
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'

    def unavailable(self) -> str:
        return _na(f"plot: {self.missing}")


def _weighted(values: Any) -> tuple[list[float], list[float]]:
    """A list of values, or a histogram mapping value -> count, as (values, weights)."""
    if isinstance(values, Mapping):
        pairs = [(float(k), float(c)) for k, c in values.items() if _is_number(c) and _is_float(k)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    xs = [float(v) for v in values if _is_number(v)]
    return xs, [1.0] * len(xs)


def _is_float(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _length_plot(plots: _Plots, lengths: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plots.figure(ncols=2, width=10, height=3.4)
    for ax, field in zip(axes, ("instruction", "response")):
        series = [(name, [v for v in (data.get(field) or []) if _is_number(v) and v > 0])
                  for name, data in lengths.items()]
        series = [(name, vals) for name, vals in series if vals]
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{field} length")
            continue
        lo = max(1, min(min(v) for _, v in series))
        hi = max(max(v) for _, v in series)
        hi = max(hi, lo * 1.5)
        bins = [lo * (hi / lo) ** (i / 40) for i in range(41)]
        for i, (name, vals) in enumerate(series):
            ax.hist(vals, bins=bins, density=True, histtype="step", linewidth=1.6,
                    color=_COLOURS[i % len(_COLOURS)], label=f"{name} (n={len(vals):,})")
        ax.set_xscale("log")
        # Over less than a decade matplotlib labels minor ticks too, and they overlap: label the
        # few major ticks only, as plain numbers.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("characters (log scale)")
        ax.set_ylabel("density")
        ax.set_title(f"{field} length")
        ax.legend(fontsize=8)
    return plots.img(fig, "instruction and response length histograms")


def _score_plot(plots: _Plots, scores: Mapping[int, Any], curation: Mapping[int, Mapping]) -> str:
    iterations = sorted(scores)
    fig, axes = plots.figure(ncols=len(iterations), width=max(4.5, 4.0 * len(iterations)), height=3.2)
    for ax, k in zip(axes, iterations):
        info = curation.get(k) or {}
        basis = info.get("basis") or "score"
        xs, ws = _weighted(scores[k])
        discrete = all(float(x).is_integer() for x in xs)
        if discrete:
            counts = {d: 0.0 for d in range(1, 6)}
            for x, w in zip(xs, ws):
                if 1 <= x <= 5:
                    counts[int(x)] += w
            ax.bar(list(counts), list(counts.values()), color=_COLOURS[0], width=0.7)
            ax.set_xticks(range(1, 6))
        else:
            ax.hist(xs, bins=[1 + i * 0.25 for i in range(17)], weights=ws, color=_COLOURS[1])
        ax.set_xlabel(_BASIS_LABEL.get(basis, basis))
        threshold = info.get("threshold")
        if _is_number(threshold):
            # Bars at the threshold are kept: draw the line just left of them.
            at = threshold - 0.4 if discrete and float(threshold).is_integer() else threshold
            short = {"argmax": "argmax", "expected": "expected score", "score": "parsed score"}.get(basis, basis)
            ax.axvline(at, color=_COLOURS[3], linestyle="--", linewidth=1.5,
                       label=f"threshold {threshold:g}: keep ≥ ({short})")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlim(0.5, 5.5)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("candidates")
        ax.set_title(f"iteration {k}")
    return plots.img(fig, "curation score histograms per iteration, with the selection threshold")


def _answer_length_plot(plots: _Plots, answers: Mapping[str, Any]) -> str:
    series = [(f"{set_name}: {model}", vals) for set_name, entry in answers.items()
              for model, vals in (entry.get("lengths") or {}).items() if vals]
    fig, (ax,) = plots.figure(width=8, height=max(2.2, 0.45 * len(series) + 1.2))
    # matplotlib 3.10 renamed vert=False to orientation="horizontal" (3.11 warns about the old name).
    horizontal = {"orientation": "horizontal"} if tuple(int(p) for p in plots._version.split(".")[:2]) >= (3, 10) \
        else {"vert": False}
    ax.boxplot([v for _, v in series], showfliers=False, **horizontal)
    ax.set_yticks(range(1, len(series) + 1))
    ax.set_yticklabels([name for name, _ in series], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("answer length (characters)")
    ax.set_title("answer lengths per model")
    return plots.img(fig, "answer length per model")


def _yield_plot(plots: _Plots, rows: list[tuple[int, float]]) -> str:
    fig, (ax,) = plots.figure(width=max(4.0, 1.2 * len(rows) + 2.5), height=3.0)
    # Numeric positions with labels: strings would make matplotlib log a "categorical units" line.
    ax.bar(range(len(rows)), [y for _, y in rows], color=_COLOURS[2], width=0.6)
    ax.set_xticks(range(len(rows)), [str(k) for k, _ in rows])
    for i, (_, y) in enumerate(rows):
        ax.text(i, y, f"{y:.1%}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(1e-9, max(y for _, y in rows)) * 1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("selected / scored")
    ax.set_title("curation yield")
    return plots.img(fig, "curation yield per iteration")


def _loss_plot(plots: _Plots, curves: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    fig, (ax,) = plots.figure(width=8, height=3.4)
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name, color=_COLOURS[i % len(_COLOURS)],
                linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    return plots.img(fig, "training loss curves")


def _win_plot(plots: _Plots, rows: list[dict]) -> str:
    fig, (ax,) = plots.figure(width=8, height=max(2.2, 0.55 * len(rows) + 1.2))
    labels = [f"{r['set']}: {r['a']} vs {r['b']}" for r in rows]
    ys = list(range(len(rows)))[::-1]
    xerr = [_CI_Z * r["stderr"] if _is_number(r.get("stderr")) else 0.0 for r in rows]
    ax.errorbar([r["win_rate"] for r in rows], ys, xerr=xerr, fmt="o", color=_COLOURS[0], capsize=4)
    ax.axvline(0.5, color="#888888", linestyle="--", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of the first model (ties count half; bars: 95% interval)")
    ax.set_title("pairwise win rates")
    return plots.img(fig, "win rates with error bars")


# --- the page -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:68rem;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}h3{font-size:1.05rem;margin-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.25rem .6rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num,table.kv td{text-align:right}
table.kv th{font-weight:normal}table.side td,table.side th{width:25%}h4{margin:.6rem 0 .2rem;font-size:.95rem}
.verdict{padding:.6rem 1rem;border-radius:6px;margin:.6rem 0;font-size:1.1rem}.verdict.ok{background:#e6f4ea;
border:1px solid #55a868}.verdict.fail{background:#fdecea;border:1px solid #c44e52}.verdict.running{background:#fff8e1;
border:1px solid #dd8452}.verdict .detail{font-size:.9rem;margin-top:.3rem}.warnings li{margin:.15rem 0}
.pair{margin-bottom:.6rem}
.na{color:#888;font-style:italic}.muted{color:#666;font-size:.9rem}img{max-width:100%;height:auto}
.notrun{color:#999}pre{white-space:pre-wrap;word-wrap:break-word;background:#f8f8f8;padding:.5rem;margin:.2rem 0;
font-size:.85rem;max-height:16rem;overflow:auto}nav a{margin-right:.8rem}
"""

_SECTIONS = [("summary", "Run summary"), ("settings", "Settings"), ("warnings", "Warnings"),
             ("funnel", "Funnel"), ("stages", "Stages"), ("counts", "Counts"), ("lengths", "Lengths"),
             ("scores", "Curation scores"), ("yield", "Yield"), ("loss", "Training loss"),
             ("win-rates", "Win rates"), ("answers", "Answers side by side"), ("examples", "Examples"),
             ("artifacts", "Artifacts")]


def build_report(
    manifests: Mapping[str, dict | None],
    *,
    curate_stages: Sequence[tuple[int, str]] = (),
    run: Mapping[str, Any] | None = None,
    loss_curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    lengths: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    scores: Mapping[int, Sequence[float] | Mapping[Any, float]] | None = None,
    win_rates: Mapping[str, Any] | None = None,
    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    plan_stages: Sequence[str] | None = None,
    settings: Sequence[tuple[str, Any]] = (),
    progress: Mapping[str, Mapping[str, Any]] | None = None,
    curation: Mapping[int, Mapping[str, Any]] | None = None,
    answers: Mapping[str, Any] | None = None,
    artifacts: Sequence[tuple[str, str, str]] = (),
    generated: datetime | None = None,
) -> str:
    """One self-contained HTML page (a str) about a run.

    Args:
        manifests: stage name -> its ``_SUCCESS.json`` (None: planned, not run), in plan order.
        curate_stages: ``[(iteration, curate stage name), ...]`` from the plan.
        run: ``name``, ``namespace``, ``storage`` for the summary.
        loss_curves: trained model stage -> ``[(step, loss), ...]``.
        lengths: series (``seed``, ``candidates``, ``curated-1``, ...) -> ``{"instruction": [chars],
            "response": [chars]}``.
        scores: iteration -> the score selection compared with the threshold, for every candidate,
            as a list of values or a histogram mapping value -> count.
        win_rates: the ``evaluation`` dict of the evaluate manifest.
        examples: series -> a few records ``{"instruction", "response", "score"}`` to show.
        plan_stages: every stage name of the plan, the report included (the verdict's count).
        settings: ``(label, value)`` rows of the run's settings.
        progress: stage -> its ``_PROGRESS.json``, for stages without a manifest (running, failed).
        curation: iteration -> ``basis`` (argmax, expected or score), ``threshold``, ``expected``
            and ``mass`` (lists), ``best``, ``borderline``, ``rejected`` (example records).
        answers: set -> ``models``, ``prompts`` (``id``, ``instruction``, ``answers``), ``lengths``.
        artifacts: ``(stage, what, key relative to the run folder)`` to link.
        generated: the time shown as generation time (default: now, UTC).
    """
    plots = _Plots()
    manifests = dict(manifests)
    curate = sorted(curate_stages)
    run = dict(run or {})
    progress = dict(progress or {})
    curation = dict(curation or {})
    generated = generated or datetime.now(timezone.utc)
    name = run.get("name") or "run"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>humpback report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>humpback report: {_e(name)}</h1>",
        _verdict(manifests, plan_stages, progress),
        f'<p class="muted">generated {_e(generated.strftime("%Y-%m-%d %H:%M:%S %Z").strip())}'
        + (f" · plots by matplotlib {_e(plots._version)}" if plots.missing is None else "") + "</p>",
        "<nav>" + "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in _SECTIONS) + "</nav>",
        _section("summary", _summary(manifests, curate, run, plan_stages)),
        _section("settings", _kv(settings) if settings else _na("no plan given")),
        _section("warnings", _warnings_section(manifests, curate, progress)),
        _section("funnel", _funnel_section(manifests, curate)),
        _section("stages", _stages_table(manifests, progress)),
        _section("counts", _counts(manifests, curate)),
        _section("lengths", _lengths_section(plots, manifests, lengths or {})),
        _section("scores", _scores_section(plots, manifests, curate, scores or {}, curation)),
        _section("yield", _yield_section(plots, manifests, curate)),
        _section("loss", _loss_section(plots, manifests, loss_curves or {})),
        _section("win-rates", _win_section(plots, manifests, win_rates, answers or {})),
        _section("answers", _answers_section(answers or {}, manifests)),
        _section("examples", _examples_section(examples or {}, curation)),
        _section("artifacts", _artifacts_section(artifacts, run)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _section(sid: str, body: str) -> str:
    title = dict(_SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _parse_time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _wall_clock(manifests: Mapping[str, Any]) -> float | None:
    """From the first stage's start to the last one's end (resumed runs include the pause)."""
    starts = [t for m in manifests.values() if (t := _parse_time(_get(m, "timings", "started")))]
    ends = [t for m in manifests.values() if (t := _parse_time(_get(m, "timings", "finished")))]
    if not starts or not ends:
        return None
    return max(0.0, (max(ends) - min(starts)).total_seconds())


def _verdict(manifests: Mapping[str, Any], plan_stages: Sequence[str] | None, progress: Mapping) -> str:
    """The banner: Succeeded / Failed / Running / Incomplete, stage count of the plan, wall-clock."""
    names = list(plan_stages) if plan_stages else list(manifests)
    done = sum(1 for n in names if manifests.get(n))
    others_done = all(manifests.get(n) for n in names if n != "report")
    if "report" in names and others_done:
        done += 1  # this page is the report stage's output
    failed = [(n, p) for n, p in progress.items() if p.get("state") == "failed"]
    running = [(n, p) for n, p in progress.items() if p.get("state") == "running"]
    if failed:
        state, cls = "Failed", "fail"
        detail = "; ".join(f"stage {n} failed: {p.get('last_error') or 'no message'}" for n, p in failed)
    elif others_done:
        state, cls, detail = "Succeeded", "ok", ""
    elif running:
        state, cls = "Running", "running"
        detail = "; ".join(format_line(p) for _, p in running)
    else:
        state, cls = "Incomplete", "running"
        missing = [n for n in names if n != "report" and not manifests.get(n)]
        detail = f"not run yet: {', '.join(missing)}"
    wall = _wall_clock(manifests)
    facts = [f"{done} of {len(names)} stages finished"]
    if wall is not None:
        facts.append(f"wall-clock {format_duration(wall)}")
    return (f'<div class="verdict {cls}" id="verdict"><strong>{_e(state)}</strong> · {_e(" · ".join(facts))}'
            + (f'<div class="detail">{_e(detail)}</div>' if detail else "") + "</div>")


def _summary(manifests: dict, curate: list[tuple[int, str]], run: dict, plan_stages: Sequence[str] | None) -> str:
    done = [n for n, m in manifests.items() if m]
    seconds = sum(s for m in manifests.values() if _is_number(s := _get(m, "timings", "seconds")))
    versions = sorted({str(v) for m in manifests.values() if (v := _get(m, "humpbackVersion"))})
    rows: list[tuple[str, Any]] = [
        ("run", run.get("name")),
        ("namespace", run.get("namespace")),
        ("artifacts", run.get("storage")),
        ("stages finished (before the report)", f"{len(done)} of {len(manifests)}"),
        ("stages in the plan", len(plan_stages) if plan_stages else None),
        ("stage time (s, summed)", float(seconds)),
        ("humpback version", ", ".join(versions) or None),
    ]
    seed = _count(manifests.get("prepare-seed"), "pairs")
    rows.append(("seed pairs", seed if seed is not None else _get(manifests.get("prepare-seed"), "outputs", "count")))
    rows.append(("corpus segments kept", _count(manifests.get("prepare-corpus"), "kept")))
    rows.append(("augmented candidates", _get(manifests.get("augment"), "outputs", "count")))
    for k, stage in curate:
        rows.append((f"curated pairs, iteration {k}", _count(manifests[stage], "selected")))
    return _kv((k, v) for k, v in rows if v is not None)


def _warnings_section(manifests: dict, curate: list[tuple[int, str]], progress: Mapping) -> str:
    """What a reader must not miss: rejected records, unparsable scores, yield floors, failures."""
    items: list[str] = []
    for name, m in manifests.items():
        if not m:
            continue
        bad = _get(m, "badRecords", "count")
        if _is_number(bad) and bad > 0:
            examples = _get(m, "badRecords", "examples") or []
            items.append(f"{name}: {bad:,} bad input record(s) skipped"
                         + (f", e.g. {examples[0]}" if examples and isinstance(examples[0], str) else ""))
        for w in m.get("warnings") or []:  # any stage may list its own (yield floors among them)
            items.append(f"{name}: {w if isinstance(w, str) else _get(w, 'message') or w}")
        dropped = _get(m, "metrics", "examples_dropped")
        if _is_number(dropped) and dropped > 0:
            items.append(f"{name}: {dropped:,} training example(s) dropped (prompt fills maxSeqLength)")
        truncated = _get(m, "metrics", "examples_truncated")
        if _is_number(truncated) and truncated > 0:
            items.append(f"{name}: {truncated:,} training example(s) truncated to maxSeqLength")
    for k, stage in curate:
        m = manifests.get(stage)
        rate = _get(m, "scores", "unparsableRate")
        if _is_number(rate) and rate > 0:
            items.append(f"{stage}: {rate:.1%} of the scores were unparsable (not kept)")
        selected, scored = _count(m, "selected"), _count(m, "scored")
        if _is_number(selected) and _is_number(scored) and scored and selected == 0:
            items.append(f"{stage}: no candidate reached the threshold; train-m{k} saw the seed only")
        elif _is_number(selected) and _is_number(scored) and scored and selected == scored:
            items.append(f"{stage}: every candidate reached the threshold: curation filtered nothing")
    for name, p in progress.items():
        if p.get("state") == "failed":
            items.append(f"{name}: failed: {p.get('last_error') or 'no message'}")
        elif p.get("last_error"):
            items.append(f"{name}: last error while running: {p['last_error']}")
    if not items:
        return '<p class="muted">none: no rejected records, unparsable scores or failures</p>'
    return '<ul class="warnings">' + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def _funnel_section(manifests: dict, curate: list[tuple[int, str]]) -> str:
    """From documents read to curated pairs, per iteration."""
    corpus, augment = manifests.get("prepare-corpus"), manifests.get("augment")
    head = [("documents read", _count(corpus, "read")), ("segments kept", _count(corpus, "kept")),
            ("candidate pairs", _get(augment, "outputs", "count"))]
    if not curate:
        return _kv(head) if any(v is not None for _, v in head) else _na("stage prepare-corpus not run")
    header = ["iteration", "documents read", "segments kept", "candidates", "rewritten", "scored", "selected",
              "kept of segments", "training examples (seed + curated)"]
    rows = []
    seed = _count(manifests.get("prepare-seed"), "pairs")
    for k, stage in curate:
        m = manifests.get(stage)
        rewrite = manifests.get(f"rewrite-{k}")
        selected, segments = _count(m, "selected"), head[1][1]
        share = selected / segments if _is_number(selected) and _is_number(segments) and segments else None
        train = manifests.get(f"train-m{k}")
        examples = _get(train, "outputs", "count")
        rows.append([_num(k), _num(head[0][1]), _num(segments), _num(head[2][1]),
                     _num(_get(rewrite, "outputs", "count")) if f"rewrite-{k}" in manifests else "not used",
                     _num(_count(m, "scored")), _num(selected), "–" if share is None else _e(f"{share:.1%}"),
                     _e(f"{examples:,} ({seed if seed is not None else '?'} + {selected if selected is not None else '?'})")
                     if _is_number(examples) else "–"])
    return _table(header, rows)


def _stages_table(manifests: dict, progress: Mapping | None = None) -> str:
    if not manifests:
        return _na("no stages in the plan")
    rows = []
    for name, m in manifests.items():
        if not m:
            p = (progress or {}).get(name)
            state = '<span class="notrun">not run</span>'
            if p and p.get("state") in ("running", "failed"):
                state = _e(f"{p['state']}: {format_line(p)}")
            rows.append([_e(name), state, "", _num(p.get("done")) if p else "", "", ""])
            continue
        seconds = _get(m, "timings", "seconds")
        rows.append([_e(name), "done", f"<code>{_e(m.get('fingerprint'))}</code>",
                     _num(_get(m, "outputs", "count")), _num(float(seconds) if _is_number(seconds) else None, 1),
                     _num(m.get("resumed")) if isinstance(m.get("resumed"), bool) else "–"])
    return _table(["stage", "status", "fingerprint", "records", "seconds", "resumed"], rows)


def _int_fields(counts: Any) -> list[tuple[str, int]]:
    if not isinstance(counts, Mapping):
        return []
    return [(str(k), v) for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)]


def _counts(manifests: dict, curate: list[tuple[int, str]]) -> str:
    out = []

    def block(title: str, stage: str, body) -> None:
        out.append(f"<h3>{_e(title)}</h3>")
        m = manifests.get(stage)
        out.append(body(m) if m else _na(f"stage {stage} not run"))

    def seed(m: dict) -> str:
        fields = _int_fields(m.get("counts"))
        if not fields:
            return _kv([("seed pairs", _get(m, "outputs", "count"))])
        return _kv((k.replace("_", " "), v) for k, v in fields)

    def corpus(m: dict) -> str:
        counts = m.get("counts")
        fields = dict(_int_fields(counts))
        if not fields:
            return _na("no counts in the prepare-corpus manifest")
        first = [("documents read", fields.pop("read", None)), ("segments kept", fields.pop("kept", None))]
        lines = fields.pop("boilerplate_lines_removed", None)
        renamed = fields.pop("duplicate_ids_renamed", None)
        # Pairs the near-dup verification compared and turned down, not documents removed.
        pairs = [("near-duplicate candidate pairs verified", fields.pop("lsh_candidates", None)),
                 ("candidate pairs under the threshold (kept)", fields.pop("lsh_rejected", None))]
        rows = [(k, v) for k, v in first if v is not None]
        rows += [(f"removed: {k.replace('_', ' ')}", v) for k, v in fields.items()]
        if lines is not None:
            rows.append(("boilerplate lines stripped (not documents)", lines))
        if renamed:
            rows.append(("duplicate ids made unique (kept)", renamed))
        rows += [(k, v) for k, v in pairs if v is not None]
        return _kv(rows)

    def generic(m: dict) -> str:
        rows: list[tuple[str, Any]] = [("records written", _get(m, "outputs", "count"))]
        for k, v in _int_fields(m.get("counts")):
            label = k.replace("_", " ")
            rows.append((f"dropped: {label}" if "drop" in k and not label.startswith("dropped") else label, v))
        return _kv([(k, v) for k, v in rows if v is not None])

    block("Seed pairs (prepare-seed)", "prepare-seed", seed)
    block("Corpus (prepare-corpus)", "prepare-corpus", corpus)
    block("Augmented candidates (augment)", "augment", generic)
    for name in manifests:
        if name == "rewrite" or name.startswith("rewrite-"):
            block(f"Rewriting ({name})", name, generic)
    out.append("<h3>Curated yield per iteration</h3>")
    if not curate:
        out.append(_na("stage curate-k not run"))
    else:
        rows = []
        for k, stage in curate:
            m = manifests[stage]
            if not m:
                rows.append([_num(k), '<span class="notrun">not run</span>', "", "", "", ""])
                continue
            selected, scored = _count(m, "selected"), _count(m, "scored")
            ratio = selected / scored if _is_number(selected) and _is_number(scored) and scored else None
            unparsable = _get(m, "scores", "unparsable")
            rows.append([_num(k), _e(m.get("mode") or "–"), _num(scored), _num(selected),
                         "–" if ratio is None else _e(f"{ratio:.1%}"), _num(unparsable)])
        out.append(_table(["iteration", "mode", "scored", "selected", "yield", "unparsable"], rows))
    return "\n".join(out)


def _lengths_section(plots: _Plots, manifests: dict, lengths: Mapping) -> str:
    have = {n: d for n, d in lengths.items() if isinstance(d, Mapping) and any(d.get(f) for f in d)}
    if not have:
        return _na("stages prepare-seed, augment and curate-k not run, or their records unreadable")
    rows = []
    for name, data in have.items():
        for field in ("instruction", "response"):
            vals = sorted(v for v in (data.get(field) or []) if _is_number(v))
            if vals:
                rows.append([_e(name), _e(field), _num(len(vals)), _num(vals[len(vals) // 2]),
                             _num(min(vals)), _num(max(vals))])
    table = _table(["series", "field", "records", "median chars", "min", "max"], rows)
    plot = plots.unavailable() if plots.missing else _length_plot(plots, have)
    return table + "\n" + plot


def _scores_section(plots: _Plots, manifests: dict, curate: list[tuple[int, str]], scores: Mapping,
                    curation: Mapping[int, Mapping] | None = None) -> str:
    curation = curation or {}
    usable = {k: v for k, v in scores.items() if _weighted(v)[0]}
    if not usable:
        return _na("stage curate-k not run" if not any(manifests.get(s) for _, s in curate)
                   else "no scores in the curate manifests")
    notes = [f"iteration {k}: {_na_text(f'stage {s} not run')}" for k, s in curate
             if k not in usable and not manifests.get(s)]
    modes = {k: _get(manifests.get(s), "mode") for k, s in curate}
    rows = []
    for k in sorted(usable):
        xs, ws = _weighted(usable[k])
        total = sum(ws)
        mean = sum(x * w for x, w in zip(xs, ws)) / total if total else None
        info = curation.get(k) or {}
        threshold = info.get("threshold")
        kept = sum(w for x, w in zip(xs, ws) if x >= threshold) / total if _is_number(threshold) and total else None
        expected = info.get("expected") or []
        rows.append([_num(k), _e(modes.get(k) or "–"), _e(_BASIS_LABEL.get(info.get("basis"), "–")),
                     _num(threshold, 2), _num(int(total)), _num(mean, 2),
                     _num(sum(expected) / len(expected), 2) if expected else "–",
                     "–" if kept is None else _e(f"{kept:.1%}")])
    body = _table(["iteration", "mode", "selection compares", "threshold", "candidates", "mean of that score",
                   "mean expected score", "at or above threshold"], rows)
    body += ('<p class="muted">The histogram shows the score selection compared with the threshold (dashed '
             "line): in logprobs mode the most likely digit (argmax) or the expected score, as set by "
             "spec.curation.selectBy; in generate mode the score parsed from the model's reply.</p>")
    body += "\n" + (plots.unavailable() if plots.missing else _score_plot(plots, usable, curation))
    masses = {k: info["mass"] for k, info in sorted(curation.items()) if info.get("mass")}
    if masses:
        body += "<h3>Probability mass on the digits 1–5 (logprobs mode)</h3>"
        body += ('<p class="muted">How much of the next-token probability the model put on the score digits; '
                 "low mass means the rating prompt did not steer it to a digit.</p>")
        body += _table(["iteration", "pairs", "min", "p5", "p25", "median", "p75", "p95", "max"],
                       ([_num(k), _num(len(v)), *(_num(q, 3) for q in _quantiles(v, (0, .05, .25, .5, .75, .95, 1)))]
                        for k, v in masses.items()))
    else:  # no scored records at hand: the quantiles the curate manifests carry
        quantiles = [(k, m) for k, s in curate if isinstance(m := _get(manifests.get(s), "scores", "digitMass"), Mapping)]
        if quantiles:
            cols = ["min", "p05", "p25", "p50", "p75", "p95", "max"]
            body += "<h3>Probability mass on the digits 1–5 (logprobs mode)</h3>" + _table(
                ["iteration", "min", "p5", "p25", "median", "p75", "p95", "max"],
                [[_num(k), *(_num(m.get(c), 3) for c in cols)] for k, m in quantiles])
    if notes:
        body += "\n" + "".join(f'<p class="na">{_e(n)}</p>' for n in notes)
    return body


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    xs = sorted(values)
    return [xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] for q in qs]


def _na_text(reason: str) -> str:
    return f"not available ({reason})"


def _yield_section(plots: _Plots, manifests: dict, curate: list[tuple[int, str]]) -> str:
    rows = []
    for k, stage in curate:
        selected, scored = _count(manifests.get(stage), "selected"), _count(manifests.get(stage), "scored")
        if _is_number(selected) and _is_number(scored) and scored > 0:
            rows.append((k, selected / scored))
    if not rows:
        return _na("stage curate-k not run, or its manifest has no selected/scored counts")
    return plots.unavailable() if plots.missing else _yield_plot(plots, rows)


def _loss_section(plots: _Plots, manifests: dict, curves: Mapping) -> str:
    usable = {n: list(c) for n, c in curves.items() if c}
    trained = [n for n in manifests if n.startswith("train-")]
    if not usable:
        reason = ("stage train-* not run" if not any(manifests.get(n) for n in trained)
                  else "no metrics.train_loss in the train manifests")
        return _na(reason)
    rows = [[_e(n), _num(len(c)), _num(c[-1][1], 4)] for n, c in usable.items()]
    missing = [n for n in trained if n not in usable]
    body = _table(["model", "points", "final loss"], rows)
    body += "\n" + (plots.unavailable() if plots.missing else _loss_plot(plots, usable))
    if missing:
        body += "\n" + _na("no loss curve for " + ", ".join(missing))
    return body


def _win_section(plots: _Plots, manifests: dict, win_rates: Mapping | None, answers: Mapping | None = None) -> str:
    if win_rates is None:
        win_rates = _get(manifests.get("evaluate"), "evaluation")
    if not isinstance(win_rates, Mapping):
        if "evaluate" not in manifests:
            return _na("stage evaluate not in the plan: evaluation is not enabled")
        return _na("stage evaluate not run")
    rows = []
    for set_name, entry in (win_rates.get("sets") or {}).items():
        for key, pair in (_get(entry, "pairs") or {}).items():
            if isinstance(pair, Mapping) and _is_number(pair.get("win_rate")):
                rows.append({"set": set_name, "key": key, **pair,
                             "a": pair.get("a") or key, "b": pair.get("b") or ""})
    extra = _reference_and_mt_bench_tables(win_rates)
    if not rows:
        if extra:
            return extra
        note = win_rates.get("note")
        if win_rates.get("judged") is False or win_rates.get("judge") is None:
            return _na(note or "no judge configured") + _answer_lengths(plots, answers or {})
        return _na(note or "no readable verdicts") + _answer_lengths(plots, answers or {})
    table = _table(
        ["set", "A", "B", "win rate of A", "± stderr", "n", "wins", "ties", "losses", "unparsed",
         "position consistency"],
        ([_e(r["set"]), _e(r["a"]), _e(r["b"]), _num(r["win_rate"]), _num(r.get("stderr")), _num(r.get("n")),
          _num(r.get("wins")), _num(r.get("ties")), _num(r.get("losses")), _num(r.get("unparsed")),
          _num(r.get("position_consistency"))] for r in rows))
    judge = win_rates.get("judge")
    who = (f"Judge: model {_e(_get(judge, 'model'))} at {_e(_get(judge, 'endpoint'))}. "
           if isinstance(judge, Mapping) else "")
    caption = (f'<p class="muted">{who}Each prompt is judged in both orders; the win rate of A averages '
               "them (win 1, tie 0.5, loss 0) over n prompts. Wins, ties, losses and unparsed count "
               "judgments. The plot's bars are ±1.96 standard errors.</p>")
    plot = plots.unavailable() if plots.missing else _win_plot(plots, rows)
    return caption + table + "\n" + plot + extra + _answer_lengths(plots, answers or {})


def _reference_and_mt_bench_tables(win_rates: Mapping) -> str:
    """Win rates against reference outputs (with lengths and the length-controlled win rate) and
    MT-Bench grades, when the evaluate manifest has them."""
    ref_rows, mt_rows = [], []
    for set_name, entry in (win_rates.get("sets") or {}).items():
        ref = _get(entry, "reference")
        for model, r in ((_get(ref, "models") or {}) if isinstance(ref, Mapping) else {}).items():
            if isinstance(r, Mapping):
                ref_rows.append([_e(set_name), _e(model), _e(_get(ref, "generator")), _num(r.get("win_rate")),
                                 _num(r.get("stderr")), _num(r.get("length_controlled_win_rate")),
                                 _num(r.get("avg_length")), _num(r.get("reference_avg_length")), _num(r.get("n"))])
        for model, m in (_get(entry, "mt_bench") or {}).items():
            if isinstance(m, Mapping):
                cats = m.get("categories") if isinstance(m.get("categories"), Mapping) else {}
                mt_rows.append([_e(set_name), _e(model), _num(m.get("score")), _num(m.get("turn_1")),
                                _num(m.get("turn_2")), _e(", ".join(f"{c} {v:.2f}" for c, v in cats.items()
                                                                    if _is_number(v))),
                                _num(m.get("graded")), _num(m.get("unparsed"))])
    out = ""
    if ref_rows:
        out += ('<h3>Against reference outputs</h3><p class="muted">Both orders per prompt; the length-'
                "controlled win rate is AlpacaEval 2.0's (Dubois et al. 2024): a logistic fit on the length "
                "difference, read at zero difference. Lengths in characters.</p>")
        out += _table(["set", "model", "reference", "win rate", "± stderr", "length-controlled",
                       "avg length", "reference avg length", "n"], ref_rows)
    if mt_rows:
        out += ('<h3>MT-Bench</h3><p class="muted">Single-answer grading 1-10 with FastChat\'s judge '
                "prompts; score is the mean over both turns.</p>")
        out += _table(["set", "model", "score", "turn 1", "turn 2", "categories", "graded", "unparsed"], mt_rows)
    return out


def _answer_lengths(plots: _Plots, answers: Mapping) -> str:
    rows = []
    for set_name, entry in answers.items():
        for model, vals in (entry.get("lengths") or {}).items():
            if vals:
                xs = sorted(vals)
                rows.append([_e(set_name), _e(model), _num(len(xs)), _num(xs[len(xs) // 2]),
                             _num(round(sum(xs) / len(xs))), _num(xs[-1])])
    if not rows:
        return ""
    out = ("<h3>Answer lengths</h3>"
           '<p class="muted">Judges favour longer answers: read the win rates next to these.</p>'
           + _table(["set", "model", "answers", "median chars", "mean chars", "max chars"], rows))
    return out + "\n" + ("" if plots.missing else _answer_length_plot(plots, answers))


def _answers_section(answers: Mapping, manifests: Mapping) -> str:
    shown = {n: e for n, e in answers.items() if e.get("prompts")}
    if not shown:
        if "evaluate" not in manifests:
            return _na("stage evaluate not in the plan: evaluation is not enabled")
        return _na("stage evaluate not run" if not manifests.get("evaluate") else "no answers readable")
    out = []
    for set_name, entry in shown.items():
        models = list(entry.get("models") or [])
        out.append(f"<h3>{_e(set_name)}</h3>")
        head = "".join(f"<th>{_e(m)}</th>" for m in models)
        body = []
        for prompt in entry["prompts"]:
            cells = "".join(f"<td><pre>{_e(_clip(prompt['answers'].get(m)))}</pre></td>" for m in models)
            question = prompt.get("instruction") or f"prompt {prompt.get('id')}"
            body.append(f'<tr><th scope="row"><pre>{_e(_clip(question))}</pre></th>{cells}</tr>')
        out.append(f'<table class="side"><thead><tr><th>prompt</th>{head}</tr></thead>'
                   f'<tbody>{"".join(body)}</tbody></table>')
    return "\n".join(out)


def _pair_html(r: Mapping) -> str:
    score = r.get("score")
    expected = r.get("expected")
    label = f"score {_num(score, 2)}" + (f" · expected {_num(expected, 2)}" if _is_number(expected) else "")
    return (f'<div class="pair"><p class="muted">{_e(label)}</p>'
            f"<pre>{_e(_clip(r.get('instruction')))}</pre><pre>{_e(_clip(r.get('response')))}</pre></div>")


def _examples_section(examples: Mapping, curation: Mapping[int, Mapping] | None = None) -> str:
    curation = curation or {}
    kinds = (("best", "Best"), ("borderline", "Borderline (around the threshold)"), ("rejected", "Rejected"))
    graded = {k: info for k, info in sorted(curation.items()) if any(info.get(kind) for kind, _ in kinds)}
    if graded:
        out = []
        for k, info in graded.items():
            out.append(f"<h3>Iteration {_e(k)}</h3>")
            for kind, title in kinds:
                records = info.get(kind) or []
                out.append(f"<h4>{_e(title)}</h4>")
                out.append("".join(_pair_html(r) for r in records) if records else _na(f"no {kind} pairs"))
        return "\n".join(out)
    if not any(examples.values()):
        return _na("no curated pairs")
    out = []
    for series, records in examples.items():
        if not records:
            continue
        out.append(f"<h3>{_e(series)}</h3>")
        for r in records:
            score = r.get("expected") if _is_number(r.get("expected")) else r.get("score")
            out.append(f'<p class="muted">score {_num(score, 2)}</p>'
                       f"<pre>{_e(_clip(r.get('instruction')))}</pre><pre>{_e(_clip(r.get('response')))}</pre>")
    return "\n".join(out)


def _artifacts_section(artifacts: Sequence[tuple[str, str, str]], run: Mapping) -> str:
    if not artifacts:
        return _na("no finished stage")
    base = run.get("storage")
    rows = []
    for stage, what, key in artifacts:
        # Relative to this page (<run>/report/index.html): works on a local store and a served bucket.
        href = "../" + "/".join(quote(part) for part in key.split("/"))
        full = f"{base}/{key}" if base else key
        rows.append([_e(stage), _e(what), f'<a href="{_e(href)}">{_e(full)}</a>'])
    return ('<p class="muted">Links are relative to this report inside the run folder.</p>'
            + _table(["stage", "artifact", "where"], rows))


def _clip(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + " …"

"""The evaluate stage: answers of M0..Mk on evaluation prompt sets, judged pairwise by any
OpenAI-compatible judge (through its chat API by default, ``evaluation.judge.api``), summarised as
win rates with standard errors.

The stage (`humpback stage evaluate --spec RUN.yaml`) calls :func:`evaluate` with a callable that
answers prompts with one trained model; the engine behind it is the stage's business::

    system = prompts.inference_system(run.spec.system_prompts)   # the seed tag every forward model trained with

    def generate_answers(model_stage, records, prefix):      # -> {prompt id: answer text}
        engine = engine_for(model_stage)                       # vLLM server, in-process, transformers
        engine.generate(records, lambda r: prompts.forward_prompt(r["instruction"], system),
                        run.spec.evaluation.sampling, store=store, prefix=prefix, ...)
        return {r["id"]: r["answer"] for r in iter_shard_records(store, list_shards(store, prefix))}

    result = evaluate(run.spec.evaluation, ["train-m0", "train-m1", "train-m2"], generate_answers,
                      store=store, prefix="ns/run/evaluate")
    manifest.update(result)          # {"outputs": {...}, "evaluation": {...}}: see evaluate()

Public API (everything else is internal):

- :func:`load_eval_set` ``(source) -> [{"id", "instruction", ...}]``: ``builtin:vicuna80`` /
  ``builtin:mt_bench`` (shipped, Apache-2.0; see ``data/eval/SOURCES.md``) or any JSONL / Parquet
  source with ``id`` and ``instruction`` fields.
- :func:`judge_pairs`: every prompt judged in both orders (model A's answer first, ``ID:ab``, then
  model B's first, ``ID:ba``) to cancel position bias; judgments are checkpointed shards written
  by :func:`~humpback_runtime.inference.client.run_completions`, so a restart asks the judge only
  what is not judged yet. A verdict that :func:`~humpback_runtime.prompts.parse_verdict` cannot
  read is stored as ``None`` and counted, never guessed.
- :func:`win_rate` ``(judgments) -> {...}``: the statistics of one comparison.
- :func:`comparisons` ``(models) -> [(A, B)]``: which pairs the stage judges.
- :func:`evaluate`: the stage's orchestration.

Without a judge the stage writes the answers only and says so (``"judged": false`` and a
``note``); it never invents win rates.

Storage layout under the stage prefix::

    answers/<set>/<model stage>/...            whatever generate_answers writes there
    judgments/<set>/<A>-vs-<B>/part-NNNNN.jsonl {"id": "vicuna-1:ab", "prompt_id", "order",
                                                 "verdict": "A"|"B"|"tie"|null,
                                                 "winner": "a"|"b"|"tie"|null, "text"}

``verdict`` is what the judge wrote (positions), ``winner`` the model it means (``"a"`` is
model A, the newer model Mk, whatever the order).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from humpback_runtime.pod_contract import JUDGE_API_KEY_ENV
from urllib.parse import urlsplit, urlunsplit

from humpback_runtime.inference.client import ClientSettings, CompletionsClient, run_completions
from humpback_runtime.prompts import pairwise_judge_prompt, parse_verdict
from humpback_runtime.sources import BadRecords, DataError, iter_source_records
from humpback_runtime.storage import Store, iter_shard_records, list_shards

if TYPE_CHECKING:
    from humpback_runtime.spec import EvaluationSpec

__all__ = [
    "BUILTIN_SETS",
    "EvaluationError",
    "GenerateAnswers",
    "JUDGE_API_KEY_ENV",
    "Judging",
    "comparisons",
    "evaluate",
    "judge_pairs",
    "load_eval_set",
    "win_rate",
]

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = ("vicuna80", "mt_bench")
# The judge's API key, if it needs one, is JUDGE_API_KEY_ENV: the operator sets it from the Secret
# named by spec.evaluation.judge.apiKeySecret (key apiKey); locally, export it.
ORDERS = ("ab", "ba")

# (model stage, prompt records, store prefix for its checkpoints) -> {prompt id: answer}
GenerateAnswers = Callable[[str, list[dict], str], Mapping[str, str]]


class EvaluationError(ValueError):
    """An evaluation set, an answer set or the judge configuration cannot be used."""


# --- evaluation sets ----------------------------------------------------------------------------

def load_eval_set(source: str, *, endpoint_url: str | None = None, region: str | None = None,
                  base_dir: str | os.PathLike | None = None) -> list[dict]:
    """The prompts of one evaluation set, in file order: dicts with ``id`` (str) and ``instruction``.

    ``source`` is ``builtin:NAME`` (one of :data:`BUILTIN_SETS`, shipped with the package) or
    anything :func:`~humpback_runtime.sources.iter_source_records` reads (a path, ``file://``,
    ``s3://``; ``endpoint_url`` / ``region`` apply to S3). Every record needs a non-empty string
    ``id`` (an integer is taken as its decimal string) unique in the set, and a non-empty string
    ``instruction``; other fields are kept. Any malformed line or record raises
    :class:`EvaluationError` naming ``FILE:LINE``: an evaluation set is never silently shortened.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_SETS:
            raise EvaluationError(f"unknown evaluation set {source!r}: the built-in sets are "
                                  + ", ".join(f"builtin:{n}" for n in BUILTIN_SETS))
        rows = _builtin_rows(name, source)
    else:
        try:
            rows = list(iter_source_records(source, bad=BadRecords("fail", label="evaluation"),
                                            endpoint_url=endpoint_url, region=region, base_dir=base_dir))
        except DataError as e:
            raise EvaluationError(f"cannot read evaluation set {source}: {e}") from e
    records, seen = [], {}
    for where, row in rows:
        record = _check_record(where, row)
        if record["id"] in seen:
            raise EvaluationError(f"{where}: duplicate id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        records.append(record)
    if not records:
        raise EvaluationError(f"evaluation set {source} has no prompts")
    return records


def _builtin_rows(name: str, source: str) -> list[tuple[str, Any]]:
    resource = importlib.resources.files("humpback_runtime").joinpath("data", "eval", f"{name}.jsonl")
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise EvaluationError(f"{source}: the file data/eval/{name}.jsonl is missing from the installed "
                              f"humpback_runtime package (a packaging error; reinstall humpback)") from e
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{source}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:  # a broken installation
                raise EvaluationError(f"{source}:{lineno}: not valid JSON: {e}") from e
    return rows


def _check_record(where: str, row: Any) -> dict:
    if not isinstance(row, dict):
        raise EvaluationError(f"{where}: expected a JSON object with id and instruction")
    rid = row.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid.strip():
        raise EvaluationError(f"{where}: missing or invalid 'id' (expected a non-empty string, "
                              f"got {_shown(row.get('id', _MISSING))})")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise EvaluationError(f"{where}: missing or invalid 'instruction' (expected a non-empty string, "
                              f"got {_shown(row.get('instruction', _MISSING))})")
    return {**row, "id": rid}


_MISSING = object()


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "no such field"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- judging --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judging:
    """What :func:`judge_pairs` returns: every judgment of the requested prompts (this run's and
    earlier runs'), and the request statistics of this run (``run_completions``'s dict)."""

    judgments: list[dict]
    stats: dict[str, Any]


def judge_pairs(
    judge: ClientSettings,
    prompts: Sequence[dict],
    answers_a: Mapping[str, str],
    answers_b: Mapping[str, str],
    *,
    store: Store,
    prefix: str,
    max_tokens: int = 1024,
    checkpoint_every: int = 100,
) -> Judging:
    """Ask the judge to compare model A's and model B's answer to every prompt, in both orders.

    ``prompts`` are records with ``id`` and ``instruction`` (from :func:`load_eval_set`); both
    answer maps must hold every prompt id (an empty answer is a legitimate, bad answer). Requests
    use :func:`~humpback_runtime.prompts.pairwise_judge_prompt` at temperature 0 with
    ``max_tokens`` for the judge's reasoning. Judgments ``{"id": "<prompt id>:ab"|":ba", ...}``
    (see the module docstring) are checkpointed under ``prefix`` every ``checkpoint_every``;
    pairs already judged there are skipped. Runs its own event loop: call it from sync code.
    """
    missing = [(name, p["id"]) for p in prompts for name, answers in (("A", answers_a), ("B", answers_b))
               if not isinstance(answers.get(p["id"]), str)]
    if missing:
        shown = ", ".join(f"{pid!r} (model {name})" for name, pid in missing[:5])
        raise EvaluationError(f"cannot judge: {len(missing)} answer(s) missing or not text, e.g. {shown}")
    requests = [
        {"id": f"{p['id']}:{order}", "prompt_id": p["id"], "order": order,
         "instruction": p["instruction"], "first": first, "second": second}
        for p in prompts
        for order, first, second in (("ab", answers_a[p["id"]], answers_b[p["id"]]),
                                     ("ba", answers_b[p["id"]], answers_a[p["id"]]))
    ]

    def build(req: dict) -> tuple[str, dict]:
        return (pairwise_judge_prompt(req["instruction"], req["first"], req["second"]),
                {"max_tokens": max_tokens, "temperature": 0.0})

    def handle(req: dict, choice: dict) -> dict:
        text = choice.get("text")
        verdict = parse_verdict(text) if isinstance(text, str) else None
        return {"id": req["id"], "prompt_id": req["prompt_id"], "order": req["order"],
                "verdict": verdict, "winner": _winner(verdict, req["order"]),
                "text": text if isinstance(text, str) else None}

    async def run() -> dict:
        async with CompletionsClient(judge) as client:
            return await run_completions(client, requests, build, handle, store=store, prefix=prefix,
                                         checkpoint_every=checkpoint_every, total=len(requests),
                                         desc="judging")

    stats = asyncio.run(run())
    wanted = {r["id"] for r in requests}
    judgments = [j for j in iter_shard_records(store, list_shards(store, prefix)) if j.get("id") in wanted]
    unparsed = sum(1 for j in judgments if j.get("winner") is None)
    log.info("Judged %d prompts in both orders under %s (%d asked now, %d already judged, %d unparsable verdicts)",
             len(prompts), store.url(prefix), stats["completed"], stats["skipped_done"], unparsed)
    return Judging(judgments, stats)


def _winner(verdict: str | None, order: str) -> Literal["a", "b", "tie"] | None:
    """The model a verdict means: in order "ab" answer A is model A's, in order "ba" model B's."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    first_wins = verdict == "A"
    return ("a" if first_wins else "b") if order == "ab" else ("b" if first_wins else "a")


_POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}


def win_rate(judgments: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Model A's win rate over model B from judgments ``{"prompt_id", "order", "winner"}``.

    Per prompt, each readable judgment scores 1 (A wins), 0.5 (tie) or 0 (B wins); the prompt's
    score is the mean over its readable orders (normally both; one when the other is unparsable).
    Prompts whose judgments are all unparsable are left out and counted in ``excluded``.

    Returns:
        ``win_rate``: mean prompt score (None without prompts); ``stderr``: sample standard
        deviation of the prompt scores / sqrt(n) (None for n < 2); ``n``: prompts counted;
        ``wins`` / ``ties`` / ``losses`` / ``unparsed``: judgments (not prompts) won by A, tied,
        won by B, unreadable: they add up to the number of judgments; ``excluded``: prompts left
        out; ``position_consistency``: among prompts with both orders readable (``both_orders``
        of them), the share whose two verdicts name the same winner (None without such prompts).
    """
    by_prompt: dict[Any, dict[str, str | None]] = {}
    counts = {"a": 0, "tie": 0, "b": 0, None: 0}
    for j in judgments:
        winner = j.get("winner")
        if winner not in _POINTS:
            winner = None
        counts[winner] += 1
        by_prompt.setdefault(j["prompt_id"], {})[j.get("order")] = winner
    scores, both, consistent, excluded = [], 0, 0, 0
    for orders in by_prompt.values():
        readable = [w for w in orders.values() if w is not None]
        if not readable:
            excluded += 1
            continue
        scores.append(sum(_POINTS[w] for w in readable) / len(readable))
        if orders.get("ab") is not None and orders.get("ba") is not None:
            both += 1
            consistent += orders["ab"] == orders["ba"]
    n = len(scores)
    mean = sum(scores) / n if n else None
    stderr = None
    if n >= 2:
        variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
        stderr = math.sqrt(variance) / math.sqrt(n)
    return {
        "win_rate": mean,
        "stderr": stderr,
        "n": n,
        "wins": counts["a"],
        "ties": counts["tie"],
        "losses": counts["b"],
        "unparsed": counts[None],
        "excluded": excluded,
        "position_consistency": consistent / both if both else None,
        "both_orders": both,
    }


# --- the stage ------------------------------------------------------------------------------------

def comparisons(models: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) pairs to judge: the last model against the first (Mk vs M0) and, from three models
    on, against the one before it (Mk vs M(k-1))."""
    if len(models) < 2:
        return []
    pairs = [(models[-1], models[0])]
    if len(models) >= 3:
        pairs.append((models[-1], models[-2]))
    return pairs


def evaluate(
    spec: EvaluationSpec,
    models: Sequence[str],
    generate_answers: GenerateAnswers,
    *,
    store: Store,
    prefix: str,
    judge_api_key: str | None = None,
    judge_concurrency: int = 16,
    judge_max_tokens: int = 1024,
    checkpoint_every: int = 100,
    endpoint_url: str | None = None,
    region: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Answer every set with every model, then judge Mk vs M0 (and Mk vs M(k-1)) when a judge is set.

    Args:
        spec: the run's ``EvaluationSpec`` (``sets``, ``judge``).
        models: the model stages in order, M0 first (``["train-m0", "train-m1", ...]``).
        generate_answers: ``(model stage, records, prefix) -> {prompt id: answer}``; it writes its
            own checkpoints under ``prefix`` (``answers/<set>/<model>``) and must answer every id.
        judge_api_key: the judge's key; None reads :data:`JUDGE_API_KEY_ENV` (unset: no key).
        endpoint_url, region: S3 options for sets read from ``s3://``.
        base_dir: the folder relative set paths are taken against (the run file's).

    Returns the stage manifest's fields: ``{"outputs": {"count", "answers", "judgments"},
    "evaluation": {...}}`` where ``evaluation`` is::

        {"judged": bool, "note": str | None, "judge": {"endpoint", "model"} | None,
         "models": [...], "comparisons": [[A, B], ...],
         "sets": {SET: {"source", "prompts",
                        "answers": {MODEL: {"prefix", "count"}},
                        "pairs": {"A-vs-B": {"a", "b", "prefix", "win_rate", "stderr", "n", "wins",
                                             "ties", "losses", "unparsed", "excluded",
                                             "position_consistency", "both_orders"}}}},
         "judging": {summed request statistics}}
    """
    if not models:
        raise EvaluationError("evaluate needs at least one model stage")
    sets = {s.name: (s.source, load_eval_set(s.source, endpoint_url=endpoint_url, region=region, base_dir=base_dir))
            for s in spec.sets}  # load (and validate) every set before any model runs
    judge = spec.judge
    settings = None
    if judge is not None:
        key = judge_api_key if judge_api_key is not None else os.environ.get(JUDGE_API_KEY_ENV) or None
        try:
            settings = ClientSettings(base_url=judge.endpoint, model=judge.model, api_key=key,
                                      concurrency=judge_concurrency, api=judge.api)
        except ValueError as e:
            raise EvaluationError(f"spec.evaluation.judge: {e}") from e

    result_sets: dict[str, dict] = {}
    answers: dict[tuple[str, str], Mapping[str, str]] = {}
    n_answers = 0
    for model in models:
        for name, (source, records) in sets.items():
            answers_prefix = f"{prefix}/answers/{name}/{model}"
            got = generate_answers(model, records, answers_prefix)
            _check_answers(got, records, model, name)
            answers[(name, model)] = got
            n_answers += len(records)
            entry = result_sets.setdefault(name, {"source": source, "prompts": len(records),
                                                  "answers": {}, "pairs": {}})
            entry["answers"][model] = {"prefix": answers_prefix, "count": len(records)}
            log.info("Answered %d prompts of set %s with %s", len(records), name, model)

    pairs = comparisons(models)
    judging = {"completed": 0, "skipped_done": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0,
               "seconds": 0.0}
    n_judgments = 0
    note = None
    if settings is None:
        note = "no judge configured (spec.evaluation.judge): answers only, no win rates"
    elif not pairs:
        note = "only one model: nothing to compare"
    else:
        for name, (source, records) in sets.items():
            for a, b in pairs:
                key = f"{a}-vs-{b}"
                judge_prefix = f"{prefix}/judgments/{name}/{key}"
                run = judge_pairs(settings, records, answers[(name, a)], answers[(name, b)], store=store,
                                  prefix=judge_prefix, max_tokens=judge_max_tokens,
                                  checkpoint_every=checkpoint_every)
                for field in judging:
                    judging[field] += run.stats.get(field) or 0
                n_judgments += len(run.judgments)
                stats = win_rate(run.judgments)
                result_sets[name]["pairs"][key] = {"a": a, "b": b, "prefix": judge_prefix, **stats}
                log.info("Judged %s vs %s on set %s: win rate %s (n %d, %d unparsable verdicts)", a, b, name,
                         "n/a" if stats["win_rate"] is None else f"{stats['win_rate']:.3f}", stats["n"],
                         stats["unparsed"])
    if note:
        log.info("Evaluation without win rates: %s", note)
    judging["seconds"] = round(judging["seconds"], 3)
    evaluation = {
        "judged": settings is not None and bool(pairs),
        "note": note,
        "judge": ({"endpoint": _without_userinfo(judge.endpoint), "model": judge.model, "api": judge.api}
                  if judge else None),
        "models": list(models),
        "comparisons": [list(p) for p in pairs] if settings is not None else [],
        "sets": result_sets,
        "judging": judging,
    }
    return {"outputs": {"count": n_answers, "answers": n_answers, "judgments": n_judgments},
            "evaluation": evaluation}


def _check_answers(got: Any, records: list[dict], model: str, set_name: str) -> None:
    if not isinstance(got, Mapping):
        raise EvaluationError(f"generate_answers for {model} on set {set_name} returned "
                              f"{type(got).__name__}, expected a mapping of prompt id to answer")
    bad = [r["id"] for r in records if not isinstance(got.get(r["id"]), str)]
    if bad:
        raise EvaluationError(f"{model} left {len(bad)} of {len(records)} prompts of set {set_name} without "
                              f"a text answer, e.g. {', '.join(repr(i) for i in bad[:5])}")


def _without_userinfo(url: str) -> str:
    """The URL without user:password@, so a manifest never carries credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))

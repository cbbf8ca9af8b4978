"""The evaluate stage: answers of M0..Mk on evaluation prompt sets, judged pairwise by any
OpenAI-compatible judge (through its chat API by default, ``evaluation.judge.api``), summarised as
win rates with standard errors; judged against reference outputs (win rate, average length,
AlpacaEval 2.0's length-controlled win rate); MT-Bench sets asked in two turns and graded 1-10;
every answer set exported in alpaca_eval's format (``alpaca_eval/<set>/<model>.json``). See
docs/evaluation.md.

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
    answers/<set>/turn-2/<model stage>/...     MT-Bench second turns (records carry "history")
    alpaca_eval/<set>/<model stage>.json       [{"instruction", "output", "generator", "dataset"}]
    judgments/<set>/<model>-vs-reference/...   as below, model B being the reference outputs
    judgments/<set>/<model stage>/...          MT-Bench grades {"id": "ID:t1"|"ID:t2", "rating", ...}
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
from humpback_runtime.prompts import mt_bench_judge_prompt, pairwise_judge_prompt, parse_rating, parse_verdict
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
    "grade_mt_bench",
    "judge_pairs",
    "length_controlled_win_rate",
    "load_eval_set",
    "load_reference_outputs",
    "mt_bench_scores",
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


def load_reference_outputs(source: str, records: Sequence[dict], *, endpoint_url: str | None = None,
                           region: str | None = None, base_dir: str | os.PathLike | None = None
                           ) -> tuple[dict[str, str], str]:
    """Reference answers of a set from an alpaca_eval-format file: ``({prompt id: output}, generator)``.

    ``source`` is a JSON list (or JSONL) of ``{"instruction", "output", "generator"}`` objects, as
    alpaca_eval ships its reference outputs; they are matched to ``records`` by instruction text
    (stripped). Every prompt needs one; a malformed entry or an unmatched prompt raises
    :class:`EvaluationError` naming the file and entry.
    """
    try:
        rows = list(iter_source_records(source, bad=BadRecords("fail", label="reference outputs"),
                                        endpoint_url=endpoint_url, region=region, base_dir=base_dir))
    except DataError as e:
        raise EvaluationError(f"cannot read reference outputs {source}: {e}") from e
    by_instruction: dict[str, str] = {}
    generators = set()
    for where, row in rows:
        for field in ("instruction", "output"):
            if not isinstance(row.get(field), str):
                raise EvaluationError(f"{where}: missing or invalid {field!r} (expected a string, "
                                      f"got {_shown(row.get(field, _MISSING))})")
        by_instruction.setdefault(row["instruction"].strip(), row["output"])
        generators.add(str(row.get("generator") or "reference"))
    missing = [r["id"] for r in records if r["instruction"].strip() not in by_instruction]
    if missing:
        raise EvaluationError(f"reference outputs {source} have no output for {len(missing)} of {len(records)} "
                              f"prompts (matched by instruction), e.g. {', '.join(repr(i) for i in missing[:5])}")
    return ({r["id"]: by_instruction[r["instruction"].strip()] for r in records},
            "/".join(sorted(generators)))


def _set_references(records: Sequence[dict], where: str) -> dict[str, str] | None:
    """The set's own ``reference`` answers (all or none of its records carry one)."""
    with_ref = [r for r in records if r.get("reference") is not None]
    if not with_ref:
        return None
    bad = [r["id"] for r in records if not isinstance(r.get("reference"), str)]
    if bad:
        raise EvaluationError(f"{where}: 'reference' must be a string on every record or on none; "
                              f"{len(bad)} record(s) lack one or have another type, e.g. {bad[0]!r}")
    return {r["id"]: r["reference"] for r in records}


def _check_mt_bench(records: Sequence[dict], where: str) -> None:
    for r in records:
        turns = r.get("turns")
        if (not isinstance(turns, list) or len(turns) != 2
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise EvaluationError(f"{where}: record {r['id']!r}: an MT-Bench record needs 'turns', a list of "
                                  f"2 non-empty strings (got {_shown(turns)})")
        ref = r.get("reference")
        if ref is not None and not (isinstance(ref, list) and all(isinstance(t, str) for t in ref)):
            raise EvaluationError(f"{where}: record {r['id']!r}: 'reference' must be a list of strings "
                                  f"(one per turn), got {_shown(ref)}")


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


def prompt_scores(judgments: Iterable[Mapping[str, Any]]) -> dict[Any, float]:
    """Model A's score per prompt, as :func:`win_rate` counts it (mean over readable orders)."""
    by_prompt: dict[Any, list[float]] = {}
    for j in judgments:
        points = by_prompt.setdefault(j["prompt_id"], [])
        if j.get("winner") in _POINTS:
            points.append(_POINTS[j["winner"]])
    return {pid: sum(p) / len(p) for pid, p in by_prompt.items() if p}


def length_controlled_win_rate(scores: Sequence[float], lengths_a: Sequence[float],
                               lengths_b: Sequence[float]) -> float | None:
    """AlpacaEval 2.0's length-controlled win rate of model A over baseline B.

    Dubois, Galambosi, Liang and Hashimoto 2024, "Length-Controlled AlpacaEval: A Simple Way to
    Debias Automatic Evaluators" (arXiv:2404.04475): fit a logistic regression of the preference
    for A on the normalised length difference, ``P(A wins) = sigmoid(b0 + b1 * tanh(d / std(d)))``
    with ``d = len(A) - len(B)`` per prompt (characters) and ``std`` the sample standard deviation
    over the prompts, then report the prediction at zero length difference, ``sigmoid(b0)``.
    ``scores`` are per-prompt preferences in [0, 1] (0.5 a tie), fitted as soft labels (cross-
    entropy). Deviation: the paper's GLM also has an instruction-difficulty term fitted across many
    models and a weak L2 penalty; with one model and one baseline we fit the two terms above by
    Newton's method (IRLS), unpenalised. None without prompts.
    """
    import numpy as np

    y = np.asarray(scores, dtype=float)
    if not len(y):
        return None
    d = np.asarray(lengths_a, dtype=float) - np.asarray(lengths_b, dtype=float)
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    design = np.column_stack([np.ones_like(x), x]) if sd > 0 else np.ones((len(y), 1))
    beta = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ beta, -30, 30)))
        hessian = design.T @ (design * (p * (1 - p))[:, None])
        step = np.linalg.lstsq(hessian, design.T @ (y - p), rcond=None)[0]
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-np.clip(beta[0], -30, 30))))


def answer_lengths(answers: Mapping[str, str], ids: Iterable[str]) -> list[int]:
    return [len(answers[i]) for i in ids]


def reference_stats(judgments: Sequence[Mapping[str, Any]], answers: Mapping[str, str],
                    references: Mapping[str, str]) -> dict[str, Any]:
    """:func:`win_rate` of a model against reference outputs, plus average answer lengths
    (characters, over every prompt) and the :func:`length_controlled_win_rate`."""
    stats = win_rate(judgments)
    per_prompt = prompt_scores(judgments)
    ids = list(per_prompt)
    lc = length_controlled_win_rate([per_prompt[i] for i in ids], answer_lengths(answers, ids),
                                    answer_lengths(references, ids))
    return {**stats, "length_controlled_win_rate": lc,
            "avg_length": sum(map(len, answers.values())) / len(answers) if answers else None,
            "reference_avg_length": sum(map(len, references.values())) / len(references) if references else None}


# --- MT-Bench -------------------------------------------------------------------------------------

# FastChat's NEED_REF_CATS: the categories graded against the reference answer.
MT_BENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def grade_mt_bench(
    judge: ClientSettings,
    records: Sequence[dict],
    answers_1: Mapping[str, str],
    answers_2: Mapping[str, str],
    *,
    store: Store,
    prefix: str,
    max_tokens: int = 1024,
    checkpoint_every: int = 100,
) -> Judging:
    """MT-Bench single-answer grading: the judge rates each turn's answer 1 to 10.

    ``records`` carry ``turns`` (2 questions), ``category`` and optionally ``reference`` (one
    answer per turn, used for :data:`MT_BENCH_REFERENCE_CATEGORIES` as FastChat does). Turn 1 is
    graded on the first question and answer; turn 2 on the whole conversation, focusing on the
    second answer. Judgments ``{"id": "<prompt id>:t1"|":t2", "prompt_id", "turn", "category",
    "rating": float|None, "text"}`` are checkpointed under ``prefix``; an unreadable rating is None.
    """
    requests = []
    for r in records:
        ref = r.get("reference") if r.get("category") in MT_BENCH_REFERENCE_CATEGORIES else None
        q1, q2 = r["turns"]
        a1, a2 = answers_1[r["id"]], answers_2[r["id"]]
        for turn, prompt in ((1, mt_bench_judge_prompt(q1, a1, reference=ref)),
                             (2, mt_bench_judge_prompt(q1, a1, question_2=q2, answer_2=a2, reference=ref))):
            requests.append({"id": f"{r['id']}:t{turn}", "prompt_id": r["id"], "turn": turn,
                             "category": r.get("category"), "prompt": prompt})

    def build(req: dict) -> tuple[str, dict]:
        return req["prompt"], {"max_tokens": max_tokens, "temperature": 0.0}

    def handle(req: dict, choice: dict) -> dict:
        text = choice.get("text")
        return {"id": req["id"], "prompt_id": req["prompt_id"], "turn": req["turn"], "category": req["category"],
                "rating": parse_rating(text) if isinstance(text, str) else None,
                "text": text if isinstance(text, str) else None}

    async def run() -> dict:
        async with CompletionsClient(judge) as client:
            return await run_completions(client, requests, build, handle, store=store, prefix=prefix,
                                         checkpoint_every=checkpoint_every, total=len(requests),
                                         desc="grading")

    stats = asyncio.run(run())
    wanted = {r["id"] for r in requests}
    judgments = [j for j in iter_shard_records(store, list_shards(store, prefix)) if j.get("id") in wanted]
    return Judging(judgments, stats)


def mt_bench_scores(judgments: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MT-Bench's summary: mean rating overall, per turn and per category (over both turns), as
    FastChat's show_result averages them; unreadable ratings are left out and counted."""
    judgments = list(judgments)
    ratings = [j for j in judgments if isinstance(j.get("rating"), (int, float))]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    categories = sorted({str(j.get("category")) for j in ratings})
    return {
        "score": mean([j["rating"] for j in ratings]),
        "turn_1": mean([j["rating"] for j in ratings if j.get("turn") == 1]),
        "turn_2": mean([j["rating"] for j in ratings if j.get("turn") == 2]),
        "categories": {c: mean([j["rating"] for j in ratings if str(j.get("category")) == c]) for c in categories},
        "graded": len(ratings),
        "unparsed": sum(1 for j in judgments if not isinstance(j.get("rating"), (int, float))),
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
    sets: dict[str, _Set] = {}
    for s in spec.sets:  # load (and validate) every set before any model runs
        opts = {"endpoint_url": endpoint_url, "region": region, "base_dir": base_dir}
        records = load_eval_set(s.source, **opts)
        references, generator = None, None
        if s.kind == "mt_bench":
            _check_mt_bench(records, s.source)
        elif s.reference_outputs:
            references, generator = load_reference_outputs(s.reference_outputs, records, **opts)
        else:
            references, generator = _set_references(records, s.source), "reference"
        sets[s.name] = _Set(s.source, s.kind or "pairwise", records, references,
                            generator if references else None, s.reference_outputs)
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
    second: dict[tuple[str, str], Mapping[str, str]] = {}
    n_answers = 0
    for model in models:
        for name, st in sets.items():
            answers_prefix = f"{prefix}/answers/{name}/{model}"
            got = generate_answers(model, st.records, answers_prefix)
            _check_answers(got, st.records, model, name)
            answers[(name, model)] = got
            n_answers += len(st.records)
            entry = result_sets.setdefault(name, {"source": st.source, "kind": st.kind, "prompts": len(st.records),
                                                  "answers": {}, "pairs": {}})
            entry["answers"][model] = {"prefix": answers_prefix, "count": len(st.records)}
            if st.kind == "mt_bench":  # the second question, with the first answer in context
                turn2 = [{"id": r["id"], "instruction": r["turns"][1], "history": [[r["turns"][0], got[r["id"]]]]}
                         for r in st.records]
                turn2_prefix = f"{prefix}/answers/{name}/turn-2/{model}"
                got2 = generate_answers(model, turn2, turn2_prefix)
                _check_answers(got2, turn2, model, f"{name} (turn 2)")
                second[(name, model)] = got2
                n_answers += len(turn2)
                entry["answers"][model]["turn_2"] = {"prefix": turn2_prefix, "count": len(turn2)}
            export_key = f"{prefix}/alpaca_eval/{name}/{model}.json"
            store.write_json(export_key, [{"instruction": r["instruction"], "output": got[r["id"]],
                                           "generator": model, "dataset": name} for r in st.records])
            entry["answers"][model]["alpaca_eval"] = export_key
            log.info("Answered %d prompts of set %s with %s", len(st.records), name, model)

    pairs = comparisons(models)
    judging = {"completed": 0, "skipped_done": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0,
               "seconds": 0.0}
    n_judgments = 0
    judged_any = False

    def add(run: Judging) -> None:
        nonlocal n_judgments, judged_any
        for field in judging:
            judging[field] += run.stats.get(field) or 0
        n_judgments += len(run.judgments)
        judged_any = True

    opts = {"store": store, "max_tokens": judge_max_tokens, "checkpoint_every": checkpoint_every}
    if settings is not None:
        for name, st in sets.items():
            if st.kind == "mt_bench":
                entry = result_sets[name]["mt_bench"] = {}
                for model in models:
                    grade_prefix = f"{prefix}/judgments/{name}/{model}"
                    run = grade_mt_bench(settings, st.records, answers[(name, model)], second[(name, model)],
                                         prefix=grade_prefix, **opts)
                    add(run)
                    entry[model] = {"prefix": grade_prefix, **mt_bench_scores(run.judgments)}
                    log.info("MT-Bench %s on set %s: score %s", model, name, entry[model]["score"])
                continue
            for a, b in pairs:
                key = f"{a}-vs-{b}"
                judge_prefix = f"{prefix}/judgments/{name}/{key}"
                run = judge_pairs(settings, st.records, answers[(name, a)], answers[(name, b)],
                                  prefix=judge_prefix, **opts)
                add(run)
                stats = win_rate(run.judgments)
                result_sets[name]["pairs"][key] = {"a": a, "b": b, "prefix": judge_prefix, **stats}
                log.info("Judged %s vs %s on set %s: win rate %s (n %d, %d unparsable verdicts)", a, b, name,
                         "n/a" if stats["win_rate"] is None else f"{stats['win_rate']:.3f}", stats["n"],
                         stats["unparsed"])
            if st.references is not None:
                ref_entry = result_sets[name]["reference"] = {"generator": st.generator, "source": st.reference_source,
                                                              "models": {}}
                for model in models:
                    judge_prefix = f"{prefix}/judgments/{name}/{model}-vs-reference"
                    run = judge_pairs(settings, st.records, answers[(name, model)], st.references,
                                      prefix=judge_prefix, **opts)
                    add(run)
                    stats = reference_stats(run.judgments, answers[(name, model)], st.references)
                    ref_entry["models"][model] = {"prefix": judge_prefix, **stats}
                    log.info("Judged %s vs reference on set %s: win rate %s, length-controlled %s", model, name,
                             stats["win_rate"], stats["length_controlled_win_rate"])
    note = None
    if settings is None:
        note = "no judge configured (spec.evaluation.judge): answers only, no win rates"
    elif not judged_any:
        note = "only one model and no reference outputs: nothing to compare"
    if note:
        log.info("Evaluation without win rates: %s", note)
    judging["seconds"] = round(judging["seconds"], 3)
    evaluation = {
        "judged": judged_any,
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


@dataclass(frozen=True)
class _Set:
    source: str
    kind: str
    records: list[dict]
    references: dict[str, str] | None
    generator: str | None
    reference_source: str | None


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

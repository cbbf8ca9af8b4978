"""The plan: a pure function from a BacktranslationRun spec to the DAG of stages.

The local runner and the operator both execute this plan. Each stage carries a fingerprint, a
hash of its own settings, of the identity of the data files it reads (when known) and of its
inputs' fingerprints, so a stage whose `_SUCCESS.json` holds the current fingerprint is done, and a
spec or data edit re-runs only what it changed and what depends on it. Light on purpose (no torch,
no file or network access): the operator imports it. Input identities are computed by the caller
(:attr:`humpback_runtime.context.RunContext.plan`, from :func:`humpback_runtime.sources.source_identity`)
and passed in; the operator, which never reads tenant data, plans from the spec alone.

Curation is split so that scoring happens once: curate-k's fingerprint holds what changes the
scores (mode, rubric, topLogprobs, the scorer), while the selection settings (threshold, selectBy,
minDigitMass, minYield) go into train-mk's, which selects from the stored scores.

    humpback plan examples/tiny-cpu.yaml
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from humpback_runtime.prompts import TEMPLATE_VERSION
from humpback_runtime.spec import BacktranslationRun

# Bump when a stage's code changes what it writes for the same settings, so old outputs re-run.
# One number per stage family keeps unrelated stages untouched.
STAGE_CODE_VERSIONS = {
    "prepare-seed": 1,
    "prepare-corpus": 2,  # 2: duplicate ids made unique (id#2, ...); near-duplicates verified by exact Jaccard
    "train": 2,  # 2: the backward model's prompt (the response) is cut to fit instead of dropping the pair;
    # packed batches, eval split, LoRA merge, checkpoint stalls in the metrics
    "augment": 1,
    "rewrite": 2,  # 2: rewrites cut off by maxTokens are dropped (finish_reason length)
    "curate": 2,  # 2: scores only (score = argmax in logprobs mode); selection moved to selected/<id>/
    "evaluate": 2,  # 2: reference outputs, alpaca_eval export, MT-Bench two turns graded 1-10
    "report": 2,  # 2: verdict, settings, warnings, funnel, selection-score histograms, answers, links
    "publish": 1,
}

# The version of how build_plan turns settings and inputs into a fingerprint (the payload's layout,
# the hash). Bump it with any such change. With the stage's code version and the prompt templates'
# version it makes a stage's fingerprint version, which the operator records per attempt
# (docs/crd-upgrades.md): an attempt keeps the version it started with across an operator upgrade.
FINGERPRINT_ALGORITHM = 1

# publish writes the chat templates (prompts.chat_template) into the tokenizers it uploads.
PROMPTED_FAMILIES = frozenset({"train", "augment", "rewrite", "curate", "evaluate", "publish"})
PUBLISH = "publish"

# Curation settings that choose among the stored scores rather than change them.
SELECTION_SETTINGS = ("threshold", "selectBy", "minDigitMass", "minYield")

StageKind = Literal["cpu", "train", "inference"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: StageKind  # decides the Kubernetes child: plain Job, PyTorchJob, or vLLM server + client Job
    family: str  # the stage implementation (train-m1 and train-m2 share "train")
    deps: tuple[str, ...]
    settings: dict[str, Any]  # exactly what goes into the fingerprint besides the inputs
    fingerprint: str
    iteration: int | None = None
    # For inference stages: the training stage whose model the vLLM server loads.
    serves: str | None = None
    role: str | None = None  # training role: backward, seed or forward
    # The data files the stage reads, as written in the spec (seed.source, corpus.source, evaluation sets).
    sources: tuple[str, ...] = ()
    # Their identities as they entered the fingerprint ({} when the plan was made from the spec alone).
    data: dict[str, str] = field(default_factory=dict)
    settings_digest: str = ""  # hash of settings, code and template versions: what "settings changed" means
    upstream: dict[str, str] = field(default_factory=dict)  # the fingerprints of the stages it depends on
    fingerprint_version: str = ""  # what computed the fingerprint besides the spec: see fingerprint_version()


@dataclass
class Plan:
    run_name: str
    namespace: str
    stages: list[Stage] = field(default_factory=list)

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in the plan (stages: {', '.join(self.names())})")

    def __contains__(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def upstream(self, name: str) -> list[str]:
        """`name` and every stage it depends on, in plan order."""
        wanted = {name}
        for s in reversed(self.stages):
            if s.name in wanted:
                wanted.update(s.deps)
        return [s.name for s in self.stages if s.name in wanted]

    def downstream(self, name: str) -> list[str]:
        """`name` and every stage that depends on it, in plan order."""
        hit = {name}
        for s in self.stages:
            if hit.intersection(s.deps):
                hit.add(s.name)
        return [s.name for s in self.stages if s.name in hit]

    def after(self, name: str) -> list[str]:
        """`name` and every stage the plan orders after it."""
        names = self.names()
        return names[names.index(name):]


def fingerprint_parts(stage: Stage) -> dict[str, Any]:
    """What a stage's manifest records about its fingerprint, so `plan` can say why it changed."""
    return {"settings": stage.settings_digest, "data": dict(stage.data), "upstream": dict(stage.upstream)}


def stale_reasons(stage: Stage, manifest: dict | None) -> list[str]:
    """Why the stage's outputs in the store are not current: [] when they are (done)."""
    if manifest is None:
        return ["missing"]
    if manifest.get("fingerprint") == stage.fingerprint:
        return []
    parts = manifest.get("fingerprintParts")
    if not isinstance(parts, dict):  # a manifest from before the parts were recorded
        return ["settings changed"]
    reasons = []
    if parts.get("settings") != stage.settings_digest:
        reasons.append("settings changed")
    old_data = parts.get("data") or {}
    changed = sorted(s for s in set(stage.data) | set(old_data) if stage.data.get(s) != old_data.get(s))
    if changed and stage.data:
        reasons.append(f"input changed: {', '.join(changed)}")
    old_up = parts.get("upstream") or {}
    upstream = [d for d in stage.deps if old_up.get(d) != stage.upstream.get(d)]
    if upstream:
        reasons.append(f"upstream changed: {', '.join(upstream)}")
    return reasons or ["fingerprint changed"]


def fingerprint(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fingerprint_version(family: str) -> str:
    """What computes a stage's fingerprint besides its settings and inputs, e.g. "alg1-code2-tpl3":
    the fingerprint algorithm, the stage family's code version and, for stages that prompt a model,
    the prompt templates' version. A release that changes it for a stage changes that stage's
    fingerprint."""
    version = f"alg{FINGERPRINT_ALGORITHM}-code{STAGE_CODE_VERSIONS[family]}"
    return version + (f"-tpl{TEMPLATE_VERSION}" if family in PROMPTED_FAMILIES else "")


def model_stage(k: int) -> str:
    """The training stage whose model is M_k."""
    return "train-m0" if k == 0 else f"train-m{k}"


EXTERNAL_REWRITE = "rewrite"  # the one stage of an external rewriter (every iteration reads it)


def rewrite_stage(run: BacktranslationRun, k: int) -> str | None:
    """The stage whose rewrites iteration k uses, or None without rewriting."""
    rw = run.spec.curation.rewrite
    if not rw.enabled:
        return None
    return EXTERNAL_REWRITE if rw.external else f"rewrite-{k}"


def stage_sources(run: BacktranslationRun) -> dict[str, tuple[str, ...]]:
    """The data files each stage reads, as written in the spec (the sources of content fingerprints)."""
    spec = run.spec
    sources = {"prepare-seed": (spec.seed.source,), "prepare-corpus": (spec.corpus.source,)}
    if spec.evaluation.enabled:
        sources["evaluate"] = tuple(
            f for s in spec.evaluation.sets for f in (s.source, s.reference_outputs)
            if f and not f.startswith("builtin:"))
    return sources


def build_plan(run: BacktranslationRun, inputs: dict[str, str | None] | None = None) -> Plan:
    """Stages in a valid execution order (every stage after its dependencies).

    `inputs` maps a data source as written in the spec to its identity
    (:func:`humpback_runtime.sources.source_identity`); a stage whose sources all have one is
    fingerprinted by its data too. Without it (the operator) fingerprints come from the spec alone.
    """
    spec = run.spec
    dump = lambda m: m.model_dump(mode="json", by_alias=True)  # noqa: E731
    plan = Plan(run_name=run.name, namespace=run.namespace)
    fps: dict[str, str] = {}
    reads = stage_sources(run)

    def add(name: str, kind: StageKind, family: str, deps: list[str], settings: dict[str, Any], **extra: Any) -> None:
        own: dict[str, Any] = {"stage": family, "code": STAGE_CODE_VERSIONS[family], "settings": settings}
        if family in PROMPTED_FAMILIES:  # a changed template changes what these stages write
            own["templates"] = TEMPLATE_VERSION
        payload = {**own, "inputs": {d: fps[d] for d in deps}}
        sources = reads.get(name, ())
        data = {s: inputs[s] for s in sources if inputs and inputs.get(s)}
        if sources and len(data) == len(set(sources)):
            payload["data"] = data
        else:  # an identity missing: the settings alone, as the operator plans
            data = {}
        fps[name] = fingerprint(payload)
        plan.stages.append(Stage(name, kind, family, tuple(deps), settings, fps[name], sources=sources, data=data,
                                 settings_digest=fingerprint(own), upstream={d: fps[d] for d in deps},
                                 fingerprint_version=fingerprint_version(family), **extra))

    # Operational settings (resources, retries, storage, suspend, inference engine) stay out of
    # fingerprints: they change where and how fast a stage runs, not what it writes.
    # A yield floor decides whether a stage's outputs are accepted, not what they are: it stays out.
    add("prepare-seed", "cpu", "prepare-seed", [], {"seed": _without(dump(spec.seed), "minYield")})
    add("prepare-corpus", "cpu", "prepare-corpus", [], {"corpus": dump(spec.corpus)})

    def train(name: str, role: str, deps: list[str], extra: dict[str, Any], iteration: int | None = None) -> None:
        training = _without(dump(getattr(spec.training, role)), "minYield")
        if training.get("strategy") == "deepspeed":
            del training["strategy"]  # the default (a later field): fingerprints of earlier specs stay the same
        settings = {"baseModel": spec.base_model, "training": training, **extra}
        add(name, "train", "train", deps, settings, role=role, iteration=iteration)

    train("train-myx", "backward", ["prepare-seed"], {})
    train("train-m0", "seed", ["prepare-seed"], {"systemPrompts": dump(spec.system_prompts)})
    add("augment", "inference", "augment", ["train-myx", "prepare-corpus"],
        {"augmentation": _without(dump(spec.augmentation), "minYield")}, serves="train-myx")

    curation = dump(spec.curation)
    curation_settings = {k: v for k, v in curation.items()
                         if k not in ("iterations", "rewrite", *SELECTION_SETTINGS)}
    selection = selection_settings(spec.curation)
    rw = spec.curation.rewrite
    if rw.enabled:
        rewrite_settings = {**curation["rewrite"], "order": rw.resolved_order}
    if rw.enabled and rw.external:
        # An external rewriter does not depend on M(k-1): one stage rewrites every candidate once,
        # for all iterations (order after: curate-k scores the originals, train-mk takes the rewrites).
        add(EXTERNAL_REWRITE, "inference", "rewrite", ["augment"], {"rewrite": rewrite_settings})
    curated_data: dict[int, list[str]] = {}  # per iteration, the stages train-mk takes its curated pairs from
    for k in range(1, spec.curation.iterations + 1):
        scorer = model_stage(k - 1)
        candidates = "augment"
        if rw.enabled and rw.external and rw.resolved_order == "before":
            candidates = EXTERNAL_REWRITE
        elif rw.enabled and rw.resolved_order == "before":  # self-rewriting by M(k-1), then curation
            add(f"rewrite-{k}", "inference", "rewrite", ["augment", scorer], {"rewrite": rewrite_settings},
                iteration=k, serves=scorer)
            candidates = f"rewrite-{k}"
        add(f"curate-{k}", "inference", "curate", [candidates, scorer],
            {"curation": curation_settings}, iteration=k, serves=scorer)
        training_data = [f"curate-{k}"]
        if rw.enabled and rw.resolved_order == "after":
            if not rw.external:  # M(k-1) rewrites the pairs curate-k selected
                add(f"rewrite-{k}", "inference", "rewrite", [f"curate-{k}", scorer],
                    {"rewrite": rewrite_settings, "selection": selection}, iteration=k, serves=scorer)
            training_data.append(rewrite_stage(run, k))
        train(f"train-m{k}", "forward", ["prepare-seed", *training_data],
              {"systemPrompts": dump(spec.system_prompts), "selection": selection}, iteration=k)
        curated_data[k] = training_data

    models = [model_stage(k) for k in range(0, spec.curation.iterations + 1)]
    report_deps = ["prepare-seed", "prepare-corpus", "train-myx", "augment"]
    report_deps += [s.name for s in plan.stages if s.family in ("rewrite", "curate")] + models
    if spec.evaluation.enabled:
        add("evaluate", "inference", "evaluate", models, {"evaluation": dump(spec.evaluation)})
        report_deps.append("evaluate")
    add("report", "cpu", "report", _unique(report_deps), {})
    hub = spec.publish.hub
    if hub is not None:
        published = published_models(run)
        datasets = sorted(curated_data) if "datasets" in hub.artifacts else []
        deps = published + [d for k in datasets for d in curated_data[k]]
        if published and spec.evaluation.enabled:  # the model cards carry the evaluation results
            deps.append("evaluate")
        # The token is operational (who pushes), not what is pushed.
        settings = {"hub": _without(dump(hub), "tokenSecret"), "models": published, "datasets": datasets}
        if datasets:  # the published pairs are those of the current selection (as train-mk's)
            settings["selection"] = selection
        add(PUBLISH, "cpu", "publish", _unique(deps), settings)
    return plan


def published_models(run: BacktranslationRun) -> list[str]:
    """The training stages whose models spec.publish.hub pushes, in plan order."""
    hub = run.spec.publish.hub
    if hub is None:
        return []
    last = model_stage(run.spec.curation.iterations)
    if "models" in hub.artifacts:
        return ["train-myx", *(model_stage(k) for k in range(0, run.spec.curation.iterations + 1))]
    return [last] if "final-model" in hub.artifacts else []


def hub_repo(run: BacktranslationRun, what: str) -> str:
    """The hub repository of a published artifact: PREFIX-myx, PREFIX-m0, PREFIX-m1, ..., PREFIX-curated.

    `what` is a training stage name or "curated"."""
    hub = run.spec.publish.hub
    if hub is None:
        raise ValueError("spec.publish.hub is not set")
    return f"{hub.repo_prefix}-{what.removeprefix('train-')}"


def _without(settings: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def selection_settings(curation: Any) -> dict[str, Any]:
    """The settings that choose the curated pairs among the stored scores (from spec.curation)."""
    selection: dict[str, Any] = {"threshold": curation.threshold, "minYield": curation.min_yield}
    if curation.mode == "logprobs":  # generate mode has one integer score: these do not apply
        selection.update(selectBy=curation.select_by, minDigitMass=curation.min_digit_mass)
    return selection


def selection_id(selection: dict[str, Any]) -> str:
    """A readable folder name for a selection: threshold-5-argmax-mass-0.5 (minYield only guards it)."""
    parts = [f"threshold-{selection['threshold']:g}"]
    if "selectBy" in selection:
        parts += [selection["selectBy"], f"mass-{selection['minDigitMass']:g}"]
    return "-".join(parts)

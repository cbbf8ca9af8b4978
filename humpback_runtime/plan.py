"""The plan: a pure function from a BacktranslationRun spec to the DAG of stages.

The local runner and the operator both execute this plan. Each stage carries a fingerprint, a
hash of its own settings and of its inputs' fingerprints, so a stage whose `_SUCCESS.json` holds
the current fingerprint is done, and a spec edit re-runs only what it changed and what depends on it.
Light on purpose (no torch): the operator imports it.

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
    "prepare-corpus": 1,
    "train": 1,
    "augment": 1,
    "rewrite": 1,
    "curate": 1,
    "evaluate": 1,
    "report": 2,  # 2: verdict, settings, warnings, funnel, selection-score histograms, answers, links
}

PROMPTED_FAMILIES = frozenset({"train", "augment", "rewrite", "curate", "evaluate"})

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


def fingerprint(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_stage(k: int) -> str:
    """The training stage whose model is M_k."""
    return "train-m0" if k == 0 else f"train-m{k}"


def build_plan(run: BacktranslationRun) -> Plan:
    """Stages in a valid execution order (every stage after its dependencies)."""
    spec = run.spec
    dump = lambda m: m.model_dump(mode="json", by_alias=True)  # noqa: E731
    plan = Plan(run_name=run.name, namespace=run.namespace)
    fps: dict[str, str] = {}

    def add(name: str, kind: StageKind, family: str, deps: list[str], settings: dict[str, Any], **extra: Any) -> None:
        payload = {
            "stage": family,
            "code": STAGE_CODE_VERSIONS[family],
            "settings": settings,
            "inputs": {d: fps[d] for d in deps},
        }
        if family in PROMPTED_FAMILIES:  # a changed template changes what these stages write
            payload["templates"] = TEMPLATE_VERSION
        fps[name] = fingerprint(payload)
        plan.stages.append(Stage(name, kind, family, tuple(deps), settings, fps[name], **extra))

    # Operational settings (resources, retries, storage, suspend, inference engine) stay out of
    # fingerprints: they change where and how fast a stage runs, not what it writes.
    add("prepare-seed", "cpu", "prepare-seed", [], {"seed": dump(spec.seed)})
    add("prepare-corpus", "cpu", "prepare-corpus", [], {"corpus": dump(spec.corpus)})

    def train(name: str, role: str, deps: list[str], extra: dict[str, Any], iteration: int | None = None) -> None:
        settings = {"baseModel": spec.base_model, "training": dump(getattr(spec.training, role)), **extra}
        add(name, "train", "train", deps, settings, role=role, iteration=iteration)

    train("train-myx", "backward", ["prepare-seed"], {})
    train("train-m0", "seed", ["prepare-seed"], {"systemPrompts": dump(spec.system_prompts)})
    add("augment", "inference", "augment", ["train-myx", "prepare-corpus"],
        {"augmentation": dump(spec.augmentation)}, serves="train-myx")

    curation = dump(spec.curation)
    curation_settings = {k: v for k, v in curation.items() if k not in ("iterations", "rewrite")}
    for k in range(1, spec.curation.iterations + 1):
        scorer = model_stage(k - 1)
        candidates = "augment"
        if spec.curation.rewrite.enabled:
            rewrite = curation["rewrite"]
            external = spec.curation.rewrite.endpoint is not None
            # An external rewriter does not depend on M(k-1); self-rewriting does.
            add(f"rewrite-{k}", "inference", "rewrite", ["augment"] if external else ["augment", scorer],
                {"rewrite": rewrite}, iteration=k, serves=None if external else scorer)
            candidates = f"rewrite-{k}"
        add(f"curate-{k}", "inference", "curate", [candidates, scorer],
            {"curation": curation_settings}, iteration=k, serves=scorer)
        train(f"train-m{k}", "forward", ["prepare-seed", f"curate-{k}"],
              {"systemPrompts": dump(spec.system_prompts)}, iteration=k)

    models = [model_stage(k) for k in range(0, spec.curation.iterations + 1)]
    report_deps = ["prepare-seed", "prepare-corpus", "train-myx", "augment"]
    report_deps += [s.name for s in plan.stages if s.family in ("rewrite", "curate")] + models
    if spec.evaluation.enabled:
        add("evaluate", "inference", "evaluate", models, {"evaluation": dump(spec.evaluation)})
        report_deps.append("evaluate")
    add("report", "cpu", "report", _unique(report_deps), {})
    return plan


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))

"""publish: push the trained models and the curated datasets to a Hugging Face hub (spec.publish.hub).

    humpback stage publish --spec RUN.yaml        # HF_TOKEN in the environment (or `hf auth login`)

For each repository in turn, its upload folder is written to the store, exactly as it will be pushed,
under ``publish/<OWNER>/<REPO>/`` (inspect it there; ``dryRun: true`` stops there), then pushed:

- a model (PREFIX-myx, PREFIX-m0, PREFIX-m1, ...): the stage's ``model/`` folder (safetensors,
  config, generation config, tokenizer), the tokenizer's chat template set to
  :func:`humpback_runtime.prompts.chat_template` (it renders our prompt format, token for token),
  and the model card of training/card.py rendered again with hub metadata, the evaluate stage's
  results for this model, a usage snippet and the contamination warning;
- the curated data (PREFIX-curated, a dataset repository): per iteration the pairs train-mk
  trains on (the current selection of curate-k, with rewrites where the run takes them), as Parquet
  in config ``iteration_K``, and a dataset card (sources and licences, contamination warning,
  counts, score histograms).

The push goes through ``huggingface_hub`` (one commit per repository) to the hub ``HF_ENDPOINT``
names. Without a token the stage fails and says how to give one. The folders are built one at a
time under ``$HUMPBACK_CACHE`` (the pod's /cache volume; locally the system temp folder): local
disk must hold one model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from humpback_runtime import prompts
from humpback_runtime.context import RunContext
from humpback_runtime.errors import StageError
from humpback_runtime.plan import Stage, hub_repo
from humpback_runtime.publishing import (IterationData, dataset_card, known_source, push_folder, require_hub,
                                         seed_may_be_contaminated)
from humpback_runtime.training.checkpoints import COMPLETE, download_prefix, upload_dir

log = logging.getLogger(__name__)

PARQUET_NAME = "train-00000-of-00001.parquet"


def run_publish(ctx: RunContext, stage: Stage, prefix: str) -> dict[str, Any]:
    hub = ctx.run.spec.publish.hub
    if hub is None:  # the plan has no publish stage then
        raise StageError("spec.publish.hub is not set: nothing to publish")
    token = None
    if not hub.dry_run:
        from humpback_runtime.publishing import hub_token

        token = hub_token()
        if not token:
            raise StageError("spec.publish.hub: no Hugging Face token to push with: set HF_TOKEN (locally, or `hf auth "
                             "login`), or tokenSecret (a Secret with key HF_TOKEN) on a cluster; or set dryRun: true "
                             "to write the upload folders to the store only")
    evaluation = (ctx.manifest("evaluate") or {}).get("evaluation") if "evaluate" in stage.deps else None
    dataset_repo = hub_repo(ctx.run, "curated") if stage.settings["datasets"] else None
    work = []  # (repo id, repo type, how to build its folder)
    for model in stage.settings["models"]:
        work.append((hub_repo(ctx.run, model), "model",
                     lambda repo_id, folder, model=model: _stage_model(ctx, model, repo_id, folder, evaluation,
                                                                        dataset_repo)))
    if dataset_repo:
        work.append((dataset_repo, "dataset", lambda repo_id, folder: _stage_dataset(ctx, stage, repo_id, folder)))
    repos = []
    # One repository at a time, so that local disk holds one model (in a pod: the /cache volume).
    scratch = os.environ.get("HUMPBACK_CACHE") or None
    if scratch:
        os.makedirs(scratch, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="humpback-publish-", dir=scratch) as tmp:
        for repo_id, repo_type, build in work:
            folder = Path(tmp) / repo_id
            build(repo_id, folder)
            key = f"{prefix}/{repo_id}"
            files = upload_dir(ctx.store, folder, key)  # in the store before the push: inspect it there
            entry = {"repo": repo_id, "type": repo_type, "folder": key, "files": files, "pushed": False}
            log.info("Staged %s %s: %d files in %s", repo_type, repo_id, files, ctx.store.url(key))
            if not hub.dry_run:
                entry.update(push_folder(folder, repo_id, repo_type, private=hub.private, token=token,
                                         commit_message=f"humpback: {ctx.run_prefix} (fingerprint {stage.fingerprint})"),
                             pushed=True)
                log.info("Pushed %s %s: %s", repo_type, repo_id, entry["commitUrl"])
            repos.append(entry)
            shutil.rmtree(folder)
    return {"outputs": {"count": len(repos), "repos": repos}, "dryRun": hub.dry_run,
            "counts": {"models": len(stage.settings["models"]), "datasets": 1 if dataset_repo else 0}}


# --- models -----------------------------------------------------------------------------------


def _stage_model(ctx: RunContext, model: str, repo_id: str, folder: Path, evaluation: dict | None,
                 dataset_repo: str | None) -> None:
    """The model's upload folder: its files, a tokenizer with our chat template, the published card."""
    from humpback_runtime.stages.train import lineage
    from humpback_runtime.training import card as cards

    n = download_prefix(ctx.store, f"{ctx.prefix(model)}/model", folder, skip=(COMPLETE, "README.md"))
    if not n:
        raise StageError(f"{model} has no model files under {ctx.store.url(ctx.prefix(model) + '/model')}")
    train = ctx.plan[model]
    role = "backward" if train.role == "backward" else "forward"
    system = prompts.inference_system(ctx.run.spec.system_prompts) if role == "forward" else ""
    _set_chat_template(folder, role, system)

    hf = require_hub()
    EvalResult, ModelCardData = hf.EvalResult, hf.ModelCardData  # noqa: N806

    manifest = ctx.manifest(model) or {}
    metrics = manifest.get("metrics") or {}
    hub = ctx.run.spec.publish.hub
    rows = cards.evaluation_results(evaluation, model) if role == "forward" else []
    data = ModelCardData(
        model_name=repo_id, license=hub.license or "other",
        datasets=[dataset_repo] if dataset_repo and train.iteration else None,
        eval_results=[EvalResult(task_type="text-generation", dataset_type=r["set"], dataset_name=r["set"],
                                 metric_type=r["metric_type"], metric_name=r["metric_name"], metric_value=r["value"])
                      for r in rows] or None,
    )
    sections = [cards.usage_section(repo_id, train.role, system)]
    if role == "forward":
        sections.append(cards.evaluation_section(evaluation, model))
        spec = ctx.run.spec
        if seed_may_be_contaminated(spec.seed.source, spec.seed.format):
            sections.append(cards.contamination_section())
    settings = getattr(ctx.run.spec.training, train.role).for_size(int(metrics.get("examples_in") or 1))
    text = cards.render_model_card(
        base_model=ctx.run.spec.base_model, settings=settings,
        card=lineage(ctx, train, manifest.get("counts") or {}), metrics=_card_metrics(metrics),
        grad_accum=int(metrics.get("gradient_accumulation_steps") or 1), metadata=_without_name(data.to_dict()),
        sections=sections)
    (folder / "README.md").write_text(text, encoding="utf-8")


def _without_name(metadata: dict[str, Any]) -> dict[str, Any]:
    """ModelCardData keeps model_name (only the model-index needs it) as a key of its own: drop it."""
    return {k: v for k, v in metadata.items() if k != "model_name"}


def _card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The training metrics the card reads, with a neutral value for any an older manifest lacks."""
    defaults = {"examples_in": "n/a", "examples": "n/a", "examples_dropped": 0, "examples_truncated": 0,
                "tokens": "n/a", "world_size": 1, "steps": "n/a", "precision": "n/a", "train_loss": [],
                "resumed_from": None}
    return {**defaults, **metrics}


def _set_chat_template(folder: Path, role: str, system: str) -> None:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - only without the extra
        raise StageError("publish needs transformers to write the chat template into the tokenizer: "
                         "pip install 'humpback[train]'") from e
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    bos = tokenizer.bos_token_id
    # Whether encoding text adds BOS: then the template starts with it, so the chat API's tokens
    # (template, no special tokens) equal the completions API's (text with special tokens).
    adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
    tokenizer.chat_template = prompts.chat_template(role, default_system=system, bos=adds_bos)
    tokenizer.save_pretrained(str(folder))


# --- curated data -----------------------------------------------------------------------------


def _stage_dataset(ctx: RunContext, stage: Stage, repo_id: str, folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    DatasetCardData = require_hub().DatasetCardData  # noqa: N806

    from humpback_runtime.stages.curate import selection
    from humpback_runtime.stages.train import curated_pairs

    spec = ctx.run.spec
    schema = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("response", pa.string()),
                        ("score", pa.int64())])
    iterations = []
    for k in stage.settings["datasets"]:
        pairs, counts = curated_pairs(ctx, ctx.plan[f"train-m{k}"])
        config = f"iteration_{k}"
        # As the training examples have them (prompts.py strips surrounding whitespace).
        rows = [{"id": str(p["id"]), "instruction": p["instruction"].strip(), "response": p["response"].strip(),
                 "score": None if p.get("score") is None else int(round(p["score"]))} for p in pairs]
        (folder / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / config / PARQUET_NAME)
        curate = ctx.manifest(f"curate-{k}") or {}
        chosen = selection(ctx, f"curate-{k}", stage.settings["selection"])  # stored: no requests, no writes
        iterations.append(IterationData(
            iteration=k, config=config, selection=counts["selection"], rows=len(rows),
            counts={"candidates": (curate.get("counts") or {}).get("candidates"), "scored": chosen.get("scored"),
                    "unscored": (chosen.get("unscored") or 0) + (chosen.get("belowMinDigitMass") or 0),
                    "selected": chosen.get("selected")},
            histogram=dict((curate.get("scores") or {}).get("histogram") or {}),
            selected_histogram={str(s): n for s, n in Counter(r["score"] for r in rows).items()},
        ))
    sources = []
    for role, stage_name, source in (("seed", "prepare-seed", spec.seed.source),
                                     ("corpus", "prepare-corpus", spec.corpus.source)):
        identities = (ctx.manifest(stage_name) or {}).get("inputIdentities") or {}
        sources.append({"role": role, "source": source, "identity": identities.get(source),
                        "known": known_source(source)})
    total = sum(it.rows for it in iterations)
    metadata = DatasetCardData(
        license=ctx.run.spec.publish.hub.dataset_license or "other",
        language=[spec.seed.lang] if spec.seed.lang else None,
        task_categories=["text-generation"], tags=["humpback", "instruction-backtranslation", "synthetic"],
        size_categories=[_size_category(total)], pretty_name=f"humpback curated pairs ({ctx.run.name})",
        configs=[{"config_name": it.config, "data_files": [{"split": "train", "path": f"{it.config}/*.parquet"}],
                  **({"default": True} if it is iterations[-1] else {})} for it in iterations],
    ).to_dict()
    mode = f"{spec.curation.mode} mode, selection {iterations[-1].selection}" if iterations else spec.curation.mode
    text = dataset_card(repo_id=repo_id, run=ctx.run_prefix, iterations=iterations, sources=sources,
                        base_model=spec.base_model, metadata=metadata,
                        seed_contaminated=seed_may_be_contaminated(spec.seed.source, spec.seed.format), method=mode)
    (folder / "README.md").write_text(text, encoding="utf-8")


def _size_category(n: int) -> str:
    """The hub's size_categories bucket of a dataset with n rows."""
    for limit, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                        (10**7, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"

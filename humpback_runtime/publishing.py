"""What the publish stage pushes to a Hugging Face hub, apart from the model card (training/card.py):
the dataset card of the curated pairs, the licences of well-known sources, and the push itself.

The push goes through ``huggingface_hub`` (``HfApi.create_repo`` then ``upload_folder``, one commit
per repository) to the hub that ``HF_ENDPOINT`` names (Hugging Face's convention; default
https://huggingface.co), with the token ``HF_TOKEN`` holds (or the one ``hf auth login`` stored).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from humpback_runtime.errors import StageError

# Licences of the usual sources, recognised by name in spec.seed.source / spec.corpus.source
# (a hf:// id or a file name). Anything else: "unknown", and the card says to check it.
KNOWN_SOURCES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"oasst|openassistant", re.I), "OpenAssistant/oasst1", "Apache-2.0"),
    (re.compile(r"guanaco", re.I), "timdettmers/openassistant-guanaco (oasst1 train)", "Apache-2.0"),
    (re.compile(r"(^|[^a-z0-9])c4([^a-z0-9]|$)", re.I), "allenai/c4", "ODC-BY 1.0 (and the Common Crawl terms of use)"),
    (re.compile(r"refinedweb", re.I), "tiiuae/falcon-refinedweb", "ODC-BY 1.0 (and the Common Crawl terms of use)"),
    (re.compile(r"dolma", re.I), "allenai/dolma", "ODC-BY 1.0"),
)

# The one known overlap between a usual seed set and a usual benchmark (examples/data/SOURCES.md).
CONTAMINATION_WARNING = (
    "The 188 English root prompts of the oasst1 **validation** split are exactly AlpacaEval's 188 `oasst` "
    "prompts, and AlpacaEval also contains all of Vicuna-80 and Self-Instruct-252. A model whose seed data "
    "came from oasst1 validation must not be evaluated on AlpacaEval (its results would be contaminated); "
    "draw seed data from oasst1 *train*. Web text (c4 and the like) may quote benchmark prompts too."
)

HISTOGRAM_WIDTH = 30  # characters of the longest bar in the card's score histograms


def known_source(source: str) -> tuple[str, str] | None:
    """(dataset, licence) of a well-known source named in `source`, or None."""
    for pattern, name, licence in KNOWN_SOURCES:
        if pattern.search(source):
            return name, licence
    return None


def seed_may_be_contaminated(source: str, fmt: str) -> bool:
    """The seed looks like oasst1, whose validation prompts are AlpacaEval's."""
    return fmt in ("oasst1", "oasst1-trees") or bool(re.search(r"oasst|openassistant", source, re.I))


@dataclass
class IterationData:
    """One iteration's curated pairs as train-mk trained on them, and their funnel."""

    iteration: int
    config: str  # the dataset config name: iteration_K
    selection: str  # the selection id (threshold-5-argmax-mass-0.5)
    rows: int
    counts: dict[str, Any] = field(default_factory=dict)  # candidates, scored, unscored, selected, ...
    histogram: dict[str, int] = field(default_factory=dict)  # score -> candidates, every scored candidate
    selected_histogram: dict[str, int] = field(default_factory=dict)  # score -> published pairs


def _bar_table(histogram: Mapping[str, int], selected: Mapping[str, int]) -> list[str]:
    top = max([*histogram.values(), 1])
    lines = ["| score | scored candidates | published | |", "|---|---|---|---|"]
    for score in ("1", "2", "3", "4", "5"):
        n = int(histogram.get(score, 0))
        bar = "█" * round(HISTOGRAM_WIDTH * n / top)
        lines.append(f"| {score} | {n} | {int(selected.get(score, 0))} | {f'`{bar}`' if bar else ''} |")
    return lines


def dataset_card(*, repo_id: str, run: str, iterations: Sequence[IterationData], sources: Sequence[dict[str, Any]],
                 base_model: str, metadata: Mapping[str, Any], seed_contaminated: bool, method: str) -> str:
    """README.md of the curated dataset repository: YAML ``metadata`` (from DatasetCardData), then
    summary, columns, sources and licences, the contamination warning, counts and score histograms.

    ``sources``: ``[{"role", "source", "identity", "known": (name, licence) | None}]``."""
    import yaml


    total = sum(it.rows for it in iterations)
    lines = [
        "---",
        yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True, width=4096).rstrip("\n"),
        "---",
        "",
        f"# Curated instruction-response pairs of {run}",
        "",
        f"{total} pairs made by instruction backtranslation (Li et al. 2023, \"Self-Alignment with Instruction "
        "Backtranslation\", arXiv:2308.06259) with humpback: a backward model (Myx, fine-tuned from "
        f"`{base_model}` on the seed pairs) wrote an instruction for each web segment, the model of the previous "
        f"iteration rated every pair 1-5 with the paper's rubric ({method}), and the pairs at or above the "
        "threshold were kept. Each config holds the curated pairs one iteration's model (Mk) trained on, beside "
        "the seed pairs; the seed pairs themselves are not in this dataset.",
        "",
        f"Repository: `{repo_id}`. Load one iteration with "
        f"`datasets.load_dataset(\"{repo_id}\", \"{iterations[-1].config if iterations else 'iteration_1'}\")`.",
        "",
        "## Columns",
        "",
        "| column | |",
        "|---|---|",
        "| id | the web segment's id in the corpus (its URL where the corpus has one) |",
        "| instruction | written by the backward model |",
        "| response | the web segment (or its rewrite when the run rewrote the selected pairs) |",
        "| score | the rating that selected the pair (1-5) |",
        "",
        "## Sources and licences",
        "",
        "| role | source | identity | dataset | licence |",
        "|---|---|---|---|---|",
    ]
    for s in sources:
        name, licence = s["known"] or ("unrecognised", "unknown: check the source's terms")
        lines.append(f"| {s['role']} | `{s['source']}` | {s.get('identity') or ''} | {name} | {licence} |")
    lines += [
        f"| instructions | written by a model fine-tuned from `{base_model}` | | | the base model's licence may "
        "restrict how its outputs are used |",
        "",
        f"Licence of this dataset: {metadata.get('license', 'other')} (spec.publish.hub.datasetLicense; it must "
        "respect every row above).",
        "",
        "## Contamination warning",
        "",
        CONTAMINATION_WARNING,
    ]
    if seed_contaminated:
        lines += ["", "**The seed of this run is oasst1 data**: if it came from the validation split, the models "
                      "trained with these pairs must not be evaluated on AlpacaEval."]
    lines += ["", "## Counts", "", "| config | selection | candidates | scored | unscored | selected | published |",
              "|---|---|---|---|---|---|---|"]
    for it in iterations:
        c = it.counts
        lines.append(f"| {it.config} | {it.selection} | {c.get('candidates', '')} | {c.get('scored', '')} | "
                     f"{c.get('unscored', '')} | {c.get('selected', '')} | {it.rows} |")
    lines += ["", "Published can be fewer than selected: with `rewrite.order: after` a selected pair whose "
                  "rewrite was dropped (cut off by maxTokens) is left out, as in training.", "",
              "## Score histograms", ""]
    for it in iterations:
        lines += [f"### {it.config}", "", *_bar_table(it.histogram, it.selected_histogram), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def require_hub() -> Any:
    """The huggingface_hub module, or a StageError that says which extra installs it."""
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - only without the extra
        raise StageError("publish needs huggingface_hub: pip install 'humpback[hub]'") from e
    return huggingface_hub


def hub_token() -> str | None:
    """The token huggingface_hub would use: HF_TOKEN, else the one `hf auth login` stored."""
    return require_hub().get_token()


def push_folder(folder: Path, repo_id: str, repo_type: str, *, private: bool, token: str,
                commit_message: str) -> dict[str, Any]:
    """Create the repository if need be and upload `folder` as one commit; returns
    ``{"url", "commit", "commitUrl"}``. Refuses to push into an existing public repository when
    `private` is asked for (visibility is never changed here)."""
    require_hub()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type=repo_type).private:
            raise StageError(f"spec.publish.hub.private is true but the {repo_type} repository {repo_id} exists and "
                             "is public: make it private on the hub, or set private: false")
        commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                                   commit_message=commit_message)
    except HfHubHTTPError as e:
        raise StageError(f"pushing {repo_type} {repo_id} to {api.endpoint} failed: {e}") from e
    return {"url": str(url), "commit": commit.oid, "commitUrl": commit.commit_url}

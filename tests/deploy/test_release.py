"""The release workflow (.github/workflows/release.yaml), checked statically: it cannot run here (no
Docker engine, no registry). On a version tag it must build and push exactly the three images under
the names the operator and chart default to, and push the chart as an OCI artifact, at one version
that the tag, pyproject.toml and Chart.yaml share."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yaml"
CHART = ROOT / "charts" / "humpback-operator"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(job: dict) -> list[dict]:
    return job["steps"]


def test_the_release_workflow_says_where_it_runs():
    head = WORKFLOW.read_text().split("\nname:", 1)[0]
    assert "no Docker engine" in head and "never run" in head and "test_release.py" in head


def test_it_runs_on_version_tags_with_package_write_only():
    wf = workflow()
    triggers = wf.get("on", wf.get(True))  # PyYAML reads the key `on` as True
    assert triggers["push"]["tags"] == ["v[0-9]+.[0-9]+.[0-9]+"]
    assert wf["permissions"] == {"contents": "read", "packages": "write"}


def test_every_action_is_pinned_and_every_step_named():
    for job in workflow()["jobs"].values():
        assert job["runs-on"] and job["timeout-minutes"] <= 180
        for step in steps(job):
            assert "name" in step and ("uses" in step or "run" in step)
            if "uses" in step:
                _, _, ref = step["uses"].partition("@")
                assert re.fullmatch(r"v\d+(\.\d+){0,2}|[0-9a-f]{40}", ref), step["uses"]


def test_the_version_job_checks_tag_pyproject_and_chart_agree():
    job = workflow()["jobs"]["version"]
    script = next(s["run"] for s in steps(job) if s.get("id") == "check")
    for what in ("GITHUB_REF_NAME#v", "pyproject.toml", "^version:", "^appVersion:", "GITHUB_OUTPUT"):
        assert what in script, what
    assert job["outputs"]["version"] == "${{ steps.check.outputs.version }}"
    # Today they do agree, so a tag v<version> releases.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == project


def test_the_three_images_are_built_from_their_dockerfiles_and_pushed_under_the_default_names():
    from humpback_operator import config

    wf = workflow()
    job = wf["jobs"]["images"]
    assert job["needs"] == "version"
    images = job["strategy"]["matrix"]["image"]
    assert sorted(images) == sorted(p.name for p in (ROOT / "images").iterdir() if (p / "Dockerfile").is_file())
    build = next(s for s in steps(job) if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["file"] == "images/${{ matrix.image }}/Dockerfile" and build["with"]["push"] is True
    tag = build["with"]["tags"].replace("${{ env.IMAGE_PREFIX }}", wf["env"]["IMAGE_PREFIX"])
    version = "${{ needs.version.outputs.version }}"
    for image in images:
        name = tag.replace("${{ matrix.image }}", image)
        assert name.endswith(f":{version}")
        assert name.removesuffix(f":{version}") in {
            config.DEFAULT_RUNTIME_IMAGE.rsplit(":", 1)[0], config.DEFAULT_VLLM_IMAGE.rsplit(":", 1)[0],
            yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]}
    assert any(s.get("uses", "").startswith("docker/login-action@") for s in steps(job))


def test_the_chart_is_pushed_as_an_oci_artifact_after_the_images():
    wf = workflow()
    job = wf["jobs"]["chart"]
    assert set(job["needs"]) == {"version", "images"}
    script = next(s["run"] for s in steps(job) if "helm push" in s.get("run", ""))
    assert 'helm package charts/humpback-operator --version "$VERSION" --app-version "$VERSION"' in script
    assert 'helm push "dist/humpback-operator-$VERSION.tgz" "$CHART_REPOSITORY"' in script
    assert "helm lint --strict" in script and "helm registry login" in script
    assert wf["env"]["CHART_REPOSITORY"].startswith("oci://")

"""`humpback run` and `humpback stage` end to end, as a user runs them: real subprocesses,
the shipped samples, local and S3 storage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def humpback(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "humpback_runtime", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def write_spec(tmp_path, name="tiny-cpu.yaml", **changes):
    """examples/tiny-cpu.yaml with spec changes (dotted keys) and storage in tmp_path."""
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    data["spec"]["storage"]["uri"] = str(tmp_path / "runs")
    data["spec"]["baseModel"] = str(ROOT / "examples" / data["spec"]["baseModel"])
    for part in ("seed", "corpus"):  # the example's paths are relative to examples/; this file lives elsewhere
        data["spec"][part]["source"] = str(ROOT / "examples" / data["spec"][part]["source"])
    for dotted, value in changes.items():
        node = data["spec"]
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stage_dir(tmp_path, stage):
    return tmp_path / "runs" / "default" / "tiny-cpu" / stage


def manifest(tmp_path, stage):
    path = stage_dir(tmp_path, stage) / "_SUCCESS.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_jsonl(paths):
    return [json.loads(line) for p in paths for line in open(p, encoding="utf-8")]


def test_data_stages_run_resume_and_skip(tmp_path):
    spec = write_spec(tmp_path)
    first = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[1/2] prepare-seed: done in" in first.stdout and "[2/2] prepare-corpus: done in" in first.stdout

    seed = manifest(tmp_path, "prepare-seed")
    assert seed["counts"]["pairs"] == 64 and seed["counts"]["dropped_over_cap"] == 186 - 64
    pairs = read_jsonl(sorted(stage_dir(tmp_path, "prepare-seed").glob("part-*.jsonl")))
    assert len(pairs) == seed["outputs"]["count"] == 64
    assert pairs[0]["instruction"] == "What do you think about ChatGPT?"

    corpus = manifest(tmp_path, "prepare-corpus")
    counts = corpus["counts"]
    assert counts["read"] == 200 and counts["kept"] == corpus["outputs"]["count"] > 0
    segments = read_jsonl(sorted(stage_dir(tmp_path, "prepare-corpus").glob("part-*.jsonl")))
    assert all(600 <= len(s["text"]) <= 3000 for s in segments)
    assert len({s["id"] for s in segments}) == len(segments)
    assert segments[0]["id"].startswith("http")  # idField: url

    again = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert again.returncode == 0
    assert "prepare-seed: done (fingerprint" in again.stdout and "prepare-corpus: done (fingerprint" in again.stdout
    assert manifest(tmp_path, "prepare-corpus")["timings"] == corpus["timings"]  # not re-run

    plan = humpback("plan", spec)
    assert plan.returncode == 0
    rows = {line.split()[0]: line for line in plan.stdout.splitlines() if line.strip()}
    assert rows["prepare-seed"].endswith("done") and rows["train-myx"].endswith("missing")


def test_shards_load_with_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    spec = write_spec(tmp_path)
    assert humpback("run", spec, "--until", "prepare-seed").returncode == 0
    files = [str(stage_dir(tmp_path, "prepare-seed") / k.rsplit("/", 1)[1])
             for k in manifest(tmp_path, "prepare-seed")["outputs"]["records"]]
    ds = datasets.load_dataset("json", data_files=files, split="train")
    assert ds.num_rows == 64 and {"id", "instruction", "response"} <= set(ds.column_names)


def test_a_spec_edit_reruns_only_the_changed_stage(tmp_path):
    spec = write_spec(tmp_path)
    assert humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus").returncode == 0
    seed_before = manifest(tmp_path, "prepare-seed")
    kept_before = manifest(tmp_path, "prepare-corpus")["counts"]["kept"]

    edited = write_spec(tmp_path, **{"corpus.minChars": 1500})
    plan = humpback("plan", edited).stdout
    assert "stale" in next(line for line in plan.splitlines() if line.startswith("prepare-corpus"))
    result = humpback("run", edited, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert result.returncode == 0, result.stderr
    assert "prepare-seed: done (fingerprint" in result.stdout and "prepare-corpus: done in" in result.stdout
    assert manifest(tmp_path, "prepare-seed") == seed_before
    after = manifest(tmp_path, "prepare-corpus")
    assert after["counts"]["kept"] < kept_before
    assert after["counts"]["too_short"] > 0


def test_stage_refuses_to_run_before_its_inputs(tmp_path):
    spec = write_spec(tmp_path)
    result = humpback("stage", "train-myx", "--spec", spec)
    assert result.returncode == 4
    assert "needs prepare-seed to have finished" in result.stderr


def test_ctrl_c_mid_stage_then_resume(tmp_path):
    # A corpus big enough that prepare-corpus is still running when we interrupt it.
    big = tmp_path / "big.jsonl"
    lines = (DATA / "c4_sample.jsonl").read_text().splitlines()
    with big.open("w") as f:
        for i in range(40):
            for line in lines:
                rec = json.loads(line)
                rec["text"] += f" Copy {i}."
                f.write(json.dumps(rec) + "\n")
    spec = write_spec(tmp_path, **{"corpus.source": str(big), "corpus.maxDocuments": None})
    proc = subprocess.Popen([sys.executable, "-m", "humpback_runtime", "run", str(spec), "--until", "prepare-seed", "--until", "prepare-corpus"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "prepare-corpus: running" in line:
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    rest, _ = proc.communicate(timeout=60)
    text = "".join(out) + rest
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert manifest(tmp_path, "prepare-seed") is not None
    assert manifest(tmp_path, "prepare-corpus") is None

    resumed = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert resumed.returncode == 0, resumed.stderr
    assert "prepare-seed: done (fingerprint" in resumed.stdout
    assert manifest(tmp_path, "prepare-corpus")["counts"]["read"] == 40_000


def test_bad_lines_are_reported_with_file_and_line_and_counted(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    good = (DATA / "c4_sample.jsonl").read_text().splitlines()[:50]
    corpus.write_bytes(("\n".join(good[:10]) + "\n{broken json\n" + "\n".join(good[10:]) + "\n").encode()
                       + b'{"text": "caf\xe9"}\n' + b'{"url": "no text"}\n')
    spec = write_spec(tmp_path, **{"corpus.source": str(corpus)})
    result = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert result.returncode == 0, result.stderr
    assert f"{corpus}:11" in result.stderr
    m = manifest(tmp_path, "prepare-corpus")
    assert m["badRecords"]["count"] == 2
    assert any(f"{corpus}:11" in e for e in m["badRecords"]["examples"])
    assert any(f"{corpus}:52" in e and "UTF-8" in e for e in m["badRecords"]["examples"])
    assert m["counts"]["missing_text"] == 1
    assert m["counts"]["read"] == 51

    strict = write_spec(tmp_path, "strict.yaml", **{"corpus.source": str(corpus), "corpus.onBadRecord": "fail"})
    failed = humpback("run", strict, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert failed.returncode != 0
    assert f"{corpus}:11: not valid JSON" in failed.stderr


def test_empty_input_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    spec = write_spec(tmp_path, **{"seed.source": str(empty)})
    result = humpback("stage", "prepare-seed", "--spec", spec)
    assert result.returncode == 1
    assert f"prepare-seed produced no pairs from {empty}" in result.stderr
    missing = write_spec(tmp_path, "missing.yaml", **{"seed.source": str(tmp_path / "nope.jsonl")})
    result = humpback("stage", "prepare-seed", "--spec", missing)
    assert result.returncode == 1 and "nope.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_spec_exits_2_naming_the_field(tmp_path):
    spec = write_spec(tmp_path, **{"curation.threshold": 9})
    result = humpback("run", spec)
    assert result.returncode == 2
    assert "spec.curation.threshold: Input should be less than or equal to 5" in result.stderr


def test_run_against_s3(tmp_path, s3_server, s3_bucket):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(DATA / "oasst1_sample.jsonl"), bucket, "inputs/seed/oasst1.jsonl")
    spec = write_spec(tmp_path, **{"seed.source": f"{s3_bucket}/inputs/seed/", "storage.s3.endpoint": s3_server})
    result = humpback("run", spec, "--storage", f"{s3_bucket}/runs", "--until", "prepare-seed", "--until", "prepare-corpus")
    assert result.returncode == 0, result.stdout + result.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert "runs/default/tiny-cpu/prepare-seed/_SUCCESS.json" in keys
    assert "runs/default/tiny-cpu/prepare-corpus/part-00000.jsonl" in keys
    m = json.loads(s3.get_object(Bucket=bucket, Key="runs/default/tiny-cpu/prepare-seed/_SUCCESS.json")["Body"].read())
    assert m["counts"]["pairs"] == 64
    again = humpback("run", spec, "--storage", f"{s3_bucket}/runs", "--until", "prepare-seed", "--until", "prepare-corpus")
    assert again.returncode == 0 and again.stdout.count("done (fingerprint") == 2


def test_unreachable_storage_is_a_clear_error(tmp_path):
    spec = write_spec(tmp_path, **{"storage.s3.endpoint": "http://127.0.0.1:9"})
    result = humpback("stage", "prepare-seed", "--spec", spec, "--storage", "s3://nowhere/runs",
                      env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"},
                      timeout=120)
    assert result.returncode != 0
    assert "s3://nowhere/runs" in result.stderr and "Traceback" not in result.stderr


def test_stage_reads_its_spec_from_s3_as_in_a_pod(tmp_path, s3_server, s3_bucket):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    spec = write_spec(tmp_path, **{"storage.uri": f"{s3_bucket}/runs", "storage.s3.endpoint": s3_server})
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(spec), bucket, "specs/tiny-cpu.yaml")
    # In a pod only the spec URI is known up front; boto3 takes the endpoint from the environment.
    result = humpback("stage", "prepare-seed", "--spec", f"{s3_bucket}/specs/tiny-cpu.yaml",
                      env={"AWS_ENDPOINT_URL_S3": s3_server})
    assert result.returncode == 0, result.stderr
    assert "Finished stage prepare-seed of run tiny-cpu: 64 records" in result.stderr


# --- re-runs that follow the data (issue 10) -------------------------------------------------------

def plan_states(spec, *flags):
    out = humpback("plan", spec, *flags)
    assert out.returncode == 0, out.stderr
    return {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}


def test_until_runs_only_what_that_stage_needs(tmp_path):
    spec = write_spec(tmp_path)
    result = humpback("run", spec, "--until", "prepare-corpus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/1] prepare-corpus: done in" in result.stdout  # not prepare-seed, listed before it
    assert manifest(tmp_path, "prepare-seed") is None
    assert "Summary:" in result.stdout  # the end-of-run table


def test_a_data_edit_reruns_exactly_the_stages_it_feeds(tmp_path):
    corpus = tmp_path / "c4.jsonl"
    corpus.write_bytes((DATA / "c4_sample.jsonl").read_bytes())
    spec = write_spec(tmp_path, **{"corpus.source": str(corpus)})
    assert humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus").returncode == 0
    seed_before, corpus_before = manifest(tmp_path, "prepare-seed"), manifest(tmp_path, "prepare-corpus")
    assert corpus_before["inputIdentities"][str(corpus)].startswith("sha256:")

    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:150]))  # the user edits the data file, the run file stays
    states = plan_states(spec)
    assert states["prepare-corpus"].endswith(f"stale (input changed: {corpus})")
    assert states["prepare-seed"].endswith("done")
    result = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prepare-seed: done (fingerprint" in result.stdout and "prepare-corpus: done in" in result.stdout
    assert manifest(tmp_path, "prepare-seed") == seed_before
    assert manifest(tmp_path, "prepare-corpus")["counts"]["read"] == 150
    assert plan_states(spec)["augment"].endswith("stale (upstream changed: prepare-corpus)") or \
        plan_states(spec)["augment"].endswith("missing")


def test_force_and_from_rerun_stages_that_are_done(tmp_path):
    spec = write_spec(tmp_path)
    assert humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus").returncode == 0
    seed, corpus = manifest(tmp_path, "prepare-seed"), manifest(tmp_path, "prepare-corpus")
    assert plan_states(spec, "--force", "prepare-seed")["prepare-seed"].endswith("stale (forced)")
    assert plan_states(spec, "--force", "prepare-seed")["prepare-corpus"].endswith("done")

    forced = humpback("run", spec, "--until", "prepare-corpus", "--until", "prepare-seed", "--force", "prepare-seed")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "prepare-seed: running (fingerprint" in forced.stdout and "; forced)" in forced.stdout
    assert manifest(tmp_path, "prepare-seed")["timings"] != seed["timings"]
    assert manifest(tmp_path, "prepare-corpus")["timings"] == corpus["timings"]  # not downstream of the seed

    started = humpback("run", spec, "--until", "prepare-corpus", "--from", "prepare-corpus")
    assert started.returncode == 0 and "prepare-corpus: running" in started.stdout
    assert manifest(tmp_path, "prepare-corpus")["timings"] != corpus["timings"]
    assert humpback("run", spec, "--force", "no-such-stage").returncode == 2

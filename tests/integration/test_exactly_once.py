"""Exactly once under failures, as a user meets them: two runners on one store, signals to the
runner, shards cut short or deleted. Real subprocesses of `humpback`, the OpenAI stub answering in
random order, local files and a loopback S3 server (moto)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from humpback_testing.openai_stub import StubServer

from humpback_runtime.context import RunContext
from humpback_runtime.spec import load_run
from humpback_runtime.stages import run_stage
from humpback_runtime.storage import write_success

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
INSTRUCTION = "Describe the xylophone quietly."  # never a substring of a segment: no record is an "echo"


def humpback(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "humpback_runtime", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def start(*args, env=None, **options):
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **options}
    return subprocess.Popen([sys.executable, "-m", "humpback_runtime", *map(str, args)], cwd=ROOT, text=True,
                            env={**os.environ, **(env or {})}, **options)


def write_spec(tmp_path, storage, **changes):
    data = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = data["spec"]
    spec["storage"]["uri"] = storage
    spec["seed"]["source"] = str(DATA / "oasst1_sample.jsonl")
    spec["corpus"]["source"] = str(DATA / "c4_sample.jsonl")
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def augment_ready(tmp_path, storage, stub, *, concurrency=8, s3_endpoint=None, documents=80):
    """A run whose augment can start: corpus prepared (about 40 segments of 80 documents),
    train-myx stood in for (augment asks the stub)."""
    changes = {"inference.engine": "vllm-server", "inference.endpoint": stub.url,
               "inference.concurrency": concurrency, "inference.checkpointEvery": 4, "corpus.maxDocuments": documents}
    if s3_endpoint:
        changes["storage.s3.endpoint"] = s3_endpoint
    spec = write_spec(tmp_path, storage, **changes)
    ctx = RunContext.create(load_run(spec))
    run_stage(ctx, "prepare-corpus")
    for name in ("prepare-seed", "train-myx", "train-m0"):  # manifests as a finished stage leaves them
        write_success(ctx.store, ctx.prefix(name), {"stage": name, "fingerprint": ctx.plan[name].fingerprint})
    return spec, ctx


def ids_of(ctx, stage):
    return [r["id"] for r in ctx.records(stage)]


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def shards(ctx, stage):
    return [k for k in ctx.store.list(ctx.prefix(stage)) if k.rsplit("/", 1)[-1].startswith("part-")]


# --- one writer per stage ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_writers_on_one_stage_the_second_refuses_and_every_id_lands_once(tmp_path, backend, request):
    s3 = request.getfixturevalue("s3_server") if backend == "s3" else None
    storage = f"{request.getfixturevalue('s3_bucket')}/runs" if s3 else str(tmp_path / "runs")
    # Random delays: answers come back out of order; slow ones until the second writer is done,
    # so the two overlap however slowly the second starts.
    with StubServer(text=INSTRUCTION, delay_s=0.5, jitter_s=0.5) as stub:
        spec, ctx = augment_ready(tmp_path, storage, stub, concurrency=2, s3_endpoint=s3)
        first = start("stage", "augment", "--spec", spec)
        wait_for(lambda: shards(ctx, "augment") or first.poll() is not None, what="the first shard")
        second = start("stage", "augment", "--spec", spec)  # the first is still writing
        _, err2 = second.communicate(timeout=120)
        stub.behaviour.delay_s, stub.behaviour.jitter_s = 0.0, 0.05
        _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 5, err2
    assert f"stage augment is being written by {socket.gethostname()} PID {first.pid}" in err2
    assert "expires" in err2 and "--wait" in err2 and "Traceback" not in err2
    segments = ids_of(ctx, "prepare-corpus")
    written = ids_of(ctx, "augment")  # read back against the manifest's checksums
    assert sorted(written) == sorted(segments)  # each segment exactly once
    assert ctx.manifest("augment")["counts"]["segments"] == len(segments)
    assert not ctx.store.exists(f"{ctx.prefix('augment')}/_LEASE.json")  # given back


def test_a_killed_writers_lease_is_taken_over_and_its_work_resumed(tmp_path):
    with StubServer(text=INSTRUCTION, delay_s=0.1, jitter_s=0.1) as stub:
        spec, ctx = augment_ready(tmp_path, str(tmp_path / "runs"), stub, concurrency=2)
        victim = start("stage", "augment", "--spec", spec)
        wait_for(lambda: len(shards(ctx, "augment")) >= 2, what="two shards")
        victim.kill()  # SIGKILL: no cleanup, the lease stays behind
        victim.wait()
        lease = ctx.store.read_json(f"{ctx.prefix('augment')}/_LEASE.json")
        assert lease["holder"]["pid"] == victim.pid and lease["holder"]["host"] == socket.gethostname()
        # The holder is a process of this host that is gone: taken over at once, not after its expiry.
        resumed = humpback("stage", "augment", "--spec", spec)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lease of {socket.gethostname()} PID {victim.pid}" in resumed.stderr
    manifest = ctx.manifest("augment")
    assert manifest["resumed"] is True and manifest["inference"]["skipped_done"] >= 8
    assert sorted(ids_of(ctx, "augment")) == sorted(ids_of(ctx, "prepare-corpus"))


def test_a_live_lease_of_another_host_refuses_and_wait_takes_it_over_at_expiry(tmp_path):
    def forge(seconds):
        expires = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        ctx.store.write_json(f"{ctx.prefix('augment')}/_LEASE.json", {
            "stage": "augment", "holder": {"host": "gpu-node-7", "pid": 4242, "pidns": "1", "id": "x"},
            "started": expires.isoformat(), "heartbeat": expires.isoformat(), "expires": expires.isoformat()})
        return expires

    with StubServer(text=INSTRUCTION) as stub:
        spec, ctx = augment_ready(tmp_path, str(tmp_path / "runs"), stub)
        expires = forge(120)
        refused = humpback("stage", "augment", "--spec", spec)
        assert refused.returncode == 5, refused.stderr
        assert "gpu-node-7 PID 4242" in refused.stderr and f"expires {expires.isoformat()}" in refused.stderr
        assert not shards(ctx, "augment")  # refused before writing anything
        log = tmp_path / "wait.log"
        with open(log, "w") as err_file:
            waiting = start("stage", "augment", "--spec", spec, "--wait", stderr=err_file)
        wait_for(lambda: "Waiting for stage augment" in log.read_text(), what="the second writer to wait")
        time.sleep(1)
        assert waiting.poll() is None and not shards(ctx, "augment")  # still waiting: the lease is live
        forge(1)  # the holder's last heartbeat: it expires in a second, then --wait takes it over
        waiting.communicate(timeout=120)
        err = log.read_text()
    assert waiting.returncode == 0, err
    assert "Waiting for stage augment: its lease is held by gpu-node-7 PID 4242" in err
    assert "took over the lease of gpu-node-7 PID 4242" in err and "expired at" in err
    assert sorted(ids_of(ctx, "augment")) == sorted(ids_of(ctx, "prepare-corpus"))


# --- signals -------------------------------------------------------------------------------------

def stage_pids(spec):
    """PIDs of `humpback stage` processes of this run file (found by their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stage" in cmdline and str(spec).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_runner_leaves_no_stage_process(tmp_path, sig):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    with StubServer(text=INSTRUCTION, delay_s=0.5) as slow:  # the stage alone would take ~10 s
        spec, ctx = augment_ready(tmp_path, str(tmp_path / "runs"), slow, concurrency=2)
        # Output to a file: a pipe would keep the test waiting for an orphaned stage that holds it.
        with open(tmp_path / "runner.log", "w") as log:
            runner = start("run", spec, "--until", "augment", env={"TMPDIR": str(scratch)}, start_new_session=True,
                           stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: shards(ctx, "augment"), what="the stage's first shard")
            (pid,) = stage_pids(spec)
            os.kill(runner.pid, sig)  # the runner alone, as `timeout`, systemd or `kill -9` do
            runner.wait(timeout=60)
            wait_for(lambda: not stage_pids(spec), timeout=6, what=f"stage process {pid} to stop")
        finally:
            if stage_pids(spec):
                os.killpg(runner.pid, signal.SIGKILL)
        port = int(slow.url.rsplit(":", 1)[1].split("/")[0])
    assert runner.returncode == (128 + sig if sig == signal.SIGTERM else -sig)
    assert not ctx.store.exists(f"{ctx.prefix('augment')}/_LEASE.json")  # the stage gave it back
    assert not list(scratch.rglob("humpback-shard-*"))  # no shard files left in TMPDIR
    with StubServer(port=port, text=INSTRUCTION):  # the same endpoint, answering at once
        resumed = humpback("run", spec, "--until", "augment")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ctx.manifest("augment")["resumed"] is True
    assert sorted(ids_of(ctx, "augment")) == sorted(ids_of(ctx, "prepare-corpus"))


# --- verified manifests --------------------------------------------------------------------------

def prepared(tmp_path, storage, s3_endpoint=None):
    changes = {"corpus.maxDocuments": 80, **({"storage.s3.endpoint": s3_endpoint} if s3_endpoint else {})}
    spec = write_spec(tmp_path, storage, **changes)
    ctx = RunContext.create(load_run(spec))
    run_stage(ctx, "prepare-seed")
    run_stage(ctx, "prepare-corpus")
    return spec, ctx


def test_a_shard_cut_at_a_line_boundary_is_found_and_its_producer_runs_again(tmp_path):
    spec, ctx = prepared(tmp_path, str(tmp_path / "runs"))
    (key,) = shards(ctx, "prepare-corpus")
    path = ctx.store.local_path(key)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-10]))  # ten whole records gone: still valid JSONL

    checked = humpback("verify", spec)
    assert checked.returncode == 1
    assert f"{path}: {path.stat().st_size} bytes, the manifest says" in checked.stdout
    assert "prepare-seed" in checked.stdout and "sizes and checksums match" in checked.stdout

    rerun = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "prepare-corpus: outputs do not match the manifest" in rerun.stdout
    assert "prepare-seed: done (fingerprint" in rerun.stdout
    assert humpback("verify", spec).returncode == 0
    assert len(ids_of(ctx, "prepare-corpus")) == len(lines)


def test_a_stage_refuses_a_damaged_input_naming_it_and_withdraws_its_manifest(tmp_path):
    with StubServer(text=INSTRUCTION) as stub:
        spec, ctx = augment_ready(tmp_path, str(tmp_path / "runs"), stub)
        (key,) = shards(ctx, "prepare-corpus")
        path = ctx.store.local_path(key)
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:-10]))
        termination_log = tmp_path / "termination-log"  # what the kubelet reads in a pod
        termination_log.touch()
        result = humpback("stage", "augment", "--spec", spec, env={"HUMPBACK_TERMINATION_LOG": str(termination_log)})
    assert result.returncode == 6  # EXIT_INPUTS_DAMAGED
    assert f"stage augment cannot read the outputs of prepare-corpus: {path}:" in result.stderr
    # The operator reads this (torchrun would turn the exit code into 1) and runs prepare-corpus again.
    assert termination_log.read_text().startswith(f"InputsDamaged: stage augment cannot read the outputs of "
                                                  f"prepare-corpus: {path}:")
    assert ctx.manifest("prepare-corpus") is None  # withdrawn: every executor runs prepare-corpus again
    assert not shards(ctx, "augment")


def test_a_changed_byte_of_the_same_size_is_caught_while_reading(tmp_path):
    with StubServer(text=INSTRUCTION) as stub:
        spec, ctx = augment_ready(tmp_path, str(tmp_path / "runs"), stub)
        (key,) = shards(ctx, "prepare-corpus")
        path = ctx.store.local_path(key)
        data = path.read_bytes()
        at = data.index(b'"text": "') + 9
        path.write_bytes(data[:at] + (b"X" if data[at:at + 1] != b"X" else b"Y") + data[at + 1:])
        result = humpback("stage", "augment", "--spec", spec)
    assert result.returncode == 6  # EXIT_INPUTS_DAMAGED
    assert f"{path}: sha256" in result.stderr and "the manifest of the stage that wrote it says" in result.stderr
    assert ctx.manifest("prepare-corpus") is None


def test_a_deleted_shard_on_s3_does_not_leave_the_run_stuck(tmp_path, s3_server, s3_bucket):
    spec, ctx = prepared(tmp_path, f"{s3_bucket}/runs", s3_server)
    (key,) = shards(ctx, "prepare-seed")
    ctx.store.delete(key)
    checked = humpback("verify", spec)
    assert checked.returncode == 1 and f"{ctx.store.url(key)}: missing" in checked.stdout
    rerun = humpback("run", spec, "--until", "prepare-seed", "--until", "prepare-corpus")  # repairs it: re-runs prepare-seed
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "prepare-seed: outputs do not match the manifest" in rerun.stdout
    assert "prepare-corpus: done (fingerprint" in rerun.stdout
    assert humpback("verify", spec, "--quick").returncode == 0
    assert len(ids_of(ctx, "prepare-seed")) == 64

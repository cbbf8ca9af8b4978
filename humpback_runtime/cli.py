"""The `humpback` command.

    humpback validate RUN.yaml           # OK, or every error with its field path
    humpback plan RUN.yaml [--force STAGE] [--from STAGE] [--spec-only]   # stages, fingerprints, why stale
    humpback run RUN.yaml [--until STAGE] [--force STAGE]... [--from STAGE] [--storage URI] [--wait]
    humpback stage STAGE --spec RUN.yaml [--storage URI] [--force] [--wait]
    humpback verify RUN.yaml [--storage URI] [--quick]   # every stage's objects against its manifest
    humpback tiny-model OUT_DIR          # the demo's random-init base model
    humpback crd [-o FILE]               # the CustomResourceDefinition, generated from the spec models
    humpback render RUN.yaml [-o FILE]   # the Kubernetes objects the operator would create for the run
    humpback status RUN.yaml [--watch] [-o json]             # where a run is: one line per stage
    humpback status --kube NAME [-n NS] [--watch] [-o json]  # the same for a run on a cluster
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from humpback_runtime.errors import EXIT_INVALID, StageError
from humpback_runtime.spec import BacktranslationRun, SpecError, load_run, parse_run


def setup_logging(verbose: bool = False) -> None:
    # One setup per process; under torchrun only rank 0 talks (RANK is set by torchrun / PyTorchJob).
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_third_party()


def quiet_third_party() -> None:
    """Silence chatter that tells a stage's user nothing: matplotlib's INFO lines (categorical
    units, font cache) and the weight-loading and download bars of transformers and the hub
    (our own progress shows what runs). Set before those libraries are imported; a variable the
    user set wins."""
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


SPEC_ENV_PREFIX = "env:"


def _load_spec(ref: str) -> BacktranslationRun:
    """A run file on disk, an object in the artifact store (s3://…), or `env:VAR`: the run's YAML
    in an environment variable, which is how the operator hands it to pods (from a ConfigMap)."""
    if ref.startswith(SPEC_ENV_PREFIX):
        import yaml

        var = ref.removeprefix(SPEC_ENV_PREFIX)
        text = os.environ.get(var)
        if not text:
            raise SpecError(ref, [f"(environment): variable {var} is not set or empty"])
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(ref, [f"(environment): {var} is not valid YAML: {e}"]) from None
        return parse_run(data, ref)
    if "://" in ref and not ref.startswith("file://"):
        import yaml

        from humpback_runtime.storage import open_store

        parent, _, key = ref.rpartition("/")
        text = open_store(parent).read_text(key)
        return parse_run(yaml.safe_load(text), ref)
    return load_run(ref.removeprefix("file://"))


def cmd_validate(args: argparse.Namespace) -> int:
    from humpback_runtime.spec import local_problems

    status = 0
    for path in args.files:
        try:
            run = load_run(path)
            if problems := local_problems(run):
                raise SpecError(str(path), problems)
        except SpecError as e:
            print(e, file=sys.stderr)
            status = EXIT_INVALID
            continue
        print(f"{path}: OK (BacktranslationRun {run.namespace}/{run.name})")
    return status


def forced_stages(plan, force: list[str] | None, start: str | None) -> set[str]:
    """--force STAGE: that stage and every stage that depends on it; --from STAGE: it and all after it."""
    forced: set[str] = set()
    for name in force or []:
        forced.update(plan.downstream(name))
    if start:
        forced.update(plan.after(start))
    return forced


def _check_stage_args(plan, args: argparse.Namespace) -> str | None:
    for flag, names in (("--until", getattr(args, "until", None) or []), ("--force", args.force or []),
                        ("--from", [args.start])):
        for name in names:
            if name is not None and name not in plan:
                return f"{flag}: no stage {name!r} in this run (stages: {', '.join(plan.names())})"
    return None


def cmd_plan(args: argparse.Namespace) -> int:
    from humpback_runtime.context import RunContext

    from humpback_runtime.plan import stale_reasons

    # --offline reads neither the store nor remote inputs: fingerprints from the spec alone then.
    ctx = RunContext.create(_load_spec(args.file), args.storage, identify_inputs=not (args.spec_only or args.offline))
    plan = ctx.plan
    if problem := _check_stage_args(plan, args):
        print(problem, file=sys.stderr)
        return EXIT_INVALID
    forced = forced_stages(plan, args.force, args.start)
    rows = [("STAGE", "KIND", "DEPENDS ON", "FINGERPRINT", "STORE")]
    reruns: set[str] = set()  # a stage whose input stage re-runs re-runs too
    for stage in plan.stages:
        if args.offline:
            state = "-"
        else:
            reasons = stale_reasons(stage, ctx.manifest(stage.name))
            if stage.name in forced:
                reasons = ["forced", *(r for r in reasons if r != "missing")]
            elif not reasons and (redo := [d for d in stage.deps if d in reruns]):
                reasons = [f"upstream re-runs: {', '.join(redo)}"]
            if reasons:
                reruns.add(stage.name)
            state = ("done" if not reasons else "missing" if reasons == ["missing"]
                     else f"stale ({'; '.join(reasons)})")
        rows.append((stage.name, stage.kind, ",".join(stage.deps) or "-", stage.fingerprint, state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not args.offline:
        print(f"\nstore: {ctx.store.url(ctx.run_prefix)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from humpback_runtime.runner import run_local

    from humpback_runtime.plan import build_plan

    run = load_run(args.file)
    plan = build_plan(run)  # the stage names, which do not depend on the data
    if problem := _check_stage_args(plan, args):
        print(problem, file=sys.stderr)
        return EXIT_INVALID
    return run_local(run, args.file, storage_uri=args.storage, until=args.until,
                     force=forced_stages(plan, args.force, args.start), wait=args.wait)


def cmd_stage(args: argparse.Namespace) -> int:
    from humpback_runtime import processes
    from humpback_runtime.context import RunContext
    from humpback_runtime.stages import run_stage

    processes.stop_on_signals()  # SIGTERM / SIGHUP stop the stage cleanly, as Ctrl-C does
    if parent := os.environ.get(processes.PARENT_ENV):
        processes.die_with_parent(int(parent))  # started by `humpback run`: never outlive it
    run = _load_spec(args.spec)
    # A spec from the environment comes from the operator, which plans from the spec alone: the pod
    # must write the fingerprint the operator waits for (see humpback_runtime.context).
    ctx = RunContext.create(run, args.storage, identify_inputs=not args.spec.startswith(SPEC_ENV_PREFIX))
    if args.stage not in ctx.plan:
        print(f"no stage {args.stage!r} in run {run.name} (stages: {', '.join(ctx.plan.names())})", file=sys.stderr)
        return EXIT_INVALID
    try:
        run_stage(ctx, args.stage, force=args.force, wait=args.wait)
    except StageError as e:
        logging.getLogger("humpback").error("Stage %s of run %s failed: %s", args.stage, run.name, e)
        _write_termination_message(f"{type(e).__name__}: {e}")
        return e.exit_code
    return 0


def _write_termination_message(text: str) -> None:
    """Tell Kubernetes why the stage failed (the container's terminated.message), where it listens."""
    from humpback_runtime.pod_contract import TERMINATION_LOG, TERMINATION_LOG_ENV, TERMINATION_MESSAGE_BYTES

    path = Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)
    if not path.exists():  # not in a pod: nothing listens
        return
    try:
        path.write_bytes(text.encode()[:TERMINATION_MESSAGE_BYTES])
    except OSError:
        pass  # a read-only or foreign file: the log line above says it all the same


def cmd_verify(args: argparse.Namespace) -> int:
    from humpback_runtime.context import RunContext
    from humpback_runtime.lease import describe_holder, read_lease
    from humpback_runtime.manifest import verify_outputs

    ctx = RunContext.create(_load_spec(args.file), args.storage)
    damaged = 0
    rows = [("STAGE", "STATE", "DETAIL")]
    for stage in ctx.plan.stages:
        prefix = ctx.prefix(stage.name)
        manifest = ctx.manifest(stage.name)
        lease = read_lease(ctx.store, prefix)
        writing = f"being written by {describe_holder(lease)}" if lease and not lease.get("released") else ""
        if manifest is None:
            rows.append((stage.name, "missing", writing or "-"))
            continue
        state = "done" if manifest.get("fingerprint") == stage.fingerprint else "stale"
        result = verify_outputs(ctx.store, prefix, manifest, checksums=not args.quick)
        if result.problems:
            damaged += 1
            rows += [(stage.name, "DAMAGED", p) for p in result.problems]
        elif not result.verifiable:
            rows.append((stage.name, state, "manifest lists no objects (written before checksums): unverified"))
        else:
            what = "sizes" if args.quick else "sizes and checksums"
            rows.append((stage.name, state, f"{result.checked} objects, {what} match"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}")
    print(f"\nstore: {ctx.store.url(ctx.run_prefix)}")
    if damaged:
        print(f"{damaged} stage(s) damaged: `humpback run` runs them again", file=sys.stderr)
    return 1 if damaged else 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from humpback_runtime.tiny_model import build_tiny_model

    out = build_tiny_model(args.out_dir, force=args.force)
    print(f"tiny model ready in {out}")
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from humpback_runtime.crd import render_crd

    text = render_crd()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote the BacktranslationRun CRD to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    # The operator's pure builders ship in this distribution and need only pydantic and PyYAML.
    from humpback_operator.children import cluster_problems, render_yaml
    from humpback_operator.config import OperatorConfig

    run = load_run(args.file)
    for problem in cluster_problems(run):
        print(f"warning: {problem}", file=sys.stderr)
    try:
        config = OperatorConfig.from_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    text = render_yaml(run, config)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote the objects of run {run.namespace}/{run.name} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from humpback_runtime import status

    if bool(args.file) == bool(args.kube):
        print("humpback status: give a run file (RUN.yaml) or --kube NAME, not both", file=sys.stderr)
        return EXIT_INVALID
    if args.kube:
        reader = status.KubeReader(args.kube, args.namespace, storage_uri=args.storage)
    else:
        from humpback_runtime.context import RunContext

        ctx = RunContext.create(_load_spec(args.file), args.storage)
        reader = lambda: status.local_status(ctx)  # noqa: E731
    while True:
        result = reader()
        text = status.to_json(result) if args.output == "json" else status.render_table(result)
        if args.watch and sys.stdout.isatty() and args.output != "json":
            sys.stdout.write("\x1b[H\x1b[2J")  # clear the terminal between refreshes
        print(text, flush=True)
        if not args.watch or result["phase"] in ("Succeeded", "Failed"):
            return 1 if result["phase"] == "Failed" else 0
        time.sleep(args.watch)


def _add_rerun_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--force", action="append", metavar="STAGE",
                   help="re-run this stage and every stage that depends on it, even if done (repeatable)")
    s.add_argument("--from", dest="start", metavar="STAGE",
                   help="re-run this stage and every stage after it in the plan, even if done")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="humpback", description="Instruction backtranslation (Humpback) pipeline.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate", help="check run files; print OK or every error")
    s.add_argument("files", nargs="+", metavar="RUN.yaml")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("plan", help="print the stage DAG, fingerprints and what the store holds")
    s.add_argument("file", metavar="RUN.yaml")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--offline", action="store_true", help="do not look into the store")
    s.add_argument("--spec-only", action="store_true",
                   help="fingerprint from the spec alone, as the operator does (for a store written on a cluster)")
    _add_rerun_flags(s)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", help="run the pipeline on this machine, resuming finished stages")
    s.add_argument("file", metavar="RUN.yaml")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--until", action="append", metavar="STAGE",
                   help="run only this stage and the stages it needs (repeatable)")
    _add_rerun_flags(s)
    s.add_argument("--wait", action="store_true",
                   help="when another process is writing a stage (holds its lease), wait for it instead of failing")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", help="run one stage (the command the operator puts into pods)")
    s.add_argument("stage", metavar="STAGE")
    s.add_argument("--spec", required=True, metavar="URI", help="run file: a path, an s3:// URI, or env:VAR")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--force", action="store_true", help="run even if already done")
    s.add_argument("--wait", action="store_true",
                   help="when another process is writing the stage (holds its lease), wait for it instead of failing")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("verify", help="check every stage's objects in the store against its manifest")
    s.add_argument("file", metavar="RUN.yaml")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--quick", action="store_true", help="sizes only; do not read the objects for checksums")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("crd", help="print the BacktranslationRun CRD, generated from the spec models")
    s.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    s.set_defaults(func=cmd_crd)

    s = sub.add_parser("render", help="print the Kubernetes objects the operator would create for a run")
    s.add_argument("file", metavar="RUN.yaml")
    s.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("status", help="where a run is: state, attempt, duration, counts, rate and ETA per stage")
    s.add_argument("file", nargs="?", metavar="RUN.yaml", help="a run file: reads its store")
    s.add_argument("--kube", metavar="NAME", help="a BacktranslationRun on the cluster (kubeconfig or in-cluster)")
    s.add_argument("-n", "--namespace", help="namespace of --kube NAME (default: the kubeconfig's)")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until the run succeeds or fails")
    s.add_argument("-o", "--output", choices=["table", "json"], default="table")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("tiny-model", help="build the demo's tiny random-init Llama model and tokenizer")
    s.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    s.add_argument("--force", action="store_true", help="rebuild even if present")
    s.set_defaults(func=cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        from humpback_runtime.processes import exit_code

        print("interrupted", file=sys.stderr)
        return exit_code(130)  # 143 after SIGTERM, 129 after SIGHUP
    except Exception as e:  # a clear one-line error for users; tracebacks with -v
        from humpback_runtime.sources import DataError
        from humpback_runtime.storage import StorageError

        if isinstance(e, (StorageError, DataError)) and not args.verbose:
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

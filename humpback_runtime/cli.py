"""The `humpback` command.

    humpback validate RUN.yaml           # OK, or every error with its field path
    humpback plan RUN.yaml               # stages, dependencies, fingerprints, what the store holds
    humpback run RUN.yaml [--until STAGE] [--storage URI]
    humpback stage STAGE --spec RUN.yaml [--storage URI] [--force]
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
    status = 0
    for path in args.files:
        try:
            run = load_run(path)
        except SpecError as e:
            print(e, file=sys.stderr)
            status = EXIT_INVALID
            continue
        print(f"{path}: OK (BacktranslationRun {run.namespace}/{run.name})")
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from humpback_runtime.context import RunContext

    ctx = RunContext.create(_load_spec(args.file), args.storage)
    plan = ctx.plan
    rows = [("STAGE", "KIND", "DEPENDS ON", "FINGERPRINT", "STORE")]
    for stage in plan.stages:
        if args.offline:
            state = "-"
        else:
            manifest = ctx.manifest(stage.name)
            if manifest is None:
                state = "missing"
            elif manifest.get("fingerprint") == stage.fingerprint:
                state = "done"
            else:
                state = "stale (settings changed)"
        rows.append((stage.name, stage.kind, ",".join(stage.deps) or "-", stage.fingerprint, state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not args.offline:
        print(f"\nstore: {ctx.store.url(ctx.run_prefix)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from humpback_runtime.runner import run_local

    run = load_run(args.file)
    if args.until:
        from humpback_runtime.plan import build_plan

        plan = build_plan(run)
        if args.until not in plan:
            print(f"--until: no stage {args.until!r} in this run (stages: {', '.join(plan.names())})", file=sys.stderr)
            return EXIT_INVALID
    return run_local(run, args.file, storage_uri=args.storage, until=args.until)


def cmd_stage(args: argparse.Namespace) -> int:
    from humpback_runtime.context import RunContext
    from humpback_runtime.stages import run_stage

    run = _load_spec(args.spec)
    ctx = RunContext.create(run, args.storage)
    if args.stage not in ctx.plan:
        print(f"no stage {args.stage!r} in run {run.name} (stages: {', '.join(ctx.plan.names())})", file=sys.stderr)
        return EXIT_INVALID
    try:
        run_stage(ctx, args.stage, force=args.force)
    except StageError as e:
        logging.getLogger("humpback").error("Stage %s of run %s failed: %s", args.stage, run.name, e)
        return e.exit_code
    return 0


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
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("run", help="run the pipeline on this machine, resuming finished stages")
    s.add_argument("file", metavar="RUN.yaml")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--until", metavar="STAGE", help="stop after this stage (and what it needs)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("stage", help="run one stage (the command the operator puts into pods)")
    s.add_argument("stage", metavar="STAGE")
    s.add_argument("--spec", required=True, metavar="URI", help="run file: a path, an s3:// URI, or env:VAR")
    s.add_argument("--storage", metavar="URI", help="override spec.storage.uri")
    s.add_argument("--force", action="store_true", help="run even if already done")
    s.set_defaults(func=cmd_stage)

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
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line error for users; tracebacks with -v
        from humpback_runtime.sources import DataError
        from humpback_runtime.storage import StorageError

        if isinstance(e, (StorageError, DataError)) and not args.verbose:
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

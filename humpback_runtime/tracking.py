"""Experiment trackers (`spec.tracking`): TensorBoard event files in the store, MLflow, Weights & Biases.

Every stage is one tracker run. The stage dispatcher (:func:`humpback_runtime.stages.run_stage`)
opens the stage's trackers around the stage and, once the stage's outputs are written, logs the
numbers of its manifest (counts, yields, records in and out, timings) to each of them, before the
manifest itself is written::

    with tracking.stage_tracking(run, stage, store, prefix) as trackers:
        result = impl.run(ctx, stage, prefix)
        tracked = trackers.finish(result, seconds)  # the manifest's "tracking": where each run went

Training stages add :func:`trainer_callbacks` to the Hugging Face Trainer: its own TensorBoard,
MLflow and W&B integrations, which log each step's loss, learning rate, grad norm and tokens/s
(the Trainer's logs, with tokens/s added by the trainer's throughput callback) into the runs the
stage opened.

- TensorBoard (on by default): event files written locally and copied to ``<stage>/tensorboard/``
  in the store (every minute while training, and at the end): the Trainer's through torch's
  SummaryWriter, a stage's numbers through tensorboard's own event writer (no torch import in a data
  stage). The files are outputs of the stage and listed in its manifest.
- MLflow: one run per stage and fingerprint in the experiment (``NAMESPACE/RUN`` by default), named
  after the stage and tagged ``humpback.run``, ``humpback.stage``, ``humpback.fingerprint``; a retried
  attempt of the same fingerprint continues the same run. Credentials come from the environment
  (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN; on a cluster from ``credentialsSecret``).
- W&B: one run per stage and fingerprint (a deterministic id, resumed by a retried attempt), named
  ``RUN/STAGE`` in group ``NAMESPACE/RUN``; WANDB_API_KEY from the environment. ``mode: offline``
  writes the run folder and copies it to ``<stage>/wandb/`` for ``wandb sync``.

A configured tracker whose package is missing stops the stage at once (the extra to install is
named). A tracker server that cannot be reached or refuses a call costs a warning, never the stage:
the store keeps the results either way, and the manifest's ``tracking`` field says what went where
and what failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from humpback_runtime.errors import StageError
from humpback_runtime.storage import Store

if TYPE_CHECKING:
    from humpback_runtime.plan import Stage
    from humpback_runtime.spec import BacktranslationRun

__all__ = ["StageTrackers", "stage_metrics", "stage_tracking", "trainer_callbacks"]

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under the stage's prefix
WANDB_DIR = "wandb"  # offline W&B run folders, under the stage's prefix
SYNC_EVERY_S = 60.0  # training event files reach the store at least this often
EXTRA = "pip install 'humpback[tracking]'"
# Manifest fields that are not the stage's numbers.
_NOT_METRICS = frozenset({"objects", "fingerprintParts", "inputIdentities", "tracking", "timings"})

_current: StageTrackers | None = None


def stage_metrics(result: Mapping[str, Any], prefix: str = "stage") -> dict[str, float]:
    """The numbers of a stage's manifest fields, flattened: ``{"stage/counts/kept": 50, ...}``.

    Every int or float leaf of nested mappings (lists and booleans are not metrics)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in _NOT_METRICS:
            continue
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(stage_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _require(module: str, field: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StageError(f"{field} is set but the {module} package is not installed: {EXTRA}")


def _upload_dir(store: Store, local: Path, prefix: str) -> int:
    n = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload_file(path, f"{prefix}/{path.relative_to(local).as_posix()}")
        n += 1
    return n


class StageTrackers:
    """The trackers of one stage attempt (rank 0 only): open, hand callbacks to the Trainer, log
    the stage's numbers, close."""

    def __init__(self, run: BacktranslationRun, stage: Stage, store: Store, prefix: str):
        self.run, self.stage, self.store, self.prefix = run, stage, store, prefix
        self.spec = run.spec.tracking
        if self.spec.mlflow is not None:
            _require("mlflow", "spec.tracking.mlflow")
        if self.spec.wandb is not None:
            _require("wandb", "spec.tracking.wandb")
        self.local = Path(tempfile.mkdtemp(prefix="humpback-tracking-"))  # event files and W&B run folders
        self.info: dict[str, Any] = {}
        self.mlflow_run_id: str | None = None
        self.wandb_run: Any = None
        self.tensorboard = self.spec.tensorboard.enabled
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            log.warning("spec.tracking.tensorboard is on but the tensorboard package is not installed (%s): no "
                        "event files for stage %s", EXTRA, stage.name)
            self.info["tensorboard"] = {"error": "the tensorboard package is not installed"}
            self.tensorboard = False

    @property
    def tensorboard_dir(self) -> Path:
        return self.local / TENSORBOARD_DIR

    @property
    def tags(self) -> dict[str, str]:
        return {"humpback.namespace": self.run.namespace, "humpback.run": self.run.name,
                "humpback.stage": self.stage.name, "humpback.fingerprint": self.stage.fingerprint}

    # --- open ---------------------------------------------------------------------------------

    def open(self) -> None:
        if self.spec.mlflow is not None:
            self._guard("mlflow", "start", self._open_mlflow)
        if self.spec.wandb is not None:
            self._guard("wandb", "start", self._open_wandb)

    def _guard(self, tracker: str, what: str, fn: Any, *args: Any) -> Any:
        """Run one tracker call; a failure becomes a warning and the tracker is left out from then on."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker never fails the stage
            log.warning("%s could not %s for stage %s: %s: %s", tracker, what, self.stage.name, type(e).__name__, e)
            self.info.setdefault(tracker, {})["error"] = f"{what}: {type(e).__name__}: {e}"
            if tracker == "mlflow":
                self.mlflow_run_id = None
            elif tracker == "wandb":
                self.wandb_run = None
            elif tracker == "tensorboard":
                self.tensorboard = False
            return None

    def _open_mlflow(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        cfg = self.spec.mlflow
        assert cfg is not None
        uri = cfg.tracking_uri if cfg.remote else _file_store_uri(self.run, cfg.tracking_uri)
        if not cfg.remote:  # MLflow 3 refuses its file store (maintenance mode) unless told; the spec asks for one
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(cfg.experiment or f"{self.run.namespace}/{self.run.name}")
        client = MlflowClient()
        # The same stage and fingerprint: a retried attempt continues its run.
        found = client.search_runs(
            [experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=(f"tags.`humpback.run` = '{self.run.name}' and tags.`humpback.namespace` = "
                           f"'{self.run.namespace}' and tags.`humpback.stage` = '{self.stage.name}' and "
                           f"tags.`humpback.fingerprint` = '{self.stage.fingerprint}'"))
        if found:
            active = mlflow.start_run(run_id=found[0].info.run_id)
        else:
            active = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=self.stage.name, tags=self.tags)
            mlflow.log_params({f"humpback.{k}": str(v)[:500] for k, v in _flat(self.stage.settings).items()})
        self.mlflow_run_id = active.info.run_id
        self.info["mlflow"] = {"trackingUri": uri, "experiment": experiment.name,
                               "experimentId": experiment.experiment_id, "runId": self.mlflow_run_id}

    def _open_wandb(self) -> None:
        import wandb

        cfg = self.spec.wandb
        assert cfg is not None
        run_id = hashlib.sha256("/".join((self.run.namespace, self.run.name, self.stage.name,
                                          self.stage.fingerprint)).encode()).hexdigest()[:32]
        settings = wandb.Settings(base_url=cfg.base_url) if cfg.base_url else None
        self.wandb_run = wandb.init(
            project=cfg.project, entity=cfg.entity, id=run_id, resume="allow", mode=cfg.mode,
            name=f"{self.run.name}/{self.stage.name}", group=f"{self.run.namespace}/{self.run.name}",
            job_type=self.stage.family, dir=str(self.local), tags=[self.stage.name],
            config={"humpback": {**self.tags, "settings": self.stage.settings}}, settings=settings)
        self.info["wandb"] = {"project": cfg.project, "entity": cfg.entity, "runId": run_id, "mode": cfg.mode,
                              **({"url": self.wandb_run.url} if cfg.mode == "online" else {})}

    # --- the Trainer's callbacks --------------------------------------------------------------

    def trainer_callbacks(self) -> list[Any]:
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        callbacks: list[Any] = []
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.tensorboard_dir), filename_suffix=".train")
            callbacks += [_guarded(TensorBoardCallback(tb_writer=writer), "tensorboard", self),
                          _sync_callback(self)]
        # Both attach to the run opened above (an active MLflow run, wandb.run) instead of starting one.
        if self.mlflow_run_id is not None:
            callbacks.append(_guarded(MLflowCallback(), "mlflow", self))
        if self.wandb_run is not None:
            callbacks.append(_guarded(WandbCallback(), "wandb", self))
        return callbacks

    def training_failed(self, tracker: str, error: Exception) -> None:
        """A Trainer integration raised: its curves stop, training and the stage's numbers go on."""
        log.warning("%s stopped logging the training of stage %s: %s: %s", tracker, self.stage.name,
                    type(error).__name__, error)
        self.info.setdefault(tracker, {})["error"] = f"training: {type(error).__name__}: {error}"

    def sync_tensorboard(self) -> None:
        """Copy the event files written so far to ``<stage>/tensorboard/`` (they only grow)."""
        if self.tensorboard and self.tensorboard_dir.is_dir():
            self._guard("tensorboard", "upload event files", _upload_dir, self.store, self.tensorboard_dir,
                        f"{self.prefix}/{TENSORBOARD_DIR}")

    # --- finish -------------------------------------------------------------------------------

    def finish(self, result: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        """Log the finished stage's numbers to every tracker and close them; the manifest's `tracking`."""
        numbers = stage_metrics({**result, "seconds": seconds})
        if self.tensorboard:
            self._guard("tensorboard", "write the stage's numbers", self._finish_tensorboard, numbers)
        if self.mlflow_run_id is not None:
            self._guard("mlflow", "log the stage's numbers", self._finish_mlflow, numbers, "FINISHED")
        if self.wandb_run is not None:
            self._guard("wandb", "log the stage's numbers", self._finish_wandb, numbers, 0)
        self.close()
        return self.info

    def _finish_tensorboard(self, numbers: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        # What SummaryWriter.add_scalar writes (a simple_value per tag), without importing torch.
        writer = EventFileWriter(str(self.tensorboard_dir), filename_suffix=".stage")
        now = time.time()
        for name, value in numbers.items():
            writer.add_event(Event(wall_time=now, step=0, summary=Summary(
                value=[Summary.Value(tag=name, simple_value=value)])))
        writer.close()
        n = _upload_dir(self.store, self.tensorboard_dir, f"{self.prefix}/{TENSORBOARD_DIR}")
        self.info["tensorboard"] = {"uri": self.store.url(f"{self.prefix}/{TENSORBOARD_DIR}"), "files": n}

    def _finish_mlflow(self, numbers: Mapping[str, float], status: str) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        client = MlflowClient()
        # MLflow's metric names: letters, digits and _ - . space : / (as transformers' callback does).
        items = [Metric(re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name), value, now, 0) for name, value in numbers.items()]
        for i in range(0, len(items), 500):  # MLflow takes at most 1,000 metrics per batch
            client.log_batch(self.mlflow_run_id, metrics=items[i:i + 500])
        self._end_mlflow(status)

    def _end_mlflow(self, status: str) -> None:
        import mlflow

        if hasattr(mlflow, "flush_async_logging"):  # the Trainer's callback logs asynchronously
            mlflow.flush_async_logging()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.mlflow_run_id:
            mlflow.end_run(status=status)
        else:  # the Trainer's callback ended it, or another run is active
            from mlflow.tracking import MlflowClient

            MlflowClient().set_terminated(self.mlflow_run_id, status=status)
        self.mlflow_run_id = None

    def _finish_wandb(self, numbers: Mapping[str, float], exit_code: int) -> None:
        run = self.wandb_run
        run.summary.update(dict(numbers))
        self._end_wandb(exit_code)

    def _end_wandb(self, exit_code: int) -> None:
        run, self.wandb_run = self.wandb_run, None
        run.finish(exit_code=exit_code)
        cfg = self.spec.wandb
        if cfg is not None and cfg.mode == "offline":
            folder = Path(run.dir).parent  # .../wandb/offline-run-DATE-ID (its files/ is run.dir)
            n = _upload_dir(self.store, folder, f"{self.prefix}/{WANDB_DIR}/{folder.name}")
            self.info["wandb"]["uri"] = self.store.url(f"{self.prefix}/{WANDB_DIR}/{folder.name}")
            self.info["wandb"]["files"] = n

    def fail(self) -> None:
        """The stage failed: mark the runs failed (training curves so far stay) and close."""
        self.sync_tensorboard()
        if self.mlflow_run_id is not None:
            self._guard("mlflow", "end the run", self._end_mlflow, "FAILED")
        if self.wandb_run is not None:
            self._guard("wandb", "end the run", self._end_wandb, 1)
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


def _file_store_uri(run: BacktranslationRun, uri: str) -> str:
    """file:PATH, file:///PATH or a plain path, relative ones against the run file's folder -> file:///ABS."""
    path = uri.removeprefix("file:")
    if path.startswith("//"):
        path = path[2:]
    return Path(run.local_path(path)).resolve().as_uri()


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _guarded(inner: Any, tracker: str, trackers: StageTrackers) -> Any:
    """`inner` (a Trainer callback) whose first exception is a warning and ends its calls, never the
    training: e.g. MLflow refusing a changed parameter of a resumed run, or a server gone away."""
    from transformers import TrainerCallback

    class Guarded(TrainerCallback):
        def __init__(self) -> None:
            self.inner, self.failed = inner, False

    def event(name: str) -> Any:
        def call(self: Guarded, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.failed:
                return None
            try:
                return getattr(self.inner, name)(args, state, control, **kwargs)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the stage
                self.failed = True
                trackers.training_failed(tracker, e)
                return None
        return call

    for name in dir(TrainerCallback):
        if name.startswith("on_"):
            setattr(Guarded, name, event(name))
    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{type(inner).__name__}"
    return Guarded()


def _sync_callback(trackers: StageTrackers) -> Any:
    from transformers import TrainerCallback

    class TensorBoardToStore(TrainerCallback):
        """Copies the event files to the store every SYNC_EVERY_S and at the end of training (rank 0)."""

        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_log(self, args, state, control, **kwargs):
            if state.is_world_process_zero and time.monotonic() - self.last >= SYNC_EVERY_S:
                trackers.sync_tensorboard()
                self.last = time.monotonic()

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                trackers.sync_tensorboard()

    return TensorBoardToStore()


@contextlib.contextmanager
def stage_tracking(run: BacktranslationRun, stage: Stage, store: Store, prefix: str) -> Iterator[StageTrackers]:
    """The stage's trackers, open for the stage's duration; :func:`trainer_callbacks` finds them."""
    global _current
    trackers = StageTrackers(run, stage, store, prefix)
    trackers.open()
    _current = trackers
    try:
        yield trackers
    except BaseException:
        trackers.fail()
        raise
    finally:
        _current = None
        trackers.close()


def trainer_callbacks() -> list[Any]:
    """Callbacks that log the Trainer's steps to the current stage's trackers ([] outside a stage,
    and on ranks other than 0, which open no trackers)."""
    return _current.trainer_callbacks() if _current is not None else []

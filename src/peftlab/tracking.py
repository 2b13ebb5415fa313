"""Experiment tracking (``training.report_to``): TensorBoard, MLflow and Weights & Biases behind one object.

The training loop calls one :class:`Tracking` with three verbs: :meth:`~Tracking.start` (the run's name,
experiment and the resolved config flattened into parameters), :meth:`~Tracking.log` (a step and its
metrics: ``train/loss`` and ``train/learning_rate`` every ``training.log_every`` steps, ``eval/*`` at each
evaluation, ``final/*`` for the kept weights) and :meth:`~Tracking.finish` (the run directory, logged as
artifacts where the tracker keeps files). Each tracker is one :class:`Tracker` subclass.

A tracker never costs the run: an error inside one is a warning saying what failed, and training goes on
(and the run directory is saved) without that tracker. A tracker whose package is missing is refused with
a :class:`~peftlab.errors.ConfigError` before any work starts.

- TensorBoard: event files in ``RUN_DIR/tensorboard/``.
- MLflow: ``MLFLOW_TRACKING_URI`` when set, else a local file store in ``./mlruns``; the experiment is
  ``MLFLOW_EXPERIMENT_NAME`` or ``peftlab`` (``peftlab compare``: the comparison folder's name).
- W&B: project ``WANDB_PROJECT`` or ``peftlab``, group = the comparison folder's name; offline
  (``WANDB_MODE=offline``, synced later with ``wandb sync``) when no API key is set and ``WANDB_MODE`` is not.

A resumed run continues the tracker runs it started (their ids travel in the checkpoint's loop state).
"""

from __future__ import annotations

import importlib
import json
import netrc
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from peftlab.checkpoint import TrainingInterrupted
from peftlab.config import TRACKERS, RunConfig
from peftlab.errors import ConfigError
from peftlab.progress import note, warn

DEFAULT_EXPERIMENT = "peftlab"  # MLflow's experiment and W&B's project when the environment names none


@dataclass
class RunInfo:
    """What a tracker needs to know about the run it follows."""

    name: str  # the run's name (the output directory's name)
    output_dir: Path  # where the run directory ends up
    files_dir: Path  # where trackers that write files write them (the staging folder: they end in the run directory)
    experiment: str | None = None  # a group of runs (peftlab compare: the comparison folder's name)
    tags: dict[str, str] = field(default_factory=dict)  # method, task
    first_step: int = 0  # a resumed run: the step it continues from
    resume: dict[str, str] = field(default_factory=dict)  # tracker -> its run id in the interrupted run


class Tracker:
    """One tracker: start a run, log metrics at a step, finish with the run directory as artifacts."""

    name = ""  # as in training.report_to
    label = ""  # as users know it
    run_id: str | None = None  # the tracker's own run id (None: it has none)
    where: str | None = None  # where the run went, for the end-of-run summary

    def start(self, run: RunInfo, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, run_dir: Path | None, status: str) -> None:
        """End the run: ``status`` is finished, failed or killed; ``run_dir`` (None when the run failed) holds
        what the run saved."""
        raise NotImplementedError


def _require(module: str, tracker: str, what: str) -> None:
    """An optional dependency, checked when the tracker is chosen: before any work starts."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"training.report_to: {tracker} needs {what}", f"pip install 'peftlab[{tracker}]'") from None


class TensorBoard(Tracker):
    name, label = "tensorboard", "TensorBoard"

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
        except ImportError:
            raise ConfigError("training.report_to: tensorboard needs the tensorboard package",
                              "pip install 'peftlab[tensorboard]'") from None
        self._writer_class, self.writer = SummaryWriter, None

    def start(self, run: RunInfo, params: dict[str, str]) -> None:
        # a resumed run's events restart at its step (purge_step drops what the killed run wrote after it)
        self.writer = self._writer_class(str(run.files_dir / "tensorboard"), purge_step=run.first_step or None)
        self.where = str(run.output_dir / "tensorboard")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, run_dir: Path | None, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_MLFLOW_BATCH = 100  # MLflow takes at most 100 parameters in one log_batch


class MLflow(Tracker):
    name, label = "mlflow", "MLflow"

    def __init__(self) -> None:
        _require("mlflow", "mlflow", "the mlflow package (mlflow-skinny is enough)")
        self.client = None

    @staticmethod
    def tracking_uri() -> str:
        """``MLFLOW_TRACKING_URI``, else the local file store ``./mlruns``."""
        return os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").absolute().as_uri()

    def start(self, run: RunInfo, params: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = self.tracking_uri()
        if urlparse(uri).scheme in {"", "file"} or re.match(r"^[A-Za-z]:[\\/]", uri):
            # MLflow 3 keeps the file store working but refuses it unless asked: peftlab's default is one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        experiment = run.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else _create_experiment(client, experiment)
        previous = run.resume.get(self.name)
        if previous and _mlflow_run_in(client, previous, experiment_id):
            client.update_run(previous, status="RUNNING")
            self.run_id = previous  # its parameters were logged when it started
        else:
            tags = {f"peftlab.{key}": value for key, value in run.tags.items()}
            tags["peftlab.output_dir"] = str(run.output_dir)
            self.run_id = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
            items = [Param(key, value[:6000]) for key, value in params.items()]
            for start in range(0, len(items), _MLFLOW_BATCH):
                client.log_batch(self.run_id, params=items[start:start + _MLFLOW_BATCH])
        self.where = f'run {self.run_id} in experiment "{experiment}" ({uri})'
        _once(f"mlflow {uri} {experiment}", f'MLflow: logging to {uri}, experiment "{experiment}"')

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(key), value, now, step)
                                                    for key, value in metrics.items()])

    def finish(self, run_dir: Path | None, status: str) -> None:
        if self.client is None or self.run_id is None:
            return
        if run_dir is not None:
            self.client.log_artifacts(self.run_id, str(run_dir))
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS[status])
        self.client = None


def _create_experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # made meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _mlflow_run_in(client, run_id: str, experiment_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:
        return False


def _mlflow_key(key: str) -> str:
    """MLflow's metric names: letters, digits, ``_ - . / :`` and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", key)


class WandB(Tracker):
    name, label = "wandb", "W&B"

    def __init__(self) -> None:
        _require("wandb", "wandb", "the wandb package")
        self.run = None

    def start(self, run: RunInfo, params: dict[str, str]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or None
        if mode is None and not wandb_api_key():
            mode = "offline"
            _once("wandb offline", "W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline to "
                                   f"{_wandb_dir()}; upload later with `wandb sync DIR` (or set WANDB_MODE)")
        previous = run.resume.get(self.name)
        self.run = wandb.init(
            # the environment read now: W&B's own settings are read once per process
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT, dir=_wandb_base(),
            group=run.experiment, name=run.name,
            config=params, tags=[f"{key}:{value}" for key, value in run.tags.items()], mode=mode,
            id=previous, resume="allow" if previous else None, reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, show_info=False))
        self.run_id = self.run.id
        self.where = f"run {self.run.id}" + (f" ({Path(self.run.dir).parent})" if mode == "offline" else
                                             f" ({self.run.url})" if getattr(self.run, "url", None) else "")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, run_dir: Path | None, status: str) -> None:
        if self.run is None:
            return
        import wandb

        run, self.run = self.run, None
        try:
            if run_dir is not None:
                artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", run.name or "run") + "-run-dir", type="model")
                for path in sorted(run_dir.rglob("*")):  # file by file: add_dir prints the (staging) folder's name
                    if path.is_file():
                        artifact.add_file(str(path), name=path.relative_to(run_dir).as_posix())
                run.log_artifact(artifact)
        finally:
            run.finish(exit_code=0 if status == "finished" else 1)


def wandb_api_key() -> str | None:
    """A W&B API key from ``WANDB_API_KEY`` or the netrc entry ``wandb login`` writes (None: no key)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return found[2] if found else None


def _wandb_base() -> str:
    """Where W&B makes its ``wandb/`` folder: ``WANDB_DIR``, else the working directory."""
    return os.environ.get("WANDB_DIR") or os.getcwd()


def _wandb_dir() -> str:
    return str(Path(_wandb_base()) / "wandb")


_NOT_METRICS = {"step", "epoch", "samples"}  # an evaluation entry's position and size
_BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
assert set(_BACKENDS) == set(TRACKERS)
_said: set[str] = set()


def _once(key: str, message: str) -> None:
    """A note shown once per process (a comparison starts many runs)."""
    if key not in _said:
        _said.add(key)
        note(message)


class Tracking:
    """The trackers of one run, called as one. Every call is guarded: a tracker that fails is dropped with a
    warning and the run goes on. As a context manager, a run that ends in an exception ends its tracker runs
    as failed (killed on Ctrl-C)."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])
        self.notes: list[str] = []  # where each tracker's run went (for the run's summary)
        self._done = False

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def ids(self) -> dict[str, str]:
        """tracker -> its run id, for resuming (TrainingState.trackers)."""
        return {t.name: t.run_id for t in self.trackers if t.run_id}

    def start(self, run: RunInfo, params: dict[str, str]) -> None:
        for tracker in list(self.trackers):
            if self._guarded(tracker, "start", lambda: tracker.start(run, params)) and tracker.where:
                self.notes.append(f"{tracker.label}: {tracker.where}")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            for tracker in list(self.trackers):
                self._guarded(tracker, "log", lambda: tracker.log(step, numbers))

    def evaluation(self, entry: dict[str, Any]) -> None:
        """An evaluation entry ({step, epoch, metric: value}) as ``eval/*`` metrics at its step."""
        self.log(entry["step"], {f"eval/{k}": v for k, v in entry.items() if k not in _NOT_METRICS})

    def finish(self, run_dir: Path, step: int | None = None, metrics: dict[str, Any] | None = None) -> None:
        """The kept weights' metrics as ``final/*`` at ``step``, then each tracker ends with ``run_dir``."""
        if metrics and step is not None:
            self.log(step, {f"final/{k}": v for k, v in metrics.items() if k not in _NOT_METRICS})
        self._end(run_dir, "finished")

    def abort(self, status: str = "failed") -> None:
        self._end(None, status)

    def _end(self, run_dir: Path | None, status: str) -> None:
        if self._done:
            return
        self._done = True
        for tracker in list(self.trackers):
            self._guarded(tracker, "finish", lambda: tracker.finish(run_dir, status), ending=True)

    def _guarded(self, tracker: Tracker, what: str, call, ending: bool = False) -> bool:
        try:
            call()
            return True
        except Exception as error:  # noqa: BLE001 - a tracker must never cost the run
            self.trackers.remove(tracker)
            warn(f"{tracker.label} tracking failed ({what}: {type(error).__name__}: {_short(error)}); "
                 + ("the run itself is not affected" if ending else
                    "training goes on without it and the run directory is saved as usual"))
            if not ending:
                try:  # end what it had started, quietly
                    tracker.finish(None, "failed")
                except Exception:  # noqa: BLE001
                    pass
            return False

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            interrupted = issubclass(kind, (KeyboardInterrupt, TrainingInterrupted))
            self.abort("killed" if interrupted else "failed")


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def trackers(names: list[str]) -> Tracking:
    """The trackers ``training.report_to`` names, in a fixed order (TensorBoard's files are closed before
    MLflow and W&B copy the run directory). A missing package is a ConfigError here, before any work."""
    return Tracking([_BACKENDS[name]() for name in TRACKERS if name in names])


def params(config: RunConfig) -> dict[str, str]:
    """The resolved config flattened to ``section.key`` -> text (numbers and lists as JSON)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value, default=str)

    walk("", config.to_dict())
    return flat

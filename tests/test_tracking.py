"""Experiment tracking (training.report_to): what each tracker holds is read back, not just that code ran.

MLflow runs for real (a local file store under the test's folder) and is read back through its client API;
W&B runs for real in offline mode and its run file is read back record by record (its protobuf records);
TensorBoard's event files are read back with tensorboard's own reader.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab import build_config, cli, compare, train, tracking
from peftlab.checkpoint import directory_for
from peftlab.errors import ConfigError

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def raw(tiny_models, keyword_data, tmp_path) -> dict:
    return {
        "model": {"name": str(tiny_models["bert"])}, "task": "seq-cls",
        "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                 "max_length": 32, "max_train_samples": 96, "max_eval_samples": 16},
        "training": {"max_steps": 6, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": 0,
                     "eval_strategy": "steps", "eval_steps": 3, "log_every": 2},
        "output_dir": str(tmp_path / "runs" / "tracked"),
    }


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A clean environment for the trackers: the working directory is the test's folder (MLflow's default
    ./mlruns lands there), no tracker settings or keys from the machine."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT",
                 "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` key
    monkeypatch.setattr(tracking, "_said", set())
    return tmp_path / "mlruns"


def client(store: Path):
    return mlflow.MlflowClient(tracking_uri=store.as_uri())


def only_run(store: Path, experiment: str):
    found = client(store).get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client(store).search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_files(store: Path, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client(store).list_artifacts(run_id, path):
        found |= artifact_files(store, run_id, item.path) if item.is_dir else {item.path}
    return found


# --- the config ---------------------------------------------------------------------------------------

def test_report_to_in_the_config_and_the_older_tensorboard_flag(raw):
    assert build_config(raw).training.report_to == []
    for given, expected in [(["mlflow"], ["mlflow"]), ("mlflow", ["mlflow"]), ("wandb, mlflow", ["wandb", "mlflow"]),
                            (["mlflow", "mlflow"], ["mlflow"]), ("none", []), (None, [])]:
        assert build_config(raw, [f"training.report_to={json.dumps(given)}"]).training.report_to == expected, given
    # the older form: tensorboard: true adds tensorboard; false (what every saved run of before holds) is nothing
    assert build_config(raw, ["training.tensorboard=true"]).training.report_to == ["tensorboard"]
    assert build_config(raw, ["training.tensorboard=true", "training.report_to=[mlflow]"]).training.report_to == \
        ["mlflow", "tensorboard"]
    assert build_config(raw, ["training.tensorboard=false"]).training.report_to == []
    assert "tensorboard" not in build_config(raw).to_dict()["training"]
    with pytest.raises(ConfigError, match=r"training.report_to.0.*one of 'tensorboard', 'mlflow' or 'wandb'"):
        build_config(raw, ["training.report_to=[mlflw]"])
    with pytest.raises(ConfigError, match="must be true or false"):
        build_config(raw, ["training.tensorboard=yes please"])


def test_params_are_the_resolved_config_flattened(raw):
    config = build_config(raw, ["method.options.r=4"])
    params = tracking.params(config)
    assert params["training.learning_rate"] == "0.05" and params["method.name"] == "lora"
    assert params["method.options.r"] == "4" and params["training.report_to"] == "[]"
    assert params["data.train_file"] == raw["data"]["train_file"] and params["model.revision"] == "null"
    assert all(isinstance(v, str) for v in params.values())


# --- MLflow and TensorBoard, for real -------------------------------------------------------------------

def test_mlflow_and_tensorboard_hold_the_run(raw, store, capsys):
    raw["training"]["report_to"] = ["tensorboard", "mlflow"]
    config = build_config(raw)
    result = train(config, evaluate_before=True)
    out = result.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert store.is_dir(), "MLflow's default store is ./mlruns"
    assert "MLflow: logging to" in capsys.readouterr().err

    run = only_run(store, "peftlab")
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.tags["peftlab.method"] == "lora" and run.data.tags["peftlab.output_dir"] == str(out)
    assert run.data.params == tracking.params(build_config(yaml.safe_load((out / "peftlab.yaml").read_text())))
    assert any(note.startswith(f"MLflow: run {run.info.run_id}") for note in result.notes)

    loss = client(store).get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == \
        [(e["step"], pytest.approx(e["loss"])) for e in metrics["losses"]] and [e["step"] for e in metrics["losses"]] \
        == [2, 4, 6]
    rates = client(store).get_metric_history(run.info.run_id, "train/learning_rate")
    assert sorted(m.step for m in rates) == [2, 4, 6]
    accuracy = sorted(client(store).get_metric_history(run.info.run_id, "eval/accuracy"), key=lambda m: m.step)
    expected = [(0, metrics["initial"]["accuracy"])] + [(e["step"], e["accuracy"]) for e in metrics["history"]]
    assert [(m.step, m.value) for m in accuracy] == [(s, pytest.approx(v)) for s, v in expected]
    assert run.data.metrics["final/accuracy"] == pytest.approx(metrics["accuracy"])

    files = artifact_files(store, run.info.run_id)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png", "peftlab.yaml",
            "metrics.json"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    copy = Path(client(store).download_artifacts(run.info.run_id, "adapter_model.safetensors", str(store.parent)))
    assert copy.read_bytes() == (out / "adapter_model.safetensors").read_bytes()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
        [(e["step"], e["loss"]) for e in metrics["losses"]]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 3, 6]


def test_the_experiment_comes_from_the_environment(raw, store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sentiment")
    train(build_config(raw, ["training.report_to=mlflow"]))
    assert not store.exists()
    assert only_run(tmp_path / "elsewhere", "sentiment").info.status == "FINISHED"


def test_a_failing_tracker_does_not_lose_the_run(raw, store, monkeypatch, capsys):
    def fail(self, step, metrics):
        raise RuntimeError("tracking server went away")

    monkeypatch.setattr(tracking.MLflow, "log", fail)
    result = train(build_config(raw, ["training.report_to=[tensorboard,mlflow]"]))
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    err = " ".join(capsys.readouterr().err.split())
    assert "MLflow tracking failed (log: RuntimeError: tracking server went away); training goes on without it" in err
    assert only_run(store, "peftlab").info.status == "FAILED"  # the tracker's run says it is incomplete
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*")), "the other tracker went on"

    monkeypatch.undo()
    monkeypatch.chdir(store.parent)
    monkeypatch.setattr(tracking.MLflow, "finish", lambda self, run_dir, status: 1 / 0)
    result = train(build_config(raw, ["training.report_to=mlflow"]), overwrite=True)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert "MLflow tracking failed (finish: ZeroDivisionError" in capsys.readouterr().err


def test_a_failed_run_ends_its_tracker_run_as_failed(raw, store):
    class Crash(Exception):
        pass

    def crash(kind, data):
        if kind == "step" and data["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        train(build_config(raw, ["training.report_to=mlflow", "training.checkpoint_every=2"]), on_event=crash)
    assert only_run(store, "peftlab").info.status == "FAILED"


def test_a_resumed_run_continues_its_mlflow_run(raw, store):
    class Crash(Exception):
        pass

    def crash(kind, data):
        if kind == "step" and data["step"] == 5:
            raise Crash

    config = build_config(raw, ["training.report_to=mlflow", "training.checkpoint_every=2"])
    with pytest.raises(Crash):
        train(config, on_event=crash)
    first = only_run(store, "peftlab")
    assert first.info.status == "FAILED" and directory_for(config).is_dir()
    result = train(config, resume=True)
    run = only_run(store, "peftlab")  # still one run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client(store).get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [2, 4, 6]  # 2 and 4 before the crash, 6 after resuming from the checkpoint of step 4
    assert "adapter_model.safetensors" in artifact_files(store, run.info.run_id)
    assert result.losses[-1]["step"] == 6


# --- missing packages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_a_config_error_before_any_work(raw, store, monkeypatch, capsys, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=f"needs the {package} package") as error:
        train(build_config(raw, [f"training.report_to={package}"]))
    assert error.value.hint == f"pip install 'peftlab[{package}]'"
    assert not Path(raw["output_dir"]).exists()

    recipe = store.parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**raw, "training": {**raw["training"], "report_to": [package]}}))
    monkeypatch.setattr(sys, "argv", ["peftlab", "train", str(recipe)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"needs the {package} package" in err and f"pip install 'peftlab[{package}]'" in err


# --- W&B, for real, offline ------------------------------------------------------------------------------

def wandb_records(run_dir: Path, timeout: float = 30.0) -> list:
    """The records of an offline W&B run file, once complete (its `exit` record: W&B's service process may
    still be writing it when finish() returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_file(next(run_dir.glob("run-*.wandb")))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _wandb_file(path: Path) -> list:
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full / first
            pending = chunk
        else:  # middle / last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(records) -> tuple:
    """(the run record, history rows as {key: value}, the names of the files logged as artifacts)."""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    return run, history, artifacts


def test_wandb_offline_without_a_key(raw, store, tmp_path, capsys):
    pytest.importorskip("wandb")
    result = train(build_config(raw, ["training.report_to=wandb"]))
    err = " ".join(capsys.readouterr().err.split())
    assert "W&B: no API key (WANDB_API_KEY or `wandb login`): logging offline" in err and "wandb sync" in err
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run, history, artifacts = wandb_run(wandb_records(offline[0]))
    assert run.project == "peftlab" and run.display_name == "tracked" and not run.run_group
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training.learning_rate"] == "0.05" and config["method.name"] == "lora"
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    losses = [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert losses == [(e["step"], pytest.approx(e["loss"])) for e in metrics["losses"]]
    assert [row["_step"] for row in history if "eval/accuracy" in row] == [3, 6]
    assert len(artifacts) == 1 and artifacts[0].type == "model"
    files = {entry.path for entry in artifacts[0].manifest.contents}
    assert {"adapter_model.safetensors", "README.md", "adapter_config.json"} <= files
    assert any(note.startswith("W&B: run ") for note in result.notes)


# --- peftlab compare: one experiment ---------------------------------------------------------------------

def test_compare_groups_its_runs_as_one_experiment(raw, store, tmp_path):
    pytest.importorskip("wandb")
    raw["training"].update(max_steps=2, eval_strategy="no", report_to=["mlflow", "wandb"])
    del raw["training"]["eval_steps"]
    result = compare(build_config(raw), methods=["lora", "ia3"], out_dir=tmp_path / "sst-compare", progress=False)
    assert not result.failed
    found = client(store).get_experiment_by_name("sst-compare")
    runs = client(store).search_runs([found.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ia3-seed0", "lora-seed0"]
    assert {r.data.params["method.name"] for r in runs} == {"lora", "ia3"}
    assert all("adapter_model.safetensors" in artifact_files(store, r.info.run_id) for r in runs)
    groups = {wandb_run(wandb_records(d))[0].run_group for d in (tmp_path / "wandb").glob("offline-run-*")}
    assert groups == {"sst-compare"} and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2

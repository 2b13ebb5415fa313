"""Run directories: one typed record (one writer, one reader), and one way of attaching an adapter.

The record round-trips and stays byte-compatible with what earlier versions wrote (unknown keys
kept, missing optional keys read as None); load_adapter, merge, combine and the serving registry
all put adapters on their base through ``adapters.attach``, so a misfit is refused alike by all.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab.adapters
import peftlab.serving.registry
from peftlab import artifacts, build_config, combine, load_adapter, merge, train
from peftlab.errors import AdapterError
from peftlab.rundir import RUN_CONFIG, RUN_RECORD, RunRecord, read_run
from peftlab.serving.registry import Registry

FULL = RunRecord(
    task="seq-cls", method="lora", meta={"regression": False, "labels": ["neg", "pos"], "label_kind": "index"},
    main_metric="accuracy", trainable_params=1234, total_params=56789, train_seconds=1.5, steps=8,
    kept={"which": "best", "step": 8, "epoch": 1}, max_length=32, precision="no", fast_path={"packing": False},
    num_processes=1, notes=["a note"], base={"model_type": "bert", "hidden_size": 32, "vocab_size": 1000},
    versions={"peftlab": "0.0.0"}, created="2025-01-01T00:00:00+00:00", adapter_bytes=4096,
    combined_from=["/a", "/b"], weights=[0.7, 0.3], combination="cat", extra={"from_a_newer_peftlab": {"x": 1}})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models) -> Path:
    """A folder with a valid peftlab.yaml (the record is written by each test)."""
    folder = tmp_path_factory.mktemp("record")
    config = build_config({"model": {"name": str(tiny_models["bert"])}, "task": "seq-cls", "method": {"name": "lora"},
                           "data": {"train_file": "train.csv"}, "output_dir": str(folder)})
    config.save(folder / RUN_CONFIG)
    return folder


def test_the_record_round_trips(run_dir):
    artifacts.write_record(run_dir, FULL)
    config, record = read_run(run_dir)
    assert record == FULL
    assert config.task == "seq-cls" and config.method.name == "lora"
    written = json.loads((run_dir / RUN_RECORD).read_text())
    assert list(written)[:3] == ["task", "method", "meta"] and list(written)[-1] == "from_a_newer_peftlab"
    assert "extra" not in written


def test_an_old_record_reads_and_is_written_back_unchanged(run_dir):
    """A record from an earlier peftlab: some keys missing, one this version does not know, in the old order."""
    old = {"task": "seq-cls", "method": "lora", "meta": {"labels": ["neg", "pos"]}, "trainable_params": 10,
           "total_params": 100, "train_seconds": 2.0, "steps": 4, "notes": [], "base": {"model_type": "bert"},
           "versions": {"peftlab": "0.1"}, "adapter_bytes": 12, "something_old": [1, 2]}
    text = json.dumps(old, indent=2) + "\n"
    (run_dir / RUN_RECORD).write_text(text)
    _, record = read_run(run_dir)
    assert record.max_length is None and record.fast_path is None and record.precision is None
    assert record.meta == {"labels": ["neg", "pos"]} and record.extra == {"something_old": [1, 2]}
    artifacts.write_record(run_dir, record)
    assert (run_dir / RUN_RECORD).read_text() == text


def test_a_plain_adapter_has_an_empty_record_and_a_broken_one_is_refused(run_dir, tmp_path):
    assert read_run(tmp_path) == (None, RunRecord())
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run_dir / RUN_CONFIG, broken / RUN_CONFIG)
    with pytest.raises(AdapterError, match="is unreadable") as error:  # peftlab.json missing
        read_run(broken)
    assert "load it as a plain peft adapter" in error.value.hint
    (broken / RUN_RECORD).write_text('{"task": "se')
    with pytest.raises(AdapterError, match="is unreadable"):
        read_run(broken)
    (broken / RUN_RECORD).write_text('{"task": "seq-cls"}')
    with pytest.raises(AdapterError, match="task's meta"):
        read_run(broken)


# --- trained runs -----------------------------------------------------------------------------

def _lm_run(tiny_lms, generative_data, out: Path, seed: int) -> Path:
    raw = {
        "model": {"name": str(tiny_lms["llama"])}, "task": "causal-lm", "method": {"name": "lora"},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "max_length": 32, "max_train_samples": 32, "max_eval_samples": 4, "target_max_length": 4,
                 "target_column": "target", "prompt_template": "review : {text} label :"},
        "training": {"max_steps": 2, "batch_size": 16, "learning_rate": 5e-2, "progress": False, "seed": seed,
                     "eval_strategy": "no", "keep": "last"},
        "output_dir": str(out),
    }
    return train(build_config(raw)).output_dir


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, tiny_lms, generative_data) -> list[Path]:
    root = tmp_path_factory.mktemp("lm-runs")
    return [_lm_run(tiny_lms, generative_data, root / f"run{seed}", seed) for seed in (1, 2)]


def test_a_trained_run_writes_the_record_it_reads(lm_runs):
    text = (lm_runs[0] / RUN_RECORD).read_text()
    config, record = read_run(lm_runs[0])
    assert record.task == "causal-lm" and record.method == "lora" and record.steps == 2
    assert record.max_length == 32 and record.base["model_type"] == "llama" and record.adapter_bytes > 0
    assert record.extra == {}, "train writes a key RunRecord does not know"
    assert json.dumps(record.to_dict(), indent=2, default=str) + "\n" == text
    assert load_adapter(lm_runs[0]).record == record


@pytest.fixture
def attach_calls(monkeypatch) -> list[str]:
    """Every call of adapters.attach, by the module that made it."""
    calls: list[str] = []
    real = peftlab.adapters.attach

    def spy(model, source, adapter_name="default"):
        calls.append(adapter_name)
        return real(model, source, adapter_name)

    for module in (peftlab.adapters, importlib.import_module("peftlab.merge"), peftlab.serving.registry):
        monkeypatch.setattr(module, "attach", spy)
    return calls


def test_load_adapter_merge_combine_and_the_server_attach_through_one_function(lm_runs, tiny_lms, tmp_path,
                                                                              attach_calls):
    load_adapter(lm_runs[0])
    assert attach_calls == ["default"]
    merge(lm_runs[0], tmp_path / "merged")
    assert attach_calls == ["default"] * 2
    out = combine(lm_runs, tmp_path / "combined", combination="cat")
    assert attach_calls == ["default"] * 3 + ["adapter_1"]
    combined = json.loads((out / RUN_RECORD).read_text())
    assert combined["combination"] == "cat" and combined["weights"] == [0.5, 0.5]
    assert list(combined)[-4:] == ["adapter_bytes", "combined_from", "weights", "combination"]
    registry = Registry(str(tiny_lms["llama"]), "causal-lm")
    registry.add("one", lm_runs[0])
    registry.add("two", lm_runs[1])  # beside the first, in its group
    assert attach_calls[-2:] == ["one", "two"]
    assert sorted(registry.groups[0].model.peft_config) == ["one", "two"]


def _without_a_tensor(run: Path, out: Path) -> Path:
    """The run with one LoRA tensor missing from its adapter file: peft loads it, the check must refuse it."""
    shutil.copytree(run, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    dropped = sorted(tensors)[-1]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out


def test_a_misfit_adapter_is_refused_alike_by_every_caller(lm_runs, tiny_lms, tmp_path):
    bad = _without_a_tensor(lm_runs[1], tmp_path / "bad")
    expected = r"does not fit the base model .*the adapter file lacks"
    with pytest.raises(AdapterError, match=expected):
        load_adapter(bad)
    with pytest.raises(AdapterError, match=expected):
        merge(bad, tmp_path / "merged")
    with pytest.raises(AdapterError, match=expected):  # the second adapter: attached beside the first
        combine([lm_runs[0], bad], tmp_path / "combined")
    registry = Registry(str(tiny_lms["llama"]), "causal-lm")
    registry.add("good", lm_runs[0])
    with pytest.raises(AdapterError, match=expected):
        registry.add("bad", bad)
    model = registry.groups[0].model
    assert list(model.peft_config) == ["good"] and model.active_adapter == "good"  # left as it was
    assert not (tmp_path / "merged").exists() and not (tmp_path / "combined").exists()


def test_attach_on_a_peft_model_keeps_the_active_adapter(lm_runs):
    loaded = load_adapter(lm_runs[0])
    before = {k: v.clone() for k, v in loaded.model.state_dict().items() if "lora" in k}
    source = peftlab.adapters.read_adapter(lm_runs[1])
    model = peftlab.adapters.attach(loaded.model, source, "other")
    assert model is loaded.model and model.active_adapter == "default"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert dataclasses.asdict(source.record)["meta"] == source.meta

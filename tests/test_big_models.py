"""Big bases: disk-offloaded inference equals in-memory inference; bad placements and
quantization on a CPU-only machine get their clear errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import pytest
import torch

from peftlab import build_config, evaluate, load_adapter, predict, train
from peftlab.errors import ConfigError

PROMPTS = ["alpha great bravo", "delta awful echo", "golf great", "kilo lima awful mike"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _layer_bytes(model_dir) -> int:
    """Bytes of the largest decoder layer of the tiny llama (the budget must hold one)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers)


@pytest.fixture(scope="module")
def lm_run(tiny_lms, generative_data, tmp_path_factory):
    """A LoRA causal-LM adapter on a private copy of the tiny llama (so its checkpoint can be watched)."""
    root = tmp_path_factory.mktemp("big")
    base = shutil.copytree(tiny_lms["llama"], root / "base")
    config = build_config({
        "model": {"name": str(base)}, "task": "causal-lm", "method": {"name": "lora"},
        "data": {"train_file": str(generative_data["train"]), "validation_file": str(generative_data["validation"]),
                 "target_column": "target", "max_length": 32, "target_max_length": 4,
                 "prompt_template": "review : {text} label :", "max_eval_samples": 16},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "progress": False, "seed": 0},
        "output_dir": str(root / "run"),
    })
    train(config)
    return {"run": root / "run", "base": base, "budget": f"{int(_layer_bytes(base) * 1.5)}B"}


def _logits(loaded):
    batch = loaded.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


def test_disk_offloaded_generation_equals_in_memory(lm_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written outside the offload folder would show up here
    weights = lm_run["base"] / "model.safetensors"
    before = _digest(weights)
    options = {"max_memory": {"cpu": lm_run["budget"]}, "offload_folder": str(tmp_path / "offload")}

    in_memory = load_adapter(lm_run["run"])
    offloaded = load_adapter(lm_run["run"], model_options=options)
    assert offloaded.placement and "disk" in offloaded.placement  # layers really went to disk
    assert in_memory.placement is None
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())
    torch.testing.assert_close(_logits(offloaded), _logits(in_memory))
    # the adapter is on: its logits differ from the bare base's
    with in_memory.model.disable_adapter():
        assert not torch.allclose(_logits(in_memory), _logits(offloaded))

    generation = {"max_new_tokens": 8}
    expected = predict(in_memory, texts=PROMPTS, generation=generation)
    assert predict(offloaded, texts=PROMPTS, generation=generation) == expected
    assert predict(lm_run["run"], texts=PROMPTS, generation=generation, model_options=options) == expected
    assert evaluate(lm_run["run"], model_options=options) == evaluate(lm_run["run"])

    # peft's rewrite of offloaded weights stays in the offload folder; the base checkpoint is untouched
    assert _digest(weights) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload"]


def test_offloaded_classification_equals_in_memory(make_config, tmp_path):
    result = train(make_config("bert", "lora", **{"training.epochs": 2}))
    texts = ["alpha great bravo", "delta awful echo charlie"]
    options = {"device_map": "sequential", "max_memory": {"cpu": "80KB"}, "offload_folder": str(tmp_path / "off")}
    offloaded = load_adapter(result.output_dir, model_options=options)
    assert "disk" in (offloaded.placement or "")
    assert predict(offloaded, texts=texts) == predict(result.output_dir, texts=texts)


def test_budget_smaller_than_one_layer_is_refused(lm_run, tmp_path):
    with pytest.raises(ConfigError, match="cannot hold even one layer.*model.layers.0") as error:
        load_adapter(lm_run["run"], model_options={"max_memory": {"cpu": "2KB"}, "offload_folder": str(tmp_path)})
    assert "raise the budget" in error.value.hint


def test_disk_offload_without_a_folder_is_refused(lm_run):
    with pytest.raises(ConfigError, match="some layers must go to disk") as error:
        load_adapter(lm_run["run"], model_options={"max_memory": {"cpu": lm_run["budget"]}})
    assert "--offload-folder" in error.value.hint


def test_unwritable_offload_folder_is_refused(lm_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="offload folder .* is not writable"):
        load_adapter(lm_run["run"], model_options={"max_memory": {"cpu": lm_run["budget"]},
                                                   "offload_folder": str(blocker / "offload")})


@pytest.mark.parametrize("budget, message", [
    ({"cpu": "lots"}, 'cpu="lots" is not an amount of memory'),
    ({"gpu": "1GB"}, 'unknown device "gpu"'),
    ({"0": "1GB"}, "names GPU 0, but this machine has no CUDA GPU"),
])
def test_bad_budgets_are_named(lm_run, budget, message):
    if torch.cuda.is_available() and "GPU 0" in message:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        load_adapter(lm_run["run"], model_options={"max_memory": budget})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_quantization_without_a_gpu_is_a_clear_error(lm_run, make_config):
    for bits in ("4bit", "8bit"):
        with pytest.raises(ConfigError, match=f"{bits} quantization .* needs a CUDA GPU"):
            load_adapter(lm_run["run"], model_options={"quantization": bits})
    with pytest.raises(ConfigError, match="4bit quantization .* needs a CUDA GPU"):
        train(make_config("bert", "lora", **{"model.quantization": "4bit"}))


def test_training_refuses_device_maps(make_config):
    with pytest.raises(ConfigError, match="training keeps the base on the training device") as error:
        train(make_config("bert", "lora", **{"model.device_map": "auto"}))
    assert "quantization: 4bit" in error.value.hint


@pytest.mark.slow  # end to end in subprocesses: CI runs it; the everyday loop (-m "not slow ...") does not
def test_cli_reports_where_layers_went_and_quantization_errors(lm_run, tmp_path):
    cli = [sys.executable, "-m", "peftlab", "predict", str(lm_run["run"]), "--text", PROMPTS[0],
           "--format", "jsonl"]
    done = subprocess.run([*cli, "--max-memory", f"cpu={lm_run['budget']}", "--offload-folder",
                           str(tmp_path / "off")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "base model layers:" in done.stderr and "disk " in done.stderr
    plain = subprocess.run(cli, capture_output=True, text=True)
    assert done.stdout == plain.stdout

    if not torch.cuda.is_available():
        failed = subprocess.run([*cli, "--quantize", "4bit"], capture_output=True, text=True)
        assert failed.returncode == 2
        assert "needs a CUDA GPU" in failed.stderr and "Traceback" not in failed.stderr
    bad = subprocess.run([*cli, "--max-memory", "cpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not DEVICE=AMOUNT" in bad.stderr


def test_upstream_offload_rewrite_is_still_broken(lm_run, tmp_path, monkeypatch):
    """peft itself, without compat.redirect_offloaded_weights, rewrites a disk-offloaded base's own checkpoint.

    If this starts failing, peft no longer touches the base's files and the workaround can go.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir = shutil.copytree(lm_run["base"], tmp_path / "base")
    weights = base_dir / "model.safetensors"
    before = _digest(weights)
    monkeypatch.chdir(tmp_path)
    layers = AutoConfig.from_pretrained(base_dir).num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i == 0 else "cpu" for i in range(layers)}}
    # a base named by a relative path, as `--base models/x` does: peft's rewrite lands on the base's own file
    base = AutoModelForCausalLM.from_pretrained("base", device_map=device_map, offload_folder="offload")
    # what a peft user writes to attach an adapter to an offloaded base (peft re-dispatches the wrapped model)
    PeftModel.from_pretrained(base, lm_run["run"], offload_folder="offload",
                              device_map={f"base_model.model.{k}": v for k, v in device_map.items()})
    assert _digest(weights) != before  # the base checkpoint was overwritten (renamed keys)

    # peftlab's load of the same relative base, through compat.redirect_offloaded_weights, leaves it intact
    fresh = shutil.copytree(lm_run["base"], tmp_path / "fresh")
    loaded = load_adapter(lm_run["run"], base="fresh",
                          model_options={"max_memory": {"cpu": lm_run["budget"]}, "offload_folder": "offload2"})
    assert "disk" in loaded.placement
    assert _digest(fresh / "model.safetensors") == before

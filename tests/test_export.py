"""GGUF export (docs/export.md): refusals before any work, and, with llama.cpp, a real SmolLM2 LoRA end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from peft import PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peftlab import PeftlabError, build_config, cli, export, train
from peftlab.errors import ConfigError

PROMPTS = ["A joy from start to finish, with a wonderful cast.", "Dull, overlong and badly acted.",
           "The plot makes no sense but the songs are great.", "I have never been so bored in a cinema."]


def tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, arch, method="lora", name="run"):
    task = "seq-cls" if arch in tiny_models else ("seq2seq" if arch == "t5" else "causal-lm")
    data = keyword_data if task == "seq-cls" else generative_data
    raw = {
        "model": {"name": str(tiny_models.get(arch) or tiny_lms[arch])}, "task": task, "method": {"name": method},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]), "max_length": 32,
                 "max_train_samples": 16, "max_eval_samples": 4, "target_max_length": 4},
        "training": {"max_steps": 1, "batch_size": 8, "learning_rate": 1e-2, "progress": False,
                     "eval_strategy": "no", "keep": "last"},
        "output_dir": str(tmp_path / name),
    }
    if task != "seq-cls":
        raw["data"]["target_column"] = "target"
    if task == "causal-lm":
        raw["data"]["prompt_template"] = "review : {text} label :"
    return train(build_config(raw)).output_dir


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", "export", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


@pytest.mark.parametrize("arch, family", [("bert", "seq-cls"), ("t5", "seq2seq")])
def test_classification_and_seq2seq_runs_are_refused(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path,
                                                     monkeypatch, capsys, arch, family):
    monkeypatch.setenv("PEFTLAB_LLAMA_CPP", str(tmp_path))  # never reached: the refusal comes first
    run = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, arch)
    with pytest.raises(PeftlabError, match=f"a {family} run .*not supported by GGUF runtimes"):
        export(run, tmp_path / "out")
    code, err = run_cli(monkeypatch, capsys, run, "--format", "gguf", "-o", tmp_path / "out")
    assert code == 2 and "not supported by GGUF runtimes" in err and family in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_prompt_learning_adapter_is_refused(tiny_lms, tmp_path, monkeypatch, capsys):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lms["llama"]))
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        str(tmp_path / "prompt"))
    code, err = run_cli(monkeypatch, capsys, tmp_path / "prompt", "-o", tmp_path / "out")
    assert code == 2 and "prompt learning" in err and "not supported by GGUF runtimes" in err
    assert not (tmp_path / "out").exists()


def test_lora_variant_needs_plain_lora_and_options_are_checked(tiny_models, tiny_lms, keyword_data, generative_data,
                                                               tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTLAB_LLAMA_CPP", raising=False)
    run = tiny_run(tiny_models, tiny_lms, keyword_data, generative_data, tmp_path, "llama", method="ia3")
    with pytest.raises(PeftlabError, match="plain LoRA only"):
        export(run, tmp_path / "out", variant="lora")
    with pytest.raises(ConfigError, match="unknown export format"):
        export(run, tmp_path / "out", fmt="onnx")
    with pytest.raises(ConfigError, match="unknown --outtype"):
        export(run, tmp_path / "out", outtype="q4_k_m")
    # a mergeable causal-lm adapter passes every check; without llama.cpp's sources: where to get them
    with pytest.raises(ConfigError, match="converters .* were not found") as info:
        export(run, tmp_path / "out")
    assert "pip download --no-deps --no-binary :all: llama-cpp-python" in info.value.hint
    monkeypatch.setenv("PEFTLAB_LLAMA_CPP", str(tmp_path))
    with pytest.raises(ConfigError, match="holds no convert_hf_to_gguf.py"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- end to end: SmolLM2 + a LoRA -> GGUF -> llama.cpp, against peftlab predict -----------------------

def _llama_cpp_sources() -> Path | None:
    folder = os.environ.get("PEFTLAB_LLAMA_CPP")
    return Path(folder) if folder else None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install 'peftlab[gguf-export]'; it compiles "
                           "llama.cpp, several minutes)")
@pytest.mark.skipif(_llama_cpp_sources() is None,
                    reason="PEFTLAB_LLAMA_CPP is not set: llama.cpp's converters ship in its sources only "
                           "(docs/export.md)")
def test_smollm2_lora_exported_to_gguf_generates_what_predict_generates(tmp_path):
    from llama_cpp import Llama

    from peftlab import load_config, predict

    config = load_config("recipe:lora-smollm2-rotten-tomatoes",
                         ["training.max_steps=10", "training.learning_rate=3e-3", "data.max_eval_samples=16",
                          "training.progress=false", f"output_dir={tmp_path / 'run'}"])
    run = train(config).output_dir
    expected = [r["generated"] for r in predict(run, texts=PROMPTS, generation={"max_new_tokens": 12})]
    prompts = [r["text"] for r in predict(run, texts=PROMPTS, generation={"max_new_tokens": 1})]

    result = export(run, tmp_path / "gguf", outtype="f32", variant="both")
    assert set(result.files) == {"run-f32.gguf", "base-f32.gguf", "run-lora-f32.gguf"}
    record = json.loads((tmp_path / "gguf" / "peftlab-export.json").read_text())
    assert record["files"] == result.files and record["method"] == "lora"
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "FROM ./run-f32.gguf" in modelfile and 'TEMPLATE """Review: {{ .Prompt }}\nSentiment:"""' in modelfile
    assert "ADAPTER ./run-lora-f32.gguf" in (tmp_path / "gguf" / "Modelfile.lora").read_text()

    def generate(**kwargs) -> list[str]:
        llm = Llama(n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)
        return [llm.create_completion(p, max_tokens=12, temperature=0.0)["choices"][0]["text"].strip()
                for p in prompts]

    merged = generate(model_path=str(tmp_path / "gguf" / "run-f32.gguf"))
    adapter = generate(model_path=str(tmp_path / "gguf" / "base-f32.gguf"),
                       lora_path=str(tmp_path / "gguf" / "run-lora-f32.gguf"))
    assert merged == [e.strip() for e in expected]
    assert adapter == [e.strip() for e in expected]

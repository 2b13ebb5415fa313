"""Exporting a causal-LM run to GGUF, the format llama.cpp and Ollama load.

``export`` uses llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``), run in a
subprocess; peftlab writes no GGUF itself. They are not in any wheel: they ship in llama.cpp's sources (a git
checkout, or ``vendor/llama.cpp`` of ``llama-cpp-python``'s source distribution), found through ``llama_cpp=``
(``--llama-cpp``) or the ``PEFTLAB_LLAMA_CPP`` environment variable.

What it writes (docs/export.md), into a new folder, atomically:

* ``merged``: the adapter folded into its base (:func:`peftlab.merge.merge`, in a temporary folder), converted
  to one ``NAME-OUTTYPE.gguf``, with an Ollama ``Modelfile``;
* ``lora``: the LoRA as a GGUF LoRA adapter (no merge) plus the base model as GGUF, with ``Modelfile.lora``
  (``FROM`` the base, ``ADAPTER`` the LoRA); plain LoRA only (llama.cpp has no DoRA / IA3 / ... adapters).

Only decoder-only language models run in GGUF runtimes: classification and encoder-decoder runs, and
prompt-learning adapters (virtual tokens, which cannot be merged into weights), are refused before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from transformers import AutoTokenizer

from peftlab.adapters import read_adapter
from peftlab.errors import AdapterError, ConfigError, PeftlabError
from peftlab.merge import merge
from peftlab.methods import METHODS, spec_for_peft_type
from peftlab.offline_models import resolve_model_name
from peftlab.rundir import (ADAPTER_CONFIG, EXPORT_RECORD, MERGE_RECORD, check_output_dir, is_full_run,
                            library_versions, read_run, staging_dir, write_json)
from peftlab.tasks import get_task

FORMATS = ("gguf",)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what both converters write (llama-quantize makes the smaller ones)
VARIANTS = ("merged", "lora", "both")
LLAMA_CPP_ENV = "PEFTLAB_LLAMA_CPP"
CONVERT_MODEL = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
INSTALL_HINT = ("get llama.cpp's sources: `pip download --no-deps --no-binary :all: llama-cpp-python` and unpack "
                "it (the converters are in llama_cpp_python-*/vendor/llama.cpp), or `git clone "
                "https://github.com/ggml-org/llama.cpp`; then pass --llama-cpp DIR or set PEFTLAB_LLAMA_CPP=DIR "
                "(the converters need torch, transformers, numpy, sentencepiece: installed with peftlab)")
_CAUSAL_LM = "CAUSAL_LM"  # peft's task type of decoder-only generation
_CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                    '<|im_start|>assistant\n')


@dataclass
class ExportResult:
    output_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    modelfiles: list[str] = field(default_factory=list)


# --- llama.cpp's converters ------------------------------------------------------------------

def find_converters(llama_cpp: str | Path | None = None) -> Path:
    """The llama.cpp source folder holding the converters (and their ``conversion/`` and ``gguf-py/``)."""
    candidates: list[tuple[str, Path]] = []
    if llama_cpp:
        candidates.append(("--llama-cpp", Path(llama_cpp)))
    elif os.environ.get(LLAMA_CPP_ENV):
        candidates.append((LLAMA_CPP_ENV, Path(os.environ[LLAMA_CPP_ENV])))
    for source, folder in candidates:
        for root in (folder, folder / "vendor" / "llama.cpp"):  # llama.cpp, or an unpacked llama-cpp-python sdist
            if (root / CONVERT_MODEL).is_file() and (root / CONVERT_LORA).is_file():
                return root.resolve()
        raise ConfigError(f"{folder} ({source}) holds no {CONVERT_MODEL} / {CONVERT_LORA}", INSTALL_HINT)
    raise ConfigError(f"llama.cpp's GGUF converters ({CONVERT_MODEL}) were not found: they ship in llama.cpp's "
                      "sources, not in the llama-cpp-python wheel", INSTALL_HINT)


def _convert(script: Path, args: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-3:]
        raise PeftlabError(f"llama.cpp's {script.name} could not convert {what}: " + " | ".join(tail),
                           "see llama.cpp's supported architectures; nothing was written")


# --- what can be exported --------------------------------------------------------------------

def _refuse(run_dir: Path, what: str, why: str) -> PeftlabError:
    return AdapterError(f"{run_dir} is {what}: not supported by GGUF runtimes ({why}); nothing was written",
                        "export a causal-lm run trained with a mergeable technique (LoRA, IA3, ...), or serve this "
                        "one with peftlab serve / predict")


def _check_task(run_dir: Path, task: Any) -> None:
    if task.peft_task_type == _CAUSAL_LM:
        return
    auto = getattr(task.auto_class, "__name__", str(task.auto_class))
    if task.classifies:
        why = "a classifier whose trained head scores labels; GGUF runtimes generate text and have no place for it"
    else:
        why = ("an encoder-decoder model; llama.cpp and Ollama are built for decoder-only models, llama.cpp "
               "converts only a few encoder-decoder families such as T5")
    raise _refuse(run_dir, f"a {task.name} run ({auto})", why)


def _plain_model_task(run_dir: Path) -> None:
    """A full fine-tuning run or a merged model: its task from peftlab's records."""
    config, record = read_run(run_dir)
    name = config.task if config is not None else None
    if name is None and (run_dir / MERGE_RECORD).is_file():
        name = json.loads((run_dir / MERGE_RECORD).read_text()).get("task")
    if name is None:
        raise AdapterError(f"{run_dir} is neither a peftlab run nor a merged model (no {ADAPTER_CONFIG}, "
                           f"peftlab.yaml or {MERGE_RECORD})", "export a run directory or a peftlab merge output")
    _check_task(run_dir, get_task(name))


def _base_folder(name: str, revision: str | None) -> Path:
    """The base model as a local folder (llama.cpp's converters read files, not Hub ids)."""
    local = Path(resolve_model_name(name))
    if local.is_dir():
        return local
    return Path(snapshot_download(str(local), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))


# --- the Modelfile ---------------------------------------------------------------------------

def _template(config: Any, chat_template: str | None) -> tuple[str | None, str]:
    """The Ollama TEMPLATE (Go template syntax) and a comment on where it came from."""
    data = getattr(config, "data", None)
    prompt = getattr(data, "prompt_template", None) if data is not None else None
    if prompt and not getattr(data, "messages_column", None):
        fields = set(re.findall(r"{(\w+)}", prompt))
        if len(fields) == 1:  # the run's prompt around the user's text, as peftlab predict renders it
            body = prompt.replace("{" + fields.pop() + "}", "{{ .Prompt }}").replace("{{{{", "{{")
            return body, f"the run's prompt_template {prompt!r} (it was trained on completions)"
        return "{{ .Prompt }}", (f"the run's prompt_template {prompt!r} has several fields: send prompts already "
                                 "rendered")
    if chat_template and "<|im_start|>" in chat_template:
        return _CHATML_TEMPLATE, "the tokenizer's chat template (ChatML)"
    if chat_template:
        return None, ("the tokenizer's chat template is stored in the GGUF (tokenizer.chat_template); Ollama "
                      "reads it from there")
    return "{{ .Prompt }}", "no chat template: raw completion"


def _modelfile(source: Path, gguf: str, template: tuple[str | None, str], eos: str | None,
               adapter: str | None = None) -> str:
    body, origin = template
    lines = [f"# Ollama Modelfile written by peftlab export from {source}",
             f"#   ollama create NAME -f {'Modelfile.lora' if adapter else 'Modelfile'}  (in this folder)",
             f"FROM ./{gguf}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f"# TEMPLATE: {origin}")
    if body is not None:
        lines.append(f'TEMPLATE """{body}"""')
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def _tokenizer_info(folder: Path) -> tuple[str | None, str | None]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None, None
    return getattr(tokenizer, "chat_template", None), tokenizer.eos_token


# --- export ----------------------------------------------------------------------------------

def export(run_dir: str | Path, out_dir: str | Path | None = None, *, fmt: str = "gguf", outtype: str = "f16",
           variant: str = "merged", base: str | None = None, llama_cpp: str | Path | None = None,
           overwrite: bool = False) -> ExportResult:
    """Convert a causal-LM run (or a merged model / full fine-tuning run) to GGUF with llama.cpp's converters.

    ``variant``: ``merged`` (one model file), ``lora`` (the base model + a GGUF LoRA adapter) or ``both``.
    Output: ``out_dir`` (default: ``RUN-gguf`` beside the run), with an Ollama ``Modelfile`` per variant.
    """
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ConfigError(f'unknown export format "{fmt}"', f"known: {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise ConfigError(f'unknown --outtype "{outtype}" for GGUF', f"known: {', '.join(OUTTYPES)} (llama.cpp's "
                          "llama-quantize makes smaller ones from an f16 file)")
    if variant not in VARIANTS:
        raise ConfigError(f'unknown --variant "{variant}"', f"known: {', '.join(VARIANTS)}")
    if not run_dir.is_dir():
        raise AdapterError(f"run directory not found: {run_dir}")
    out = Path(out_dir) if out_dir is not None else run_dir.parent / f"{run_dir.name}-gguf"
    check_output_dir(out, overwrite)

    plain = is_full_run(run_dir) or not (run_dir / ADAPTER_CONFIG).is_file()
    if plain:  # already a whole transformers model: convert it as it is
        _plain_model_task(run_dir)
        if variant != "merged":
            raise AdapterError(f"{run_dir} holds a whole model, not an adapter: there is no LoRA to export",
                               "use --variant merged")
        source = None
        config, record = read_run(run_dir)
        method = record.method or "full"
    else:
        source = read_adapter(run_dir, base=base)
        _check_task(run_dir, source.task)
        config, method = source.config, source.record.method
        spec = METHODS.get(method or "") or spec_for_peft_type(source.peft_config.peft_type)
        technique = str(getattr(source.peft_config.peft_type, "value", source.peft_config.peft_type))
        if (spec.prompt_learning if spec else source.peft_config.is_prompt_learning):
            raise _refuse(run_dir, f"a {method or technique} adapter (prompt learning)",
                          "it adds virtual tokens the model reads before the prompt, not weights: it cannot be merged "
                          "into the model nor written as a GGUF LoRA")
        if variant in ("merged", "both") and spec is not None and not spec.mergeable:
            raise _refuse(run_dir, f"a {spec.name} adapter", f"{spec.title} cannot be merged into the base weights")
        if variant in ("lora", "both") and (technique != "LORA" or getattr(source.peft_config, "use_dora", False)):
            raise AdapterError(f"{run_dir} is a {method or technique} adapter: llama.cpp's GGUF adapters hold plain "
                               "LoRA only; nothing was written", "use --variant merged (the adapter folded in)")
        method = method or technique.lower()
    converters = find_converters(llama_cpp)

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.resolve().name).strip("-") or "model"
    result = ExportResult(output_dir=out)
    with staging_dir(out, overwrite) as staging:
        files: list[str] = []
        if variant in ("merged", "both"):
            if source is None:
                model_dir = run_dir
            else:
                model_dir = staging / ".merged"  # removed below: the export holds GGUF files only
                merge(run_dir, model_dir, base=base)
            name = f"{stem}-{outtype}.gguf"
            _convert(converters / CONVERT_MODEL, [str(model_dir), "--outfile", str(staging / name),
                                                  "--outtype", outtype], f"the merged model of {run_dir}")
            chat, eos = _tokenizer_info(model_dir)
            if source is not None:
                shutil.rmtree(model_dir)
            (staging / "Modelfile").write_text(_modelfile(run_dir, name, _template(config, chat), eos))
            files.append(name)
            result.modelfiles.append("Modelfile")
        if variant in ("lora", "both"):
            assert source is not None
            base_dir = _base_folder(source.model_config.name, source.model_config.revision)
            base_name, lora_name = f"base-{outtype}.gguf", f"{stem}-lora-{outtype}.gguf"
            _convert(converters / CONVERT_MODEL, [str(base_dir), "--outfile", str(staging / base_name),
                                                  "--outtype", outtype], f"the base model {source.model_config.name}")
            _convert(converters / CONVERT_LORA, [str(run_dir), "--base", str(base_dir), "--outfile",
                                                 str(staging / lora_name), "--outtype", outtype],
                     f"the LoRA adapter {run_dir}")
            chat, eos = _tokenizer_info(run_dir)
            (staging / "Modelfile.lora").write_text(
                _modelfile(run_dir, base_name, _template(config, chat), eos, adapter=lora_name))
            files += [base_name, lora_name]
            result.modelfiles.append("Modelfile.lora")
        result.files = {f: (staging / f).stat().st_size for f in files}
        write_json(staging / EXPORT_RECORD, {
            "exported_from": str(run_dir.resolve()), "format": fmt, "outtype": outtype, "variant": variant,
            "method": method, "base": source.model_config.name if source else None, "files": result.files,
            "converters": str(converters), "versions": library_versions()})
    return result

"""The model card: a run directory's ``README.md``, written from the files the directory holds.

:func:`write_card` reads the run record (``peftlab.json``), the resolved config (``peftlab.yaml``),
``metrics.json`` and ``adapter_config.json`` and writes a card the Hugging Face Hub renders: YAML front
matter (the base model where it is a Hub id, library, pipeline tag, tags, Hub datasets, the base's license
where the base's own card is at hand, model-index with the final metrics), then what was trained, on what
data, how, the results (the loss curve in ``loss_curve.png``) and how to use the directory with peft /
transformers and with peftlab. Every figure is read from those files.

Train writes the card into its staging folder (``artifacts.save_run``), replacing peft's empty template;
``combine`` and ``merge`` write one for their output, saying what it was made from (a merged model's card
reads its ``peftlab-merge.json`` and the run it was merged from).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData, try_to_load_from_cache

from peftlab.adapters import read_peft_config
from peftlab.assets import OFFLINE_MODEL_PREFIX
from peftlab.config import DataConfig, RunConfig
from peftlab.errors import AdapterError
from peftlab.methods import METHODS
from peftlab.rundir import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_RECORD, METRICS, RUN_CONFIG, RunRecord,
                            is_full_run, read_run)
from peftlab.tasks import get_task
from peftlab.tasks.generation import template_fields

CARD = "README.md"
LOSS_CURVE = "loss_curve.png"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_PEFT_BOOKKEEPING = {"base_model_name_or_path", "revision", "peft_type", "task_type", "inference_mode",
                     "peft_version", "auto_mapping"}


def write_card(run_dir: str | Path, where: str | Path | None = None) -> Path:
    """Write ``README.md`` (and ``loss_curve.png``) into ``run_dir``: a run, a combined adapter or a merged model.

    ``where``: the directory as the card's commands name it (default ``run_dir``; a staging folder passes
    the final one).
    """
    run_dir = Path(run_dir)
    where = str(where or run_dir)
    if (run_dir / MERGE_RECORD).is_file():
        text = _merged_card(run_dir, where)
    else:
        config, record = read_run(run_dir)
        if config is None:
            raise AdapterError(f"{run_dir} holds no peftlab run ({RUN_CONFIG}): there is nothing to write a card from")
        text = (_combined_card if record.combined_from else _run_card)(run_dir, where, config, record)
    (run_dir / CARD).write_text(text)
    return run_dir / CARD


# --- the three cards -----------------------------------------------------------------------------

def _run_card(run_dir: Path, where: str, config: RunConfig, record: RunRecord) -> str:
    task, full, base = get_task(config.task), is_full_run(run_dir), _base(config, run_dir)
    metrics = _metrics(run_dir)
    spec = METHODS.get(record.method or "")
    sections = [
        f"# {Path(where).name}\n\n{spec.title if spec else record.method} (`{record.method}`) of {base.text} "
        f"for the `{config.task}` task ({task.pipeline_tag}), trained with peftlab: "
        + ("this folder holds the whole trained model." if full else "the adapter in this folder applies to that "
                                                                    "base model."),
        _trained(run_dir, config, record, full),
        _data(config, record, task),
        _training(config, record, metrics),
        _results(run_dir, record, metrics),
        _usage(where, config, record, task, base, full),
    ]
    if record.notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {note}" for note in record.notes))
    tags = ["peftlab", "full-fine-tuning", config.task] if full else ["peft", "peftlab", record.method, config.task]
    return _front_matter(where, base, "transformers" if full else "peft", task.pipeline_tag, tags, config.data,
                         _final(metrics)) + "\n\n".join(sections) + "\n"


def _combined_card(run_dir: Path, where: str, config: RunConfig, record: RunRecord) -> str:
    task, base = get_task(config.task), _base(config, run_dir)
    sources = "\n".join(f"| `{path}` | {weight:g} |" for path, weight in zip(record.combined_from, record.weights))
    sections = [
        f"# {Path(where).name}\n\nA weighted combination of {len(record.combined_from)} `{record.method}` adapters of "
        f"{base.text} for the `{config.task}` task ({task.pipeline_tag}), made by `peftlab combine` (peft's "
        f"`add_weighted_adapter`, combination `{record.combination}`).",
        f"## Made from\n\n| adapter | weight |\n|---|---:|\n{sources}\n\n`peftlab.yaml` (data and training settings) "
        "is the first adapter's run's. The combined adapter itself was neither trained nor evaluated: "
        f"`peftlab eval {shlex.quote(where)}` scores it.",
        f"## The adapter\n\n{_options(run_dir, config, record)}\n- adapter file (`{ADAPTER_WEIGHTS}`): "
        f"{_size(record.adapter_bytes)}",
        _usage(where, config, record, task, base, full=False),
    ]
    tags = ["peft", "peftlab", record.method, config.task, "combined"]
    return _front_matter(where, base, "peft", task.pipeline_tag, tags, config.data, {}) + "\n\n".join(sections) + "\n"


def _merged_card(run_dir: Path, where: str) -> str:
    merged = json.loads((run_dir / MERGE_RECORD).read_text())
    source, task = Path(merged["merged_from"]), get_task(merged["task"])
    config, record = read_run(source) if source.is_dir() else (None, RunRecord())
    metrics = _metrics(source) if config else {}
    base = _base(config, source, name=merged["base"])
    sections = [
        f"# {Path(where).name}\n\nThe `{merged['method']}` adapter `{source}`, folded by `peftlab merge` into its base "
        f"model ({base.text}): a plain transformers model for the `{merged['task']}` task ({task.pipeline_tag}); "
        "loading it needs no peft.",
        f"## Made from\n\n- adapter: `{source}` (technique `{merged['method']}`)\n- base model: {base.text}\n"
        f"- check: the merged model's logits differ from the adapter model's by at most {merged['max_abs_diff']:.3g} "
        f"on a probe input\n- libraries: {_versions(merged.get('versions'))}",
    ]
    if metrics:
        sections.append(_results(run_dir, record, metrics, "The adapter's, from its run (the merged model gives the "
                                                           "same outputs). "))
    sections.append(_usage(where, config, record, task, base, full=True, merged_from=source))
    tags = ["peftlab", merged["method"], merged["task"], "merged"]
    return _front_matter(where, base, "transformers", task.pipeline_tag, tags, config.data if config else None,
                         _final(metrics)) + "\n\n".join(sections) + "\n"


# --- front matter ----------------------------------------------------------------------------------

def _front_matter(where: str, base: Base, library: str, pipeline_tag: str, tags: list[str],
                  data: DataConfig | None, final: dict[str, float]) -> str:
    results = None
    if data is not None and final:
        kind, name, split = _eval_dataset(data)
        results = [EvalResult(task_type=pipeline_tag, dataset_type=kind, dataset_name=name,
                              dataset_config=data.dataset_config, dataset_split=split, metric_type=key,
                              metric_name=key, metric_value=value) for key, value in final.items()]
    card = ModelCardData(base_model=base.hub_id, library_name=library, pipeline_tag=pipeline_tag,
                         tags=[tag for tag in tags if tag],
                         datasets=[data.dataset] if data is not None and data.dataset else None,
                         model_name=Path(where).name if results else None, eval_results=results, **base.license)
    return f"---\n{card.to_yaml()}\n---\n\n"


def _eval_dataset(data: DataConfig) -> tuple[str, str, str | None]:
    """The model-index's dataset type, name and split: a Hub dataset by its id, others by what they are."""
    split = _eval_split(data)
    if data.dataset:
        return data.dataset, data.dataset, split
    if data.builtin:
        return "peftlab-builtin", data.builtin, split
    return "local-files", Path(data.validation_file or data.train_file).name, split


def _eval_split(data: DataConfig) -> str | None:
    """The split evaluated on; None where it was held out of the training data (local files name their splits)."""
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    if data.eval_split is None or (data.train_file and not files.get(data.eval_split)):
        return None
    return data.eval_split


# --- sections ----------------------------------------------------------------------------------

def _trained(run_dir: Path, config: RunConfig, record: RunRecord, full: bool) -> str:
    lines = ["## What was trained", ""]
    if not full:
        lines.append(_options(run_dir, config, record))
    if record.trainable_params is not None and record.total_params:
        lines.append(f"- trainable parameters: {record.trainable_params:,} of {record.total_params:,} "
                     f"({100 * record.trainable_params / record.total_params:.3g}%)")
    if record.adapter_bytes is not None:
        what = "model weights (`model*.safetensors`)" if full else f"adapter file (`{ADAPTER_WEIGHTS}`)"
        lines.append(f"- {what}: {_size(record.adapter_bytes)}")
    if config.model.new_tokens():
        lines.append(f"- added tokens: {', '.join(f'`{t}`' for t in config.model.new_tokens())}")
    return "\n".join(lines)


def _options(run_dir: Path, config: RunConfig, record: RunRecord) -> str:
    """The technique with its resolved options: adapter_config.json's settings that differ from peft's defaults
    or that peftlab or the user set, and peftlab's own options (e.g. LoRA+'s ratio)."""
    peft_config = read_peft_config(run_dir)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(peft_config)}
    spec = METHODS.get(record.method or "")
    asked = set(config.method.options) | set(spec.defaults if spec else ())
    saved = json.loads((run_dir / ADAPTER_CONFIG).read_text())
    shown = {key: value for key, value in saved.items() if key not in _PEFT_BOOKKEEPING
             and (key in asked or value != _plain(defaults.get(key)))}
    if spec:
        shown.update(spec.extras(config.method.options))
    options = ", ".join(f"`{key}` {_shortened(json.dumps(value))}" for key, value in shown.items())
    summary = f" — {spec.summary}" if spec else ""
    return f"- technique: `{record.method}` (peft `{saved['peft_type']}`){summary}\n" \
           f"- options ({ADAPTER_CONFIG}, without peft's defaults): {options or 'none'}"


def _data(config: RunConfig, record: RunRecord, task) -> str:
    data = config.data
    if data.dataset:
        source = f"the Hub dataset [`{data.dataset}`](https://huggingface.co/datasets/{data.dataset})" + (
            f" (configuration `{data.dataset_config}`)" if data.dataset_config else "")
    elif data.builtin:
        source = f"peftlab's built-in dataset `{data.builtin}`"
    else:
        files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
        source = "local files: " + ", ".join(f"{split} `{Path(path).name}`" for split, path in files.items() if path)
    split = _eval_split(data)
    held_out = f"{100 * data.validation_fraction:g}% of the training rows, held out with seed {config.training.seed}"
    evaluated = (f'the "{split}" split' + (f" (where the dataset has none: {held_out})" if data.dataset else "")
                 if split else held_out)
    lines = ["## Data", "", f"- source: {source}", f"- evaluated on: {evaluated}"]
    if record.split_rows:
        lines.append("- rows: " + ", ".join(f"{name} {rows:,}" for name, rows in record.split_rows.items()))
    lines.append(f"- columns: {task.card_columns(data)}")
    if task.classifies and record.meta.get("regression"):
        lines.append(f"- target: a number (regression on `{data.label_column}`)")
    elif task.classifies:
        labels = task.labels(record.meta)
        lines.append(f"- labels ({len(labels)}): " + ", ".join(f"`{label}`" for label in labels))
    elif record.meta.get("label_like"):
        lines.append("- targets (a few short strings, scored by exact match): "
                     + ", ".join(f"`{target}`" for target in record.meta.get("targets", [])))
    if record.max_length:
        lines.append(f"- longest input: {record.max_length} tokens")
    return "\n".join(lines)


def _training(config: RunConfig, record: RunRecord, metrics: dict[str, Any]) -> str:
    training = config.training
    epochs = next((entry["epoch"] for entry in reversed(metrics.get("history") or [])
                   if entry.get("step") == record.steps), None)
    warmup = f"{training.warmup_steps} warmup steps" if training.warmup_steps is not None else \
        f"warmup ratio {training.warmup_ratio:g}"
    evaluation = {"epoch": "after every epoch", "steps": f"every {training.eval_steps} steps",
                  "no": "once, at the end"}[training.eval_strategy]
    processes = record.num_processes or 1
    rows = [("optimizer steps", f"{record.steps}" + (f" ({epochs:g} epoch{'s' * (epochs != 1)})" if epochs is not None
                                                     else "")),
            ("batch size", f"{training.batch_size} × {training.gradient_accumulation_steps} accumulation × "
                           f"{processes} process{'es' * (processes != 1)}"),
            ("learning rate", f"{training.learning_rate:g} ({training.lr_scheduler} schedule, {warmup})"),
            ("weight decay", f"{training.weight_decay:g}"),
            ("seed", f"{training.seed}"),
            ("evaluation", evaluation)]
    if record.kept:
        best = record.kept.get("which") == "best"
        rows.append(("weights kept", f"{'the best evaluation' if best else 'the last step'}: step "
                                     f"{record.kept.get('step')}" + (f", by {record.main_metric}" if best else "")))
    if record.precision:
        base_dtype = (record.fast_path or {}).get("base_dtype")
        rows.append(("precision", f"mixed precision: {record.precision}"
                     + (f"; base weights in {base_dtype}" if base_dtype else "")))
    rows += [(name, value) for name, value in (
        ("hardware", record.hardware),
        ("training time", f"{record.train_seconds:,.1f} s" if record.train_seconds is not None else None),
        ("libraries", _versions(record.versions) if record.versions else None),
        ("finished", record.created)) if value]
    return "## Training\n\n| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _results(run_dir: Path, record: RunRecord, metrics: dict[str, Any], intro: str = "") -> str:
    """Final metrics (before -> after where the run evaluated before training), every evaluation, the loss curve
    (drawn into ``run_dir``)."""
    lines = ["## Results", ""]
    final, initial = _final(metrics), metrics.get("initial") or {}
    if final:
        samples = f" ({metrics['samples']:,.0f} rows)" if metrics.get("samples") else ""
        lines += [f"{intro}The kept weights on the evaluation data{samples}; main metric `{record.main_metric}`:", ""]
        if initial:
            lines += ["| metric | before training | after |", "|---|---:|---:|"]
            lines += [f"| {key} | {_num(initial.get(key))} | {_num(value)} |" for key, value in final.items()]
        else:
            lines += ["| metric | value |", "|---|---:|"] + [f"| {key} | {_num(value)} |" for key, value in final.items()]
        lines.append("")
    history = metrics.get("history") or []
    if history:
        keys = [key for key in history[0] if key not in {"step", "epoch", "samples"}]
        kept = (record.kept or {}).get("step")
        lines += ["Every evaluation (the kept one in bold):", "", "| step | epoch | " + " | ".join(keys) + " |",
                  "|---:|---:|" + "---:|" * len(keys)]
        for entry in history:
            cells = [str(entry["step"]), f"{entry['epoch']:g}", *(_num(entry.get(key)) for key in keys)]
            lines.append("| " + " | ".join(f"**{c}**" if entry["step"] == kept else c for c in cells) + " |")
        lines.append("")
    else:
        lines += ["No evaluations were recorded.", ""]
    losses = metrics.get("losses") or []
    if losses:
        _plot_losses(losses, run_dir / LOSS_CURVE)
        lines.append(f"![training loss]({LOSS_CURVE})\n\nTraining loss: {len(losses)} points, each the mean loss of "
                     "the `training.log_every` steps before it.")
    else:
        lines.append("No training loss was logged (the run took fewer steps than `training.log_every`).")
    return "\n".join(lines)


def _usage(where: str, config: RunConfig | None, record: RunRecord, task, base: Base, full: bool,
           merged_from: Path | None = None) -> str:
    folder, auto = shlex.quote(where), task.auto_class.__name__
    code = ([] if full else ["from peft import PeftModel"]) + [f"from transformers import AutoTokenizer, {auto}", "",
                                                               f"tokenizer = AutoTokenizer.from_pretrained({where!r})"]
    if full:
        code.append(f"model = {auto}.from_pretrained({where!r}).eval()")
    else:
        kwargs = "".join(f", {key}={value!r}" for key, value in task.model_kwargs(record.meta).items())
        code += [f"# {base.comment}"] if base.comment else []
        code.append(f"base = {auto}.from_pretrained({base.loadable!r}{kwargs})")
        if config.model.new_tokens():
            code.append("base.resize_token_embeddings(len(tokenizer))  # the run added tokens")
        code.append(f"model = PeftModel.from_pretrained(base, {where!r}).eval()")
    parts = ["## How to use", "", f"With transformers{'' if full else ' and peft'}:", "", "```python", *code,
             *_example(config, task), "```"]
    commands = [] if merged_from else [f"peftlab eval {folder}", f"peftlab predict {folder} {_predict_args(config, task)}"]
    if not full:
        name = re.sub(r"[^\w.-]", "-", Path(where).name)
        commands.append(f"peftlab serve --base {shlex.quote(config.model.name)} --adapter {name}={folder}")
    elif task.generates:
        commands.append(f"peftlab serve --base {folder} --task {task.name}")
    if commands:
        parts += ["", "With peftlab (`eval` scores the run's evaluation data, `predict` answers new inputs, `serve` "
                      "answers over HTTP):", "", "```bash", *commands, "```"]
    if merged_from and config is not None:
        source = shlex.quote(str(merged_from))
        parts += ["", f"`peftlab eval` and `peftlab predict` read a peftlab run: the adapter's (`peftlab predict {source} "
                      f"{_predict_args(config, task)}`)."]
    if full and task.classifies:
        parts += ["", "`peftlab serve` classifies with adapters on a base model, not with a whole classifier."]
    return "\n".join(parts)


def _example(config: RunConfig | None, task) -> list[str]:
    """Lines that run the model on an example input, built as the run's data options build one (the family's own)."""
    tokens = (config.generation.max_new_tokens or config.data.target_max_length) if config else 32
    return ["", *task.card_example(config.data if config else None, tokens)]


def _predict_args(config: RunConfig, task) -> str:
    data = config.data
    fields = template_fields(data.prompt_template) if task.generates and data.prompt_template else []
    if not data.messages_column and any(field != data.text_column for field in fields):
        return "--file rows.jsonl  # rows with " + ", ".join(fields)
    pairs = (task.classifies or task.embeds) and task.needs_pairs(data)
    return '--text "Your text here"' + (' --pair "A second text"' if pairs else "")


# --- what the card is made from ----------------------------------------------------------------------

def _metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / METRICS).read_text()) if (run_dir / METRICS).is_file() else {}


def _final(metrics: dict[str, Any]) -> dict[str, float]:
    """The final metrics in metrics.json: its top-level numbers but the row count."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "samples"}


@dataclasses.dataclass
class Base:
    """The base model as the card names it."""

    hub_id: str | None  # its Hub id; None for an offline alias or a local folder (the front matter's base_model)
    text: str  # how the card's text names it
    loadable: str  # what from_pretrained loads in the card's snippet
    comment: str | None  # the snippet's comment on it
    license: dict[str, str]  # the license keys its own card states (empty: not known)


def _base(config: RunConfig | None, adapter_dir: Path, name: str | None = None) -> Base:
    """The base model: its Hub id (None for an offline alias or a local folder), how the card names it, what
    ``from_pretrained`` loads, and the license its own card states (where that card is at hand)."""
    name = name or config.model.name
    revision = config.model.revision if config else None
    saved = _peft_base(adapter_dir)  # the folder peft recorded: where an offline alias resolved
    hub_id = comment = None
    loadable = name
    if name.startswith(OFFLINE_MODEL_PREFIX):
        text, comment, loadable = f"`{name}` (a model peftlab builds offline; not a Hub id)", \
            f"{name}, as resolved on the machine that trained it", saved or name
    elif Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
        text = f"the local model folder `{name}` (not a Hub id)"
    else:
        hub_id = name
        text = f"[`{name}`](https://huggingface.co/{name})" + (f" at revision `{revision}`" if revision else "")
    cards = [Path(folder) / CARD for folder in (saved, name) if folder and Path(folder).is_dir()]
    cached = try_to_load_from_cache(hub_id, CARD, revision=revision) if hub_id else None
    cards += [Path(cached)] if isinstance(cached, str) else []
    return Base(hub_id, text, loadable, comment, _license(cards))


def _peft_base(adapter_dir: Path) -> str | None:
    path = adapter_dir / ADAPTER_CONFIG
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.is_file() else None


def _license(cards: list[Path]) -> dict[str, str]:
    """The license keys of the first of these model cards whose front matter states a license."""
    for card in cards:
        parts = card.read_text(errors="replace").split("---", 2) if card.is_file() else []
        try:
            meta = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
        except yaml.YAMLError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("license"), str):
            return {key: meta[key] for key in ("license", "license_name", "license_link")
                    if isinstance(meta.get(key), str)}
    return {}


def _plot_losses(losses: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (a notebook's) stays as it was

    steps, values = [entry["step"] for entry in losses], [entry["loss"] for entry in losses]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
    log = min(values) > 0 and max(values) / min(values) > 10  # early losses 10x the late ones: the late stay readable
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss" + (" (log scale)" if log else ""))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


# --- formatting ------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """A peft default as adapter_config.json holds it (enums by value, sets as lists)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", value)


def _shortened(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _size(n: int | None) -> str:
    if n is None:
        return "size not recorded"
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if n >= s), ("", 1))
    return f"{n:,} bytes" + (f" ({n / scale:.1f} {unit})" if unit else "")


def _versions(versions: dict[str, str] | None) -> str:
    return ", ".join(f"{name} {version}" for name, version in (versions or {}).items()) or "not recorded"

"""The `peftlab` command line: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peftlab.errors import PeftlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning: train, evaluate and use LoRA (and DoRA, rsLoRA, LoRA+, "
                       "PiSSA, OLoRA, AdaLoRA), IA3, LoHa, LoKr, VeRA, OFT, LayerNorm and BitFit tuning, prefix, prompt "
                       "and P-tuning adapters, with full fine-tuning as the reference.")
out = Console()
err = Console(stderr=True)

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: section.key=value "
                                                                        "(repeatable).")]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(result) -> Table:
    table = Table(title=f"peftlab run: {result.method} on {result.task}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in result.metrics.items():
        if key in {"samples"}:
            continue
        before = result.initial_metrics.get(key) if result.initial_metrics else None
        shown = f"{value:.4f}" + (f"  (before training: {before:.4f})" if before is not None else "")
        table.add_row(f"eval {key}" + (" *" if key == result.main_metric else ""), shown)
    table.add_row("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                                          f"({100 * result.trainable_share:.3f}%)")
    table.add_row("training time", f"{result.train_seconds:.1f} s")
    table.add_row("adapter size", _size(result.adapter_bytes))
    table.add_row("output", str(result.output_dir))
    for note in result.notes:
        table.add_row("note", note)
    return table


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="A YAML recipe, or recipe:NAME for a packaged one "
                                                "(peftlab recipes).")],
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory and unfinished "
                                                 "checkpoints.")] = False,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Where the adapter goes.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its latest checkpoint.")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", "-n", min=1,
                                               help="Data-parallel processes on this machine (one per GPU; "
                                                    "CPU processes without GPUs).")] = 1,
    evaluate_before: Annotated[bool, typer.Option("--evaluate-before", help="Also evaluate before the first step "
                                                                            "(the summary shows before -> after).")
                               ] = False,
) -> None:
    """Train an adapter from a recipe; evaluates as configured and saves the best or last adapter."""
    from peftlab import load_config
    from peftlab import train as run

    overrides = list(set_ or []) + ([f"output_dir={output_dir}"] if output_dir else [])
    recipe = load_config(config, overrides)  # fails here, once, before any process starts
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(_relaunch(num_processes))
    result = run(recipe, overwrite=overwrite, resume=resume, evaluate_before=evaluate_before)
    if _is_main_process():
        out.print(_summary(result))


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _relaunch(num_processes: int) -> int:
    """Run this same command in ``num_processes`` data-parallel processes (torchrun; accelerate picks it up)."""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in {"--num-processes", "-n"}:
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
               "-m", "peftlab", *args]
    return subprocess.call(command)

DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", help='Spread the base over devices: auto, balanced or sequential (docs/big-models.md).')]
MaxMemoryOpt = Annotated[Optional[list[str]], typer.Option(
    "--max-memory", help="Memory budget DEVICE=AMOUNT, e.g. cpu=4GiB or 0=20GiB (repeatable); layers that do not "
                         "fit go to the next device, then to the offload folder.")]
OffloadOpt = Annotated[Optional[str], typer.Option("--offload-folder", help="Keep layers that fit nowhere here.")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="Load the base in 8bit or 4bit (CUDA GPU and "
                                                                       "bitsandbytes).")]


def _model_options(device_map: str | None, max_memory: list[str] | None, offload_folder: str | None,
                   quantize: str | None) -> dict:
    from peftlab.placement import parse_max_memory

    return {"device_map": device_map, "max_memory": parse_max_memory(max_memory), "offload_folder": offload_folder,
            "quantization": quantize}


@app.command("eval")
def eval_(
    adapter_dir: Annotated[Path, typer.Argument(help="A run / adapter directory.")],
    data: Annotated[Optional[str], typer.Option(help="Evaluate on this CSV / JSONL / Parquet file.")] = None,
    split: Annotated[str, typer.Option(help="Split of the run's data: eval or test.")] = "eval",
    set_: SetOpt = None,
    base: Annotated[Optional[str], typer.Option(help="Base model, if not the one the adapter names.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Classifiers: per-class precision / recall / F1 / "
                                                          "support and the confusion matrix, also written as JSON "
                                                          "and PNG to RUN_DIR/reports/SPLIT/.")] = False,
    report_dir: Annotated[Optional[Path], typer.Option("--report-dir", help="With --report: write the report "
                                                                            "here instead.")] = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    quantize: QuantizeOpt = None,
) -> None:
    """Metrics of a saved adapter on its evaluation split, another split or a file."""
    from peftlab import evaluate

    options = _model_options(device_map, max_memory, offload_folder, quantize)
    if report_dir is not None and not report:
        raise PeftlabError("--report-dir goes with --report", "add --report")
    if report:
        from peftlab.eval_report import classification_report

        result = classification_report(adapter_dir, data=data, split=split, overrides=list(set_ or []), base=base,
                                       model_options=options, output_dir=report_dir)
        if as_json:
            out.print_json(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            _print_report(adapter_dir, result)
        return
    metrics = evaluate(adapter_dir, data=data, split=split, overrides=list(set_ or []), base=base,
                       model_options=options)
    if as_json:
        out.print_json(json.dumps(metrics))
        return
    out.print(f"[bold]{adapter_dir}[/bold] on {data or (split + ' split')}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if key != "samples" else f"{value:.0f}")
    out.print(table)


def _print_report(adapter_dir: Path, report) -> None:
    """``peftlab eval --report``: the metrics, the per-class table and the confusion matrix."""
    out.print(f"[bold]{escape(str(adapter_dir))}[/bold] on {escape(report.source)}")
    metrics = Table()
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key, value in report.metrics.items():
        metrics.add_row(key, f"{value:.4f}" if key != "samples" else f"{value:.0f}")
    out.print(metrics)
    per_class = Table(title="per class", title_justify="left")
    for name in ("label", "precision", "recall", "f1", "support"):
        per_class.add_column(name, justify="left" if name == "label" else "right")
    for row in report.classes:
        per_class.add_row(escape(row.label), f"{row.precision:.4f}", f"{row.recall:.4f}", f"{row.f1:.4f}",
                          str(row.support), style="red" if row.support and row.recall < 0.5 else None)
    per_class.add_section()
    for name, average in (("macro avg", report.macro), ("weighted avg", report.weighted)):
        per_class.add_row(name, f"{average['precision']:.4f}", f"{average['recall']:.4f}", f"{average['f1']:.4f}",
                          str(report.samples))
    per_class.add_row("accuracy", "", "", f"{report.accuracy:.4f}", str(report.samples))
    out.print(per_class)
    confusion = Table(title="confusion matrix", title_justify="left")
    confusion.add_column("true \\ predicted")
    for label in report.labels:
        confusion.add_column(escape(label), justify="right")
    for i, (label, row) in enumerate(zip(report.labels, report.confusion)):
        confusion.add_row(escape(label), *[f"[bold]{n}[/bold]" if i == j else str(n) for j, n in enumerate(row)])
    out.print(confusion)
    if report.positive_label is not None:
        out.print(f"f1_binary is the F1 of the positive class \"{escape(report.positive_label)}\" (the second label)")
    for kind, path in report.files.items():
        out.print(f"{kind}: {escape(path)}")


@app.command()
def predict(
    adapter_dir: Annotated[Path, typer.Argument(help="A run / adapter directory.")],
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", "--question",
                                                      help="An input text (repeatable); question answering: the "
                                                           "question.")] = None,
    pair: Annotated[Optional[list[str]], typer.Option("--pair", "--context",
                                                      help="The second text of a pair (repeatable); question "
                                                           "answering: the passage.")] = None,
    file: Annotated[Optional[str], typer.Option(help="Predict every row of this file.")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Sentence embeddings: a file of texts to search; each input "
                                                       "gets its nearest rows.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="With --corpus: neighbours per input.")] = 5,
    fmt: Annotated[str, typer.Option("--format", help="table or jsonl.")] = "table",
    set_: SetOpt = None,
    base: Annotated[Optional[str], typer.Option(help="Base model, if not the one the adapter names.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generative tasks: tokens to generate.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sample with this temperature.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample from the top-p nucleus.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")] = None,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    quantize: QuantizeOpt = None,
) -> None:
    """Label and score per input (classification) or generated text (seq2seq, causal LM)."""
    from peftlab import predict as run

    if fmt not in {"table", "jsonl"}:
        raise PeftlabError(f'unknown --format "{fmt}"', "use table or jsonl")
    generation = {k: v for k, v in {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                    "stop": stop}.items() if v}
    if temperature is not None or top_p is not None:
        generation["do_sample"] = True
    records = run(adapter_dir, texts=text, pairs=pair, file=file, overrides=list(set_ or []), base=base,
                  generation=generation, corpus=corpus, top_k=top_k,
                  model_options=_model_options(device_map, max_memory, offload_folder, quantize))
    if fmt == "jsonl":
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    table = Table()
    for key in records[0]:
        table.add_column(key, overflow="fold", justify="right" if key == "score" else "left")
    for record in records:
        table.add_row(*[_cell(v) for v in record.values()])
    out.print(table)


def _cell(value: Any) -> str:
    """A table cell: numbers to 3 decimals; a list of records (a tagger's words, entities) one per line."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "\n".join(" ".join(_cell(v) for v in item.values() if not isinstance(v, dict)) for item in value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, float) for v in value):  # a vector
        return f"[{', '.join(f'{v:.3f}' for v in value[:4])}, ...] ({len(value)} dims)"
    return str(value)


@app.command()
def quickstart(
    out_dir: Annotated[str, typer.Option("--out", help="Where the adapter goes.")] = "runs/quickstart",
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = True,
) -> None:
    """LoRA on MiniLM for Rotten Tomatoes sentiment, offline, in about two minutes on a CPU."""
    from peftlab.quickstart import run

    run(out_dir, overrides=list(set_ or []), overwrite=overwrite, console=out)


@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="Show one method in full.")] = None,
    model_type: Annotated[Optional[str], typer.Option(help="Show defaults for this architecture "
                                                           "(e.g. roberta, llama).")] = None,
) -> None:
    """The PEFT techniques peftlab knows, their options and defaults."""
    from peftlab.methods import METHODS, describe, get_method

    if name:
        spec = get_method(name)
        info = describe(spec, model_type)
        out.print(f"[bold]{info['name']}[/bold] ({info['group']}): {escape(info['summary'])}")
        out.print(f"when it helps: {info['when']}")
        out.print(f"trains: {info['trains']}")
        out.print(f"peft config: {info['peft_config']}; prompt learning: {info['prompt_learning']}; "
                  f"mergeable: {info['mergeable']}; tasks: {', '.join(info['tasks'])}")
        out.print(f"default learning rate: {info['learning_rate']:g}" + "".join(
            f"; {task}: {rate:g}" for task, rate in (info.get("task_learning_rates") or {}).items()))
        for task, hint in (info.get("budget_hints") or {}).items():
            out.print(escape(f"budget ({task}): {hint}"))
        if spec.linear_only:
            out.print("layers: torch.nn.Linear only (not GPT-2-style Conv1D)")
        if info.get("architectures"):
            out.print(escape(f"architectures: {info['architectures']}"))
        out.print(escape(f"defaults{' for ' + model_type if model_type else ''}: {info['defaults'] or ('(none)' if spec.full else '(peft defaults)')}"))
        if not model_type and spec.needs_targets and not spec.model_defaults:
            out.print("target modules: per architecture (use --model-type to see them)")
        if info["options"]:
            out.print(f"options (method.options.*): {', '.join(info['options'])}")
        return
    from peftlab.methods import GROUPS

    table = Table(title="PEFT methods" + (f" (defaults for {model_type})" if model_type else ""))
    table.add_column("method", style="bold")
    table.add_column("technique")
    table.add_column("when it helps")
    table.add_column("defaults")
    table.add_column("merge")
    for group in GROUPS:
        specs = [spec for spec in METHODS.values() if spec.group == group]
        if not specs:
            continue
        table.add_section()
        table.add_row(f"[italic]{group}[/italic]", "", "", "", "")
        for spec in specs:
            info = describe(spec, model_type)
            defaults = ", ".join(f"{k}={v}" for k, v in info["defaults"].items() if k != "target_modules" or model_type)
            if spec.needs_targets and not model_type:
                defaults = ", ".join(filter(None, [defaults, "targets per model" if spec.model_defaults else
                                                   "targets per architecture"]))
            table.add_row(spec.name, spec.title, spec.when, escape(defaults) or "-", "yes" if spec.mergeable else "no")
    out.print(table)
    out.print("`peftlab methods NAME` shows one in full; --model-type shows an architecture's defaults.")


@app.command()
def tasks() -> None:
    """The task families and built-in datasets."""
    from peftlab.data import BUILTIN_DATASETS
    from peftlab.tasks import TASKS

    for name, task in TASKS.items():
        out.print(f"[bold]{name:10}[/bold] {(type(task).__doc__ or '').strip()}")
    out.print(f"built-in datasets: {', '.join(BUILTIN_DATASETS)}")


@app.command()
def recipes(
    notebooks_only: Annotated[bool, typer.Option("--notebooks", help="Only the ten notebooks' workflows and their "
                                                                     "offline variants.")] = False,
) -> None:
    """The recipes packaged with peftlab: `peftlab train recipe:NAME [--set key=value ...]`."""
    from peftlab.catalog import recipes as packaged

    table = Table(title="packaged recipes (peftlab train recipe:NAME)", title_justify="left")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("nb", justify="right")
    table.add_column("model")
    table.add_column("technique")
    table.add_column("description")
    for recipe in packaged().values():
        if notebooks_only and recipe.notebook is None:
            continue
        raw = recipe.raw()
        model = (raw.get("model") or {}).get("name", "?")
        method = (raw.get("method") or {}).get("name", "lora")
        number = "" if recipe.notebook is None else f"{recipe.notebook}" + (" off" if recipe.offline_of else "")
        table.add_row(recipe.name, number, escape(str(model)), method, escape(recipe.description))
    (out if out.is_terminal else Console(width=200)).print(table)
    out.print("nb: the notebook it backs (notebooks/); off: its offline variant (packaged model and data, CPU).",
              style="dim", highlight=False)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="A YAML recipe: the model, data and step budget every run shares.")],
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated techniques (default: every one that fits "
                                                        "the task), e.g. lora,ia3,prefix.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, one run each (mean and spread), "
                                                      "e.g. 0,1,2. Default: the config's seed.")] = None,
    set_: SetOpt = None,
    set_method: Annotated[Optional[list[str]], typer.Option(
        "--set-method", help="Override a key for one method: METHOD:section.key=value (repeatable; METHOD * = "
                             "every method), e.g. prefix:training.learning_rate=1e-2.")] = None,
    lr_sweep: Annotated[int, typer.Option(help="Learning rates per method around its base rate: 3 = x0.3, x1, "
                                               "x3; the best is marked.")] = 1,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The comparison folder; finished runs in it are "
                                                             "kept and skipped.")] = Path("runs/compare"),
    repeat_timing: Annotated[int, typer.Option(min=0, help="After each run, measure its training speed again N times "
                                                           "(up to 20 steps each, no evaluation); the table shows "
                                                           "the median ± half the range.")] = 0,
) -> None:
    """Train several techniques on the same model, data, budget and seeds; compare metrics, size, memory, speed.

    The table ends with the references (majority class, base model without adapter, untrained adapter) and the
    command says whether any method beat them, and what to run next when none did."""
    from peftlab import compare as run
    from peftlab import load_config
    from peftlab.checkpoint import TrainingInterrupted
    from peftlab.comparison import plan, report

    base = load_config(config, list(set_ or []))
    try:
        result = run(base, methods=plan.parse_list(methods, "--methods"), seeds=plan.parse_seeds(seeds),
                     method_overrides=plan.parse_method_overrides(list(set_method or [])), lr_sweep=lr_sweep,
                     out_dir=out_dir, repeat_timing=repeat_timing, command=["peftlab", *sys.argv[1:]])
    except (KeyboardInterrupt, TrainingInterrupted):  # the run in progress restarts on the next call
        err.print(f"interrupted: finished runs are kept in {out_dir} (results.json, report.html); "
                  "run the same command again to continue", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    summary = report.summarize(result.rows, result.baselines)
    headers, body = report.table(summary)
    references = report.reference_rows(summary)
    table = Table(title=f"peftlab compare: {base.model.name}, {base.task}", title_justify="left")
    for header in headers:
        table.add_column(header, justify="left" if header in {"method", "learning rate"} else "right")
    for i, row in enumerate(body):
        table.add_row(*row, end_section=i == len(body) - 1 and bool(references))
    for row in references:
        table.add_row(*row, style="dim italic")
    (out if out.is_terminal else Console(width=150)).print(table)  # a log or a pipe: room for every column
    for note in report.notes(summary):
        out.print(note, style="dim", markup=False, highlight=False, soft_wrap=True)
    if result.verdict:
        style = "bold green" if result.verdict.level == "ok" else "bold yellow"
        out.print()
        for i, line in enumerate(result.verdict.lines()):
            out.print(line, style=style if i == 0 else None, markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result.report}  (also results.json, results.csv, results.md in {out_dir})", soft_wrap=True)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="A LoRA / IA3 adapter directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the merged model goes.")],
    base: Annotated[Optional[str], typer.Option(help="Base model, if not the one the adapter names.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Fold an adapter into its base model and save a plain transformers model (no peft needed to load it)."""
    from peftlab import merge as run

    result = run(adapter_dir, out_dir, base=base, overwrite=overwrite)
    out.print(f"merged {result.method} adapter {escape(str(adapter_dir))} into {escape(str(result.output_dir))} "
              f"(largest logit difference to the adapter model: {result.max_abs_diff:.2g})", highlight=False)


@app.command()
def combine(
    adapter_dirs: Annotated[list[Path], typer.Argument(help="Two or more adapters (same base, technique, task).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the combined adapter goes.")],
    weight: Annotated[Optional[list[float]], typer.Option("--weight", "-w", help="One weight per adapter, in order "
                                                                                  "(default: equal).")] = None,
    combination: Annotated[str, typer.Option(help="linear, cat, svd, ties, dare_linear, ... (peft's "
                                                  "combination_type).")] = "linear",
    density: Annotated[Optional[float], typer.Option(help="TIES / DARE: share of weights kept.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model, if not the one the adapters name.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """A weighted combination of adapters (peft's adapter arithmetic), saved as one adapter."""
    from peftlab import combine as run

    path = run(adapter_dirs, out_dir, weights=weight, combination=combination, density=density, base=base,
               overwrite=overwrite)
    out.print(f"combined {len(adapter_dirs)} adapters ({combination}) into {escape(str(path))}", highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A causal-lm run (LoRA / IA3 / ... adapter), a merged model or a "
                                                 "full fine-tuning run.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama).")] = "gguf",
    outtype: Annotated[str, typer.Option(help="f32, f16, bf16 or q8_0.")] = "f16",
    variant: Annotated[str, typer.Option(help="merged (one model file), lora (base + GGUF LoRA adapter) or "
                                              "both.")] = "merged",
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where the files go (default: "
                                                                        "RUN-gguf beside the run).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model, if not the one the adapter names.")] = None,
    llama_cpp: Annotated[Optional[Path], typer.Option(help="llama.cpp's sources (the converters; default: "
                                                           "$PEFTLAB_LLAMA_CPP).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
) -> None:
    """Export a causal-LM run to GGUF for llama.cpp / Ollama (with llama.cpp's own converters), plus a Modelfile."""
    from peftlab import export as run

    result = run(run_dir, out_dir, fmt=fmt, outtype=outtype, variant=variant, base=base, llama_cpp=llama_cpp,
                 overwrite=overwrite)
    out.print(f"exported {escape(str(run_dir))} to {escape(str(result.output_dir))}:", highlight=False, soft_wrap=True)
    for name, size in result.files.items():
        out.print(f"  {escape(name)}  {_size(size)}", highlight=False, soft_wrap=True)
    for name in result.modelfiles:
        out.print(f"  {escape(name)}  (ollama create NAME -f {escape(name)})", highlight=False, soft_wrap=True)


@app.command()
def card(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, a merged model or a combined adapter.")],
) -> None:
    """Write the model card (README.md, with loss_curve.png) from the folder's own files: for a run of an
    earlier peftlab version, whose README.md is peft's empty template."""
    from peftlab import write_card
    from peftlab.card import LOSS_CURVE

    path = write_card(run_dir)
    curve = f" and {LOSS_CURVE}" if f"]({LOSS_CURVE})" in path.read_text() else ""
    out.print(f"wrote {escape(str(path))}{curve}", highlight=False, soft_wrap=True)


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or a merged / combined output) with its card.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub model repo: NAME or NAMESPACE/NAME (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and list what would be uploaded; upload "
                                                            "nothing (no token or network needed).")] = False,
) -> None:
    """Upload a run to the Hugging Face Hub: its card, adapter (or model), tokenizer and loss curve; never its
    local records, checkpoints or staging folders. Needs a token (hf auth login, or HF_TOKEN)."""
    from peftlab import push as run

    result = run(run_dir, repo_id, private=private, dry_run=dry_run)
    visibility = " (private)" if private else ""
    out.print(f"{escape(str(run_dir))} -> {escape(repo_id)}{visibility}: {len(result.files)} files, "
              f"{_size(result.total_bytes)}", highlight=False, soft_wrap=True)
    width = max(len(name) for name, _ in result.files)
    for name, size in result.files:
        out.print(f"  {escape(name):{width}}  {_size(size):>9}", highlight=False, soft_wrap=True)
    if result.left_out:
        out.print(f"not uploaded (local records, logs, reports): {escape(', '.join(result.left_out))}",
                  style="dim", highlight=False, soft_wrap=True)
    for line in result.notes:
        out.print(f"note: {escape(line)}", highlight=False, soft_wrap=True)
    if dry_run:
        out.print("dry run: nothing was uploaded", highlight=False)
    else:
        out.print(f"uploaded to {result.url}", highlight=False, soft_wrap=True)


def _named_dirs(values: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise PeftlabError(f'--adapter "{value}" is not NAME=DIR', "e.g. --adapter sentiment=runs/sst2")
        if name in named:
            raise PeftlabError(f'two adapters named "{name}"', "give each --adapter its own name")
        named[name] = path
    return named


@app.command()
def serve(
    base: Annotated[str, typer.Option(help="The base model (Hub id or folder), loaded once.")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="NAME=DIR: serve the adapter in "
                                                                                  "DIR as model NAME (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    task: Annotated[Optional[str], typer.Option(help="Task family when no --adapter is given (seq-cls, seq2seq, "
                                                     "causal-lm).")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(help="Allow POST /v1/adapters to load adapter folders "
                                                              "under this folder (off without it).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most rows in one forward pass.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="How long to collect requests into a batch.")] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="Waiting requests beyond which the server answers "
                                                        "503.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens one request may ask for.")] = 256,
    mixed_batches: Annotated[bool, typer.Option(help="Put requests for different LoRA adapters into one forward "
                                                     "pass (--no-mixed-batches: one adapter per pass).")] = True,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: where it loads).")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="PEFTLAB_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on every /v1/* route "
                                                        "(/health, / and /metrics stay open). Prefer the "
                                                        "environment variable: a flag shows in the process "
                                                        "list.")] = None,
    enable_docs: Annotated[bool, typer.Option("--enable-docs", help="Serve /docs and /openapi.json (off "
                                                                    "without it).")] = False,
    max_input_tokens: Annotated[Optional[int], typer.Option(min=1, help="Longest input in tokens, for every "
                                                                        "model (default: what the model "
                                                                        "takes).")] = None,
    max_messages: Annotated[int, typer.Option(min=1, help="Most messages in one chat request.")] = 256,
    max_adapters: Annotated[Optional[int], typer.Option(min=1, help="Most adapters loaded at run time held in "
                                                                    "memory; the least recently used is evicted and "
                                                                    "loaded again on its next request (default: no "
                                                                    "cap).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(min=0, help="Seconds running generations get to finish after "
                                                                "SIGTERM / Ctrl-C before they are ended.")] = 10.0,
) -> None:
    """Serve many adapters on one base model over HTTP (OpenAI-compatible completions, classification)."""
    from peftlab.serving import serve as run

    adapters = _named_dirs(list(adapter or []))
    err.print(f"peftlab serve: loading {base} and {len(adapters)} adapter(s) ...", highlight=False)
    run(base, adapters, host=host, port=port, task=task, adapter_root=adapter_root, device=device,
        mixed_batches=mixed_batches, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
        max_tokens=max_tokens, api_key=api_key, enable_docs=enable_docs, max_input_tokens=max_input_tokens,
        max_messages=max_messages, max_adapters=max_adapters, shutdown_timeout=shutdown_timeout)


def main() -> None:
    """Entry point: user errors become one readable message and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except PeftlabError as error:
        from peftlab.checkpoint import TrainingInterrupted

        if _is_main_process():
            err.print(f"[bold red]error:[/bold red] {escape(error.message)}", highlight=False, soft_wrap=True)
            if error.hint:
                err.print(f"[dim]hint:[/dim] {escape(error.hint)}", highlight=False, soft_wrap=True)
        sys.exit(130 if isinstance(error, TrainingInterrupted) else 2)
    except KeyboardInterrupt:
        err.print("interrupted; no output was written")
        sys.exit(130)


if __name__ == "__main__":
    main()

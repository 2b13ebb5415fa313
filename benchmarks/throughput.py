"""Training throughput: the stock way against peftlab's fast path, in one process and one run.

For each model shape and technique it trains a few steps three ways on the same synthetic
full-length batches and reports tokens/s, achieved TFLOP/s and peak memory:

- stock fp32:      HF peft on an fp32 base, a plain PyTorch loop (AdamW), as the reference
                   notebooks do;
- stock bf16:      the same with bf16 autocast;
- peftlab:         peftlab's own model building (``method_stage.build_model``: fast-path dtype,
                   fp32 trainable weights, attention kernels, compile / checkpointing if
                   asked) and optimizer (fused AdamW on a GPU) under accelerate's autocast,
                   i.e. exactly what ``peftlab train`` runs per step.

and the ratio of peftlab to the faster stock variant. Full fine-tuning is the reference row.
Randomly initialised weights of the real shapes (speed does not depend on the values).

    python benchmarks/throughput.py                      # roberta-large + Llama-3.2-1B shapes (GPU)
    python benchmarks/throughput.py --small              # tiny shapes: a CPU smoke test (CI)
    python benchmarks/throughput.py --only roberta-large --methods lora,ia3 --json out.json

TFLOP/s counts 6 x params x tokens for full fine-tuning and 4 x frozen params x tokens for
PEFT (forward + activation gradients), as in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

METHODS = ["full", "lora", "ia3", "prefix", "prompt", "ptuning"]
# the reference notebooks' settings (notebooks.md), as method options
OPTIONS = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    "ia3": {},
    "prefix": {"num_virtual_tokens": 20},
    "prompt": {"num_virtual_tokens": 20},
    "ptuning": {"num_virtual_tokens": 20, "encoder_hidden_size": 128},
}


@dataclass
class Shape:
    name: str
    task: str  # seq-cls | causal-lm
    batch: int
    length: int
    config: dict


SHAPES = {
    "roberta-large": Shape("roberta-large", "seq-cls", 32, 128, dict(
        model_type="roberta", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "llama-1b": Shape("llama-1b", "causal-lm", 8, 1024, dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_theta=500000.0)),
}
SMALL = {
    "roberta-large": Shape("roberta-tiny", "seq-cls", 4, 32, dict(
        model_type="roberta", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=300, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1)),
    "llama-1b": Shape("llama-tiny", "causal-lm", 2, 64, dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=True)),
}


def save_base(shape: Shape, folder: Path) -> Path:
    """A randomly initialised model of the shape, saved as the base both ways load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**shape.config, num_labels=2) if shape.task == "seq-cls" else \
        AutoConfig.for_model(**shape.config)
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if shape.task == "seq-cls" else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(folder)
    return folder


def synthetic_batches(shape: Shape, vocab: int, count: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (shape.batch, shape.length), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["labels"] = torch.randint(0, 2, (shape.batch,), generator=generator) if shape.task == "seq-cls" else ids
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, batches, device, warmup: int) -> float:
    """Median seconds per optimizer step after ``warmup`` steps."""
    times = []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        step(batch)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peft_config(method: str, task: str, model_type: str):
    from peftlab.methods import get_method
    from peftlab.tasks import get_task

    return get_method(method).build(get_task(task).peft_task_type, model_type, OPTIONS.get(method, {}))


def stock(shape: Shape, base: Path, method: str, autocast: bool, batches, device, warmup: int):
    """HF peft on an fp32 base, a plain loop: the way the reference notebooks train."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if shape.task == "seq-cls" else AutoModelForCausalLM
    model = auto.from_pretrained(base, dtype=torch.float32)
    if method != "full":
        model = get_peft_model(model, _peft_config(method, shape.task, shape.config["model_type"]))
        from peftlab import compat
        compat.apply_fixes(model)  # prefix tuning on RoBERTa needs it with transformers 5.2x (compat.py)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(batch):
        with cast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, _time_steps(step, batches, device, warmup)


def peftlab_fast(shape: Shape, base: Path, method: str, batches, device, warmup: int, compile_: bool):
    """peftlab's model building, optimizer and accelerate autocast: what `peftlab train` runs per step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from peftlab import build_config, fastpath
    from peftlab.methods import get_method
    from peftlab.tasks import get_task
    from peftlab.method_stage import build_model, mixed_precision
    from peftlab.loop import build_optimizer

    config = build_config({
        "model": {"name": str(base)}, "task": shape.task, "method": {"name": method, "options": OPTIONS.get(method, {})},
        "data": {"train_file": "unused.csv"}, "training": {"compile": compile_, "progress": False},
        "output_dir": "unused"})
    task, spec = get_task(shape.task), get_method(method)
    fast = fastpath.resolve(config.model, config.training, packable=False, prompt_learning=spec.prompt_learning,
                            full=method == "full")
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision(config.training, fast.base_dtype),
                              cpu=device.type == "cpu")
    meta = {"labels": ["0", "1"], "regression": False, "label_kind": "index"} if shape.task == "seq-cls" else \
        {"mode": "completion"}
    model, _, _ = build_model(config, task, spec, meta, _Vocab(shape.config["vocab_size"]), fast)
    optimizer = build_optimizer(model, spec, 1e-5, 0.0, spec.extras(config.method.options), fast.fused_optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step(batch):
        with accelerator.autocast():
            loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, _time_steps(step, batches, device, warmup), fast


class _Vocab:
    """Stands in for a tokenizer where only its length is read (packing probe)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def measure(label: str, run, shape: Shape, device: torch.device) -> dict | None:
    from peftlab.comparison.measure import PeakMemory, release_memory

    release_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as peak:
        out = run()
    model, seconds = out[0], out[1]
    if model is None:
        return None
    total, trainable = _params(model)
    tokens = shape.batch * shape.length
    flops = (6 * total if trainable == total else 4 * (total - trainable)) * tokens / seconds
    row = {"variant": label, "step_ms": seconds * 1000, "tokens_per_s": tokens / seconds, "tflops": flops / 1e12,
           "peak_gib": peak.run_bytes / 2**30, "memory_kind": peak.kind, "trainable": trainable, "total": total}
    if len(out) > 2:
        row["fast_path"] = out[2].record()
    del model, out
    release_memory()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on any device (CI smoke test)")
    parser.add_argument("--only", choices=list(SHAPES), action="append", help="one shape (repeatable)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10, --small 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, --small 1)")
    parser.add_argument("--compile", action="store_true", help="peftlab: torch.compile the base")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    import peft
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (3 if args.small else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: unknown methods {unknown}; choose from {METHODS}", file=sys.stderr)
        return 2
    shapes = [(SMALL if args.small else SHAPES)[name] for name in (args.only or list(SHAPES))]
    environment = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if device.type == "cuda"
                   else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "steps": steps, "warmup": warmup, "compile": args.compile}
    print(json.dumps(environment), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            base = save_base(shape, Path(tmp) / shape.name)
            batches = synthetic_batches(shape, shape.config["vocab_size"], steps + warmup, device)
            for method in methods:
                variants = [("stock fp32", lambda: stock(shape, base, method, False, batches, device, warmup)),
                            ("stock bf16 autocast", lambda: stock(shape, base, method, True, batches, device, warmup)),
                            ("peftlab", lambda: peftlab_fast(shape, base, method, batches, device, warmup,
                                                             args.compile))]
                results = {}
                for label, run in variants:
                    try:
                        row = measure(label, run, shape, device)
                    except Exception as error:  # one failing variant must not hide the others
                        row = {"variant": label, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
                    if row is not None:
                        row |= {"shape": shape.name, "method": method}
                        results[label] = row
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                stock_rows = [r for k, r in results.items() if k.startswith("stock") and "error" not in r]
                fast = results.get("peftlab")
                if fast and "error" not in fast and stock_rows:
                    best = max(stock_rows, key=lambda r: r["tokens_per_s"])
                    fast["speedup_vs_best_stock"] = fast["tokens_per_s"] / best["tokens_per_s"]
                    fast["memory_vs_best_stock"] = fast["peak_gib"] / best["peak_gib"]
                    fast["best_stock"] = best["variant"]
                gc.collect()

    print()
    print(f"| shape | method | variant | step | tokens/s | TFLOP/s | peak memory | vs best stock |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['method']} | {r['variant']} | failed: {r['error'][:60]} | | | | |")
            continue
        ratio = (f"{r['speedup_vs_best_stock']:.2f}x speed, {r['memory_vs_best_stock']:.2f}x memory"
                 if "speedup_vs_best_stock" in r else "")
        unit = "GiB" if r["memory_kind"] == "cuda" else "GiB RSS"
        print(f"| {r['shape']} | {r['method']} | {r['variant']} | {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.2f} | {r['peak_gib']:.2f} {unit} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check for quantized training (QLoRA) against a bf16 base, through peftlab's own pipeline.

Builds a Llama-shaped model from a config (random weights: memory and speed depend on the
shapes, not the values; nothing is downloaded), then trains LoRA on it for a few steps
three times in one process: bf16 base, 8-bit base, 4-bit NF4 base (double quantization,
bf16 compute). For each it records peak GPU memory, seconds per step, the loss at the
first and last step, and checks that the saved adapter reloads on the quantized base and
merges into the bf16 base. Prints a table with the ratios to the bf16 run and writes
results.json and results.md to --out.

    python benchmarks/qlora_check.py --out /tmp/qlora            # ~1.1B parameters
    python benchmarks/qlora_check.py --out /tmp/qlora --layers 4  # quicker

Needs a CUDA GPU and bitsandbytes; on a machine without them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_base(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.testing import _word_tokenizer

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


def run(base: Path, data: dict[str, Path], out: Path, quantization: str, steps: int) -> dict:
    import torch

    from peftlab import build_config, load_adapter, merge, predict, train

    config = build_config({
        "model": {"name": str(base), "dtype": "bfloat16", "quantization": quantization},
        "task": "causal-lm",
        "method": {"name": "lora", "options": {"r": 16, "lora_alpha": 32}},
        "data": {"train_file": str(data["train"]), "validation_file": str(data["validation"]),
                 "target_column": "target", "prompt_template": "review : {text} label :", "max_length": 64,
                 "target_max_length": 4, "max_eval_samples": 32},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": 2e-4, "precision": "bf16",
                     "eval_strategy": "no", "keep": "last", "progress": False, "checkpoint_every": None,
                     "log_every": 5},
        "output_dir": str(out / f"run-{quantization}"),
    })
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(config, overwrite=True)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    losses = result.losses
    row = {"quantization": quantization, "peak_gib": peak / 2**30, "seconds_per_step": seconds / steps,
           "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
           "trainable": result.trainable_params}
    del result
    torch.cuda.empty_cache()
    # the adapter reloads on the same (quantized) base and predicts; it merges into the bf16 base
    loaded = load_adapter(out / f"run-{quantization}")
    row["reload_predicts"] = bool(predict(loaded, texts=["alpha great bravo"])[0]["generated"] is not None)
    del loaded
    merged = merge(out / f"run-{quantization}", out / f"merged-{quantization}", overwrite=True)
    row["merge_max_abs_diff"] = merged.max_abs_diff
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("qlora-check"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("error: this check needs a CUDA GPU (bitsandbytes quantization); this machine has none",
              file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("error: this check needs bitsandbytes: pip install bitsandbytes", file=sys.stderr)
        return 2

    from peftlab.testing import label_text_rows, write_csv

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp) / "base", args.hidden, args.layers, args.vocab)
        data = {"train": write_csv(Path(tmp) / "train.csv", label_text_rows(512, seed=1)),
                "validation": write_csv(Path(tmp) / "validation.csv", label_text_rows(64, seed=2))}
        rows = []
        for quantization in ("none", "8bit", "4bit"):
            try:
                rows.append(run(base, data, args.out, quantization, args.steps))
            except Exception as error:  # record and go on: one failing mode must not hide the others
                rows.append({"quantization": quantization, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(rows[-1]), flush=True)

    reference = next((r for r in rows if r["quantization"] == "none" and "error" not in r), None)
    lines = ["| base | peak GPU memory | vs bf16 | s/step | loss first -> last | reload | merge diff |",
             "|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['quantization']} | failed: {r['error'][:80]} | | | | | |")
            continue
        ratio = r["peak_gib"] / reference["peak_gib"] if reference else float("nan")
        lines.append(f"| {'bf16' if r['quantization'] == 'none' else r['quantization']} | {r['peak_gib']:.2f} GiB | "
                     f"{ratio:.2f}x | {r['seconds_per_step']:.3f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{'ok' if r['reload_predicts'] else 'FAILED'} | {r['merge_max_abs_diff']:.1e} |")
    environment = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d"), "shape": vars(args) | {"out": str(args.out)}}
    import bitsandbytes
    import peft
    import transformers
    environment |= {"transformers": transformers.__version__, "peft": peft.__version__,
                    "bitsandbytes": bitsandbytes.__version__}
    (args.out / "results.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    (args.out / "results.md").write_text("\n".join(lines) + "\n\n" + json.dumps(environment) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

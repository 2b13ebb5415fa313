"""The quickstart on a CPU: peftlab against the stock way, same model, data, steps and seed.

- stock: HF peft LoRA on the fp32 MiniLM encoder, a plain PyTorch loop (AdamW, linear
  schedule with warmup), a shuffled DataLoader padding each batch to its longest row, as
  the reference notebooks train;
- peftlab: ``peftlab.train`` on the quickstart recipe (evaluation only at the end).

Both train ``max_steps`` steps of batch 32 on Rotten Tomatoes and are then scored on the
same held-out rows. Prints training seconds, tokens/s (real tokens, padding excluded),
padded tokens/s and held-out accuracy, and the ratio peftlab / stock.

    python benchmarks/quickstart_cpu.py [--steps 150] [--json out.json]
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


def stock(config, splits, steps: int) -> dict:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, get_scheduler

    from peftlab.offline_models import resolve_model_name
    from peftlab.model import load_tokenizer

    torch.manual_seed(config.training.seed)
    name = resolve_model_name(config.model.name)
    tokenizer = load_tokenizer(config.model)
    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    options = config.method.options
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=options["r"],
                                             lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                                             target_modules=["query", "value"]))
    data = config.data

    def encode(rows):
        return tokenizer(rows[data.text_column], truncation=True, max_length=data.max_length)

    train_set = splits["train"].map(encode, batched=True).rename_column(data.label_column, "labels")
    train_set = train_set.select_columns(["input_ids", "attention_mask", "labels"])
    loader = DataLoader(train_set, batch_size=config.training.batch_size, shuffle=True,
                        collate_fn=DataCollatorWithPadding(tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.training.learning_rate)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(config.training.warmup_ratio * steps),
                              num_training_steps=steps)
    model.train()
    step, real, padded = 0, 0, 0
    start = time.perf_counter()
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - start
    accuracy = _accuracy(model, tokenizer, splits["eval"], data)
    return {"way": "stock", "train_seconds": seconds, "tokens_per_s": real / seconds,
            "padded_tokens_per_s": padded / seconds, "padding_share": 1 - real / padded, "accuracy": accuracy}


def _accuracy(model, tokenizer, rows, data) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            batch = tokenizer(chunk[data.text_column], truncation=True, max_length=data.max_length, padding=True,
                              return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1)
            correct += int((predicted == torch.tensor(chunk[data.label_column])).sum())
    return correct / len(rows)


def fast(config, splits, steps: int) -> dict:
    from peftlab import train

    events = []
    result = train(config, overwrite=True, on_event=lambda kind, data: events.append((kind, data)))
    tokens = [d["tokens"] for kind, d in events if kind == "step"][-1]
    accuracy = _accuracy(result.model, result.tokenizer, splits["eval"], config.data)
    return {"way": "peftlab", "train_seconds": result.train_seconds, "tokens_per_s": tokens / result.train_seconds,
            "accuracy": accuracy, "peftlab_eval_accuracy": result.metrics["accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import peft
    import torch
    import transformers

    from peftlab import load_config, recipe_path
    from peftlab.data import load_splits

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(str(recipe_path("quickstart")), [
            f"output_dir={tmp}/run", f"training.max_steps={args.steps}", "training.progress=false",
            "training.checkpoint_every=null"])
        splits = load_splits(config.data, seed=config.training.seed)
        rows = [stock(config, splits, args.steps), fast(config, splits, args.steps)]
    environment = {"date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "steps": args.steps}
    print(json.dumps(environment))
    for row in rows:
        print(json.dumps(row))
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"peftlab / stock: {rows[0]['train_seconds'] / rows[1]['train_seconds']:.2f}x faster training "
          f"({rows[0]['train_seconds']:.1f} s -> {rows[1]['train_seconds']:.1f} s), tokens/s x{ratio:.2f}, "
          f"held-out accuracy {rows[0]['accuracy']:.3f} (stock) vs {rows[1]['accuracy']:.3f} (peftlab)")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

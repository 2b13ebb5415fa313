"""The offline quickstart: LoRA on MiniLM for Rotten Tomatoes sentiment."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from peftlab.catalog import get_recipe
from peftlab.recipe import load_config
from peftlab.artifacts import load_adapter
from peftlab.data import load_splits
from peftlab.inference import predict
from peftlab.train import train

EXAMPLES = [
    "A moving, beautifully acted film that stays with you long after the credits.",
    "Tedious, predictable and far too long; I checked my watch every ten minutes.",
]


def run(out_dir: str = "runs/quickstart", overrides: list[str] | None = None, overwrite: bool = True,
        console: Console | None = None):
    console = console or Console()
    config = load_config(str(get_recipe("quickstart").path), [f"output_dir={out_dir}", *(overrides or [])])
    console.print(f"[bold]peftlab quickstart[/bold]: LoRA on {config.model.name} (all-MiniLM-L6-v2), "
                  f"Rotten Tomatoes reviews, {config.training.max_steps} steps of batch {config.training.batch_size}")
    result = train(config, overwrite=overwrite, evaluate_before=True)
    metric = result.main_metric
    console.print(f"held-out {metric}: {result.initial_metrics[metric]:.4f} before training -> "
                  f"[bold]{result.metrics[metric]:.4f}[/bold] after "
                  f"({result.trainable_params:,} trainable parameters, {result.train_seconds:.0f} s)")
    console.print(f"adapter saved to {result.output_dir}")

    loaded = load_adapter(result.output_dir)
    test = load_splits(config.data, seed=config.training.seed)["test"].select(range(4))
    names = test.features["label"].names
    texts = EXAMPLES + list(test["text"])
    gold = ["(new)", "(new)"] + [names[i] for i in test["label"]]
    table = Table(title="a few predictions", title_justify="left")
    for column in ("review", "gold", "predicted", "score"):
        table.add_column(column, overflow="fold")
    for record, truth in zip(predict(loaded, texts=texts), gold):
        table.add_row(record["text"], truth, record["label"], f"{record['score']:.3f}")
    console.print(table)
    console.print(f"next: peftlab predict {result.output_dir} --text \"your review\"")
    return result

"""Training: config -> data -> model -> method -> loop -> evaluation -> artifacts.

One function, :func:`train`, reads top to bottom. The loop runs on ``accelerate``
(devices, mixed precision, gradient accumulation); the model and the technique come
from ``transformers`` and ``peft``; the task family supplies data handling and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftlab import artifacts, compat
from peftlab.config import RunConfig, TrainingConfig
from peftlab.data import load_splits
from peftlab.errors import ConfigError, PeftlabError
from peftlab.methods import get_method, linear_layer_names
from peftlab.model import load_model_config, load_tokenizer, max_positions
from peftlab.progress import TrainingProgress
from peftlab.tasks import get_task


LOWER_IS_BETTER = {"loss", "perplexity", "mse"}


@dataclass
class RunResult:
    """What a finished run produced (also written to the output directory)."""

    output_dir: Path
    method: str
    task: str
    main_metric: str
    metrics: dict[str, float]
    initial_metrics: dict[str, float] | None
    history: list[dict[str, Any]]
    trainable_params: int
    total_params: int
    train_seconds: float
    adapter_bytes: int
    notes: list[str] = field(default_factory=list)
    model: PeftModel | None = field(default=None, repr=False)  # the kept adapter, in memory
    tokenizer: Any = field(default=None, repr=False)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, as peft counts them."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def mixed_precision(training: TrainingConfig) -> str:
    if training.precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[training.precision]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("training.tensorboard needs the tensorboard package",
                          "pip install 'peftlab[tensorboard]'") from None
    return SummaryWriter(str(directory))


def train(config: RunConfig, *, overwrite: bool = False, evaluate_before: bool = False,
          on_event: Callable[[str, dict[str, Any]], None] | None = None) -> RunResult:
    """Train an adapter as ``config`` says and write the run directory.

    Args:
        config: a validated run config.
        overwrite: replace an existing, non-empty output directory.
        evaluate_before: also evaluate the untrained adapter (reported as ``initial_metrics``).
        on_event: called with ("evaluation", metrics) etc., for callers that report progress.
    """
    emit = on_event or (lambda kind, data: None)
    out = Path(config.output_dir)
    artifacts.check_output_dir(out, overwrite)
    training = config.training
    set_seed(training.seed)

    # data and task
    task = get_task(config.task)
    spec = get_method(config.method.name)
    task.check_model(load_model_config(config.model), config.model.name)
    tokenizer = load_tokenizer(config.model)
    splits = load_splits(config.data, seed=training.seed)
    meta = task.inspect(splits, config.data)
    main_metric = training.metric_for_best or task.main_metric(meta)

    # model and method
    base = task.load_model(config.model, meta)
    peft_config = spec.build(task.peft_task_type, base.config.model_type, config.method.options)
    try:
        model = get_peft_model(base, peft_config)
    except (ValueError, TypeError, RuntimeError) as error:
        targets = getattr(peft_config, "target_modules", None)
        hint = "set method.options to fit this architecture"
        if targets:
            hint = (f"target_modules={sorted(targets)}; this model's linear layers are named: "
                    f"{', '.join(linear_layer_names(base))}")
        raise PeftlabError(f'method "{spec.name}" cannot be applied to {config.model.name}: '
                           f"{str(error).splitlines()[0]}", hint) from None
    compat.apply_fixes(model)
    trainable, total = count_parameters(model)

    notes: list[str] = []
    reserved = getattr(peft_config, "num_virtual_tokens", 0) if spec.prompt_learning else 0
    max_length = min(config.data.max_length, max_positions(base.config, tokenizer) - reserved)
    if max_length < config.data.max_length:
        notes.append(f"max_length capped at {max_length} (model positions"
                     + (f" minus {reserved} virtual tokens)" if reserved else ")"))
    train_set = task.encode(splits["train"], tokenizer, config.data, meta, max_length, "the train split")
    eval_set = task.encode(splits["eval"], tokenizer, config.data, meta, max_length, "the eval split")
    collate = task.collator(tokenizer)
    generator = torch.Generator().manual_seed(training.seed)
    if training.group_by_length:
        sampler = LengthGroupedSampler(training.batch_size, lengths=[len(ids) for ids in train_set["input_ids"]],
                                       generator=generator)
        train_loader = DataLoader(train_set, batch_size=training.batch_size, sampler=sampler, collate_fn=collate)
    else:
        train_loader = DataLoader(train_set, batch_size=training.batch_size, shuffle=True, collate_fn=collate,
                                  generator=generator)

    # optimisation
    steps_per_epoch = max(1, math.ceil(len(train_loader) / training.gradient_accumulation_steps))
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    warmup = training.warmup_steps if training.warmup_steps is not None else int(training.warmup_ratio * total_steps)
    accelerator = Accelerator(mixed_precision=mixed_precision(training),
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    optimizer = torch.optim.AdamW(_param_groups(model, training.weight_decay), lr=training.learning_rate)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    trainable_params = [p for p in model.parameters() if p.requires_grad]

    history: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor], dict[str, Any]] | None = None
    initial = None

    with artifacts.staging_dir(out, overwrite) as staging:
        writer = _tensorboard(staging / "tensorboard") if training.tensorboard else None

        def evaluate_now() -> dict[str, float]:
            with accelerator.autocast():
                return task.evaluate(model, tokenizer, splits["eval"], eval_set, config.data, meta, max_length,
                                     training.eval_batch_size)

        def run_eval(step: int, epoch: float) -> dict[str, Any]:
            nonlocal best
            metrics = evaluate_now()
            if main_metric not in metrics:
                raise ConfigError(f'training.metric_for_best "{main_metric}" is not a metric of this task',
                                  f"metrics: {', '.join(metrics)}")
            entry = {"step": step, "epoch": round(epoch, 3), **metrics}
            history.append(entry)
            if writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{key}", value, step)
            score = -metrics[main_metric] if main_metric in LOWER_IS_BETTER else metrics[main_metric]
            if training.keep == "best" and (best is None or score > best[0]):
                best = (score, _trainable_state(model), entry)
            emit("evaluation", entry)
            model.train()
            return entry

        if evaluate_before:
            initial = evaluate_now()
            emit("initial", initial)

        model.train()
        step, epoch, started = 0, 0, time.perf_counter()
        last_eval_step = -1
        with TrainingProgress(total_steps, enabled=training.progress) as progress:
            while step < total_steps:
                for batch in train_loader:
                    with accelerator.accumulate(model):
                        loss = model(**batch).loss
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and training.max_grad_norm:
                            accelerator.clip_grad_norm_(trainable_params, training.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch[
                        "input_ids"].numel()
                    progress.add(loss.item(), tokens, accelerator.sync_gradients)
                    if not accelerator.sync_gradients:
                        continue
                    step += 1
                    emit("step", {"step": step, "loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0],
                                  "tokens": progress.tokens, "seconds": time.perf_counter() - started})
                    if writer and step % training.log_every == 0:
                        writer.add_scalar("train/loss", progress.recent_loss, step)
                        writer.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], step)
                    if training.eval_strategy == "steps" and step % training.eval_steps == 0:
                        progress.log_eval(run_eval(step, step / steps_per_epoch), main_metric)
                        last_eval_step = step
                    if step >= total_steps:
                        break
                epoch += 1
                if training.eval_strategy == "epoch" and last_eval_step != step:
                    progress.log_eval(run_eval(step, step / steps_per_epoch), main_metric)
                    last_eval_step = step
            train_seconds = time.perf_counter() - started
            if last_eval_step != step:
                progress.log_eval(run_eval(step, step / steps_per_epoch), main_metric)

        unwrapped: PeftModel = accelerator.unwrap_model(model)
        final = history[-1]
        if training.keep == "best" and best is not None:
            with torch.no_grad():
                for name, param in unwrapped.named_parameters():
                    if name in best[1]:
                        param.copy_(best[1][name].to(param.device))
            final = best[2]
        metrics = {k: v for k, v in final.items() if k not in {"step", "epoch"}}
        record = {
            "task": config.task, "method": spec.name, "meta": meta, "main_metric": main_metric,
            "trainable_params": trainable, "total_params": total, "train_seconds": round(train_seconds, 2),
            "steps": step, "kept": {"which": training.keep, **{k: final[k] for k in ("step", "epoch")}},
            "max_length": max_length, "precision": mixed_precision(training), "notes": notes,
        }
        artifacts.save_run(staging, unwrapped, tokenizer, config, record,
                           {**metrics, "initial": initial, "history": history})
        if writer:
            writer.close()
        adapter_bytes = (staging / artifacts.ADAPTER_WEIGHTS).stat().st_size

    return RunResult(output_dir=out, method=spec.name, task=config.task, main_metric=main_metric,
                     metrics=metrics, initial_metrics=initial, history=history, trainable_params=trainable,
                     total_params=total, train_seconds=train_seconds, adapter_bytes=adapter_bytes, notes=notes,
                     model=unwrapped.eval(), tokenizer=tokenizer)

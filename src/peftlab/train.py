"""Training: config -> data -> model -> method -> loop -> evaluation -> artifacts.

One function, :func:`train`, reads top to bottom. The loop runs on ``accelerate``
(devices, mixed precision, gradient accumulation); the model and the technique come
from ``transformers`` and ``peft``; the task family supplies data handling and metrics.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from peft import PeftModel
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftlab import artifacts, checkpoint, fastpath, placement
from peftlab.checkpoint import TrainingInterrupted, TrainingState
from peftlab.config import RunConfig
from peftlab.data import load_splits
from peftlab.errors import ConfigError, PeftlabError
from peftlab.method_stage import build_model, count_parameters, mixed_precision
from peftlab.methods import MethodSpec, get_method
from peftlab.model import load_model_config, load_tokenizer, max_positions
from peftlab.progress import TrainingProgress
from peftlab.tasks import get_task
from peftlab.tasks.base import LOWER_IS_BETTER




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
    losses: list[dict[str, Any]] = field(default_factory=list)  # training loss every log_every steps
    model: PeftModel | None = field(default=None, repr=False)  # the kept adapter (or full model), in memory
    tokenizer: Any = field(default=None, repr=False)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, spec: MethodSpec, learning_rate: float, weight_decay: float,
                    extras: dict[str, Any], fused: bool) -> torch.optim.Optimizer:
    """The technique's own optimizer where it has one (LoRA+: its parameter groups), else AdamW (fused on GPUs)."""
    if spec.make_optimizer:
        return spec.make_optimizer(model, learning_rate, weight_decay, extras)
    return fastpath.optimizer(_param_groups(model, weight_decay), learning_rate, fused)


def _trainable_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the (gathered) trainable weights."""
    return {n: t.detach().to("cpu", copy=True) for n, t in checkpoint.trainable_weights(accelerator, model).items()}


class EpochSampler(Sampler[int]):
    """Shuffles each epoch from (seed, epoch) alone, so a resumed run replays the same order.

    With ``group_by_length`` rows of similar length share a batch (less padding, same data).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group_by_length = lengths, batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=generator))
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())


class _StopRequest:
    """Turns the first Ctrl-C into a request to checkpoint and stop at the next step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


def _tensorboard(directory: Path, first_step: int = 0):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("training.tensorboard needs the tensorboard package",
                          "pip install 'peftlab[tensorboard]'") from None
    return SummaryWriter(str(directory), purge_step=first_step or None)


@contextmanager
def _training_rng_kept():
    """Restore torch's CPU (and current GPU) random state on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _sharded(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in {DistributedType.FSDP, DistributedType.DEEPSPEED}


def _distributed_cpu() -> bool:
    """Several processes launched without GPUs: accelerate must be told to use gloo on the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _resume_point(config: RunConfig, resume: bool, overwrite: bool, main_process: bool) -> Path | None:
    """The checkpoint to resume from, after refusing to silently mix runs."""
    root = checkpoint.directory_for(config)
    found = checkpoint.latest(root)
    if resume:
        if found is None:
            raise PeftlabError(f"there is no checkpoint to resume in {root}", "start the run without --resume")
        return found
    if found is not None:
        if not overwrite:
            raise PeftlabError(f"{root} holds checkpoints of an unfinished run (latest: {found.name})",
                               "continue it with --resume, or start over with --overwrite")
        if main_process:
            checkpoint.clear(root)
    return None


def _check_placement(model_cfg) -> None:
    """Device maps and disk offload are for inference; a quantized base is how a big one trains."""
    if placement.uses_placement(model_cfg):
        raise ConfigError("model.device_map / max_memory / offload_folder spread a base over devices for eval, "
                          "predict and serve; training keeps the base on the training device",
                          "drop them from the training config (pass them to eval / predict instead), or fit a "
                          "big base with model.quantization: 4bit (QLoRA)")
    placement.check_quantization(model_cfg)  # before any data is read: no GPU / no bitsandbytes


def train(config: RunConfig, *, overwrite: bool = False, resume: bool = False, evaluate_before: bool = False,
          on_event: Callable[[str, dict[str, Any]], None] | None = None) -> RunResult:
    """Train an adapter (or, with method ``full``, the whole model) as ``config`` says and write the run directory.

    Args:
        config: a validated run config.
        overwrite: replace an existing, non-empty output directory (and unfinished checkpoints).
        resume: continue from the latest checkpoint of this run (same config; see peftlab.checkpoint).
        evaluate_before: also evaluate the untrained adapter (reported as ``initial_metrics``).
        on_event: called with ("step", {step, loss, ...}), ("evaluation", metrics) and ("checkpoint", {step, path}),
            for callers that report progress.
    """
    config = config.with_absolute_paths()  # the saved run (and its adapter_config.json) works from anywhere
    out = Path(config.output_dir)
    artifacts.check_output_dir(out, overwrite)
    _check_placement(config.model)
    training = config.training
    task = get_task(config.task)
    spec = get_method(config.method.name)
    fast = fastpath.resolve(config.model, training, packable=hasattr(task, "packed_collator"),
                            prompt_learning=spec.prompt_learning, full=spec.name == "full")
    precision = mixed_precision(training, fast.base_dtype)
    # accelerate keeps one precision per process; a process that trains several runs (compare, notebooks)
    # needs each run's own (the process group, PartialState, is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=_distributed_cpu(),
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    main_process = accelerator.is_main_process
    emit = (on_event if main_process else None) or (lambda kind, data: None)
    resume_from = _resume_point(config, resume, overwrite, main_process)
    accelerator.wait_for_everyone()
    set_seed(training.seed)

    # data and task
    task.check_model(load_model_config(config.model), config.model.name)
    tokenizer = load_tokenizer(config.model)
    with accelerator.main_process_first():  # the others then reuse the main process's dataset cache
        splits = load_splits(config.data, seed=training.seed)
    meta = task.inspect(splits, config.data)
    main_metric = training.metric_for_best or task.main_metric(meta)

    # model and method
    model, base, peft_config = build_model(config, task, spec, meta, tokenizer, fast)
    trainable, total = count_parameters(model)
    extras = spec.extras(config.method.options)
    # PiSSA / OLoRA: the adapter's starting values, to save the trained update as a LoRA of the original base
    initial_adapter = artifacts.initial_adapter_state(model) if spec.converts_on_save else None

    notes: list[str] = list(fast.notes)
    reserved = getattr(peft_config, "num_virtual_tokens", 0) if spec.prompt_learning else 0
    max_length = min(config.data.max_length, max_positions(base.config, tokenizer) - reserved)
    if max_length < config.data.max_length:
        notes.append(f"max_length capped at {max_length} (model positions"
                     + (f" minus {reserved} virtual tokens)" if reserved else ")"))
    with accelerator.main_process_first():
        train_set = task.encode(splits["train"], tokenizer, config.data, meta, max_length, "the train split")
        eval_set = task.encode(splits["eval"], tokenizer, config.data, meta, max_length, "the eval split")
    sampler = EpochSampler([len(ids) for ids in train_set["input_ids"]], training.batch_size, training.seed,
                           training.group_by_length)
    # its own generator: starting an epoch must not draw from the global RNG (dropout), or a resumed run diverges
    train_loader = DataLoader(train_set, batch_size=training.batch_size, sampler=sampler,
                              collate_fn=task.packed_collator(tokenizer) if fast.packing else task.collator(tokenizer),
                              generator=torch.Generator().manual_seed(training.seed))

    # optimisation
    optimizer = build_optimizer(model, spec, training.learning_rate, training.weight_decay, extras,
                                fast.fused_optimizer)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / training.gradient_accumulation_steps))
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    if spec.on_schedule:  # e.g. AdaLoRA: its rank schedule follows the step budget
        notes += spec.on_schedule(accelerator.unwrap_model(model), total_steps, config.method.options)
    warmup = training.warmup_steps if training.warmup_steps is not None else int(training.warmup_ratio * total_steps)
    # not prepared: accelerate would step it once per process, we step it once per optimizer step
    scheduler = get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    unwrapped: PeftModel = accelerator.unwrap_model(model)

    checkpoint_every = training.checkpoint_every
    if _sharded(accelerator) and spec.converts_on_save:
        raise ConfigError(f'method "{spec.name}" is not supported under FSDP / DeepSpeed yet: its adapter is converted '
                          "to a plain LoRA on save, which needs the whole model in one process",
                          "use lora or dora there, or train on one process / DDP")
    if _sharded(accelerator):
        if resume_from is not None:
            raise ConfigError("--resume works for single-process and DDP runs, not yet under FSDP or DeepSpeed",
                              "restart the run with --overwrite (docs/training.md)")
        checkpoint_every = None
        notes.append("periodic checkpoints are off under FSDP / DeepSpeed (not supported yet)")
    state = TrainingState()
    if resume_from is not None:
        state = checkpoint.restore(resume_from, accelerator, model, optimizer, scheduler, config, spec)
        notes.append(f"resumed from {resume_from} (step {state.step})")
    checkpoints = checkpoint.directory_for(config)
    initial = None

    staging_context = artifacts.staging_dir(out, overwrite) if main_process else _no_staging()
    with staging_context as staging:
        writer = _tensorboard(staging / "tensorboard", state.step) if training.tensorboard and staging else None

        def evaluate_now() -> dict[str, float]:
            # evaluation must not draw from the training's random streams (a DataLoader draws a seed, sampling
            # draws tokens): a run with evaluations trains exactly as one without
            with _training_rng_kept(), accelerator.autocast():
                return task.evaluate(unwrapped, tokenizer, splits["eval"], eval_set, config.data, meta, max_length,
                                     training.eval_batch_size)

        def run_eval() -> None:
            metrics = evaluate_now()
            if main_metric not in metrics:
                raise ConfigError(f'training.metric_for_best "{main_metric}" is not a metric of this task',
                                  f"metrics: {', '.join(metrics)}")
            entry = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3), **metrics}
            state.history.append(entry)
            if writer:
                for key, value in metrics.items():
                    writer.add_scalar(f"eval/{key}", value, state.step)
            score = -metrics[main_metric] if main_metric in LOWER_IS_BETTER else metrics[main_metric]
            if training.keep == "best" and (state.best_score is None or score > state.best_score):
                state.best_score, state.best_weights, state.best_entry = score, _trainable_state(accelerator, model), entry
            emit("evaluation", entry)
            progress.log_eval(entry, main_metric)
            model.train()

        def save_checkpoint() -> Path:
            state.seconds = elapsed()
            path = checkpoint.save(checkpoints, accelerator, model, optimizer, scheduler, state, config,
                                   training.checkpoint_keep, spec)
            emit("checkpoint", {"step": state.step, "path": str(path)})
            return path

        if evaluate_before and resume_from is None:
            initial = evaluate_now()
            emit("initial", initial)

        model.train()
        static_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        started, seconds_before = time.perf_counter(), state.seconds

        def elapsed() -> float:  # training time, including the time before a resume
            return seconds_before + time.perf_counter() - started

        evaluated = {entry["step"] for entry in state.history}
        with TrainingProgress(total_steps, enabled=training.progress and main_process, completed=state.step) \
                as progress, _StopRequest() as stop:
            step_losses: list[float] = []
            while state.step < total_steps:
                train_loader.set_epoch(state.epoch)
                batches = accelerator.skip_first_batches(train_loader, state.batch) if state.batch else train_loader
                for batch in batches:
                    state.batch += 1
                    with accelerator.accumulate(model):
                        loss = model(**batch).loss
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and training.max_grad_norm:
                            accelerator.clip_grad_norm_(trainable_params, training.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients and spec.on_step:  # e.g. AdaLoRA's rank allocation
                            spec.on_step(unwrapped, state.step + 1)
                        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch[
                        "input_ids"].numel()
                    state.tokens += tokens
                    step_losses.append(loss.item())
                    progress.add(step_losses[-1], tokens, accelerator.sync_gradients)
                    if not accelerator.sync_gradients:
                        continue
                    state.step += 1
                    step_loss, step_losses = sum(step_losses) / len(step_losses), []
                    end_of_epoch = state.batch >= len(train_loader)
                    if end_of_epoch:
                        state.epoch, state.batch = state.epoch + 1, 0
                    emit("step", {"step": state.step, "loss": step_loss, "learning_rate": scheduler.get_last_lr()[0],
                                  "tokens": state.tokens, "seconds": elapsed()})
                    state.unlogged.append(step_loss)
                    if state.step % training.log_every == 0:
                        logged = {"step": state.step, "loss": sum(state.unlogged) / len(state.unlogged),
                                  "learning_rate": scheduler.get_last_lr()[0]}
                        state.losses.append(logged)
                        state.unlogged = []
                        if writer:
                            writer.add_scalar("train/loss", logged["loss"], state.step)
                            writer.add_scalar("train/learning_rate", scheduler.get_last_lr()[0], state.step)
                    if ((training.eval_strategy == "steps" and state.step % training.eval_steps == 0)
                            or (training.eval_strategy == "epoch" and end_of_epoch)):
                        run_eval()
                        evaluated.add(state.step)
                    if stop.agreed(accelerator):
                        path = save_checkpoint()
                        raise TrainingInterrupted(
                            f"interrupted at step {state.step} of {total_steps}; checkpoint saved in {path}",
                            "continue with the same command plus --resume")
                    if checkpoint_every and state.step % checkpoint_every == 0 \
                            and state.step < total_steps:
                        save_checkpoint()
                    if state.step >= total_steps:
                        break
                else:  # the epoch ran out (normally handled at its last step)
                    if state.batch:
                        state.epoch, state.batch = state.epoch + 1, 0
            train_seconds = elapsed()
            hint = fastpath.batch_size_hint(training.batch_size, static_bytes) if main_process else None
            if hint:
                notes.append(hint)
            if state.step not in evaluated:
                run_eval()

        final = state.history[-1]
        weights = checkpoint.trainable_weights(accelerator, model)  # gathered on every process
        if training.keep == "best" and state.best_weights is not None:
            final, weights = state.best_entry, state.best_weights
            if not _sharded(accelerator):  # the in-memory model (RunResult.model) is the kept one too
                with torch.no_grad():
                    for name, param in unwrapped.named_parameters():
                        if name in weights:
                            param.copy_(weights[name].to(param.device))
        if spec.finalize and not _sharded(accelerator):  # e.g. AdaLoRA: the kept weights under the final rank budget
            notes += spec.finalize(unwrapped)
            weights = checkpoint.trainable_weights(accelerator, model)
        metrics = {k: v for k, v in final.items() if k not in {"step", "epoch"}}
        if staging is not None:
            record = {
                "task": config.task, "method": spec.name, "meta": meta, "main_metric": main_metric,
                "trainable_params": trainable, "total_params": total, "train_seconds": round(train_seconds, 2),
                "steps": state.step, "kept": {"which": training.keep, **{k: final[k] for k in ("step", "epoch")}},
                "max_length": max_length, "precision": precision, "fast_path": fast.record(),
                "num_processes": accelerator.num_processes, "notes": notes,
            }
            if spec.full and not _sharded(accelerator):
                weights = None  # the kept weights are in the model (copied above): save it whole, buffers included
            artifacts.save_run(staging, unwrapped, tokenizer, config, record,
                               {**metrics, "initial": initial, "history": state.history, "losses": state.losses},
                               state_dict=weights, initial_adapter=initial_adapter)
            if writer:
                writer.close()
            adapter_bytes = artifacts.weights_bytes(staging)
    accelerator.wait_for_everyone()
    if main_process:
        checkpoint.clear(checkpoints)
    else:
        adapter_bytes = 0

    return RunResult(output_dir=out, method=spec.name, task=config.task, main_metric=main_metric,
                     metrics=metrics, initial_metrics=initial, history=state.history, trainable_params=trainable,
                     total_params=total, train_seconds=train_seconds, adapter_bytes=adapter_bytes, notes=notes,
                     losses=state.losses, model=unwrapped.eval(), tokenizer=tokenizer)


@contextmanager
def _no_staging():
    """Processes other than the main one write nothing."""
    yield None

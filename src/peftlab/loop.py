"""The training loop: batches -> loss -> optimizer step, over an accelerate-prepared model.

:func:`fit` runs the steps of one run: gradient accumulation, clipping, the technique's
per-step hook (the loop never names a technique), the learning-rate schedule, the loss curve,
evaluations (:class:`peftlab.evaluation.Evaluator`), checkpoints and Ctrl-C
(:class:`peftlab.checkpoint.Checkpointer`, :class:`~peftlab.checkpoint.StopRequest`). The
pieces a loop is made of (data order, optimizer, schedule) are here too, so the throughput
benchmark builds exactly what ``peftlab train`` runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftlab import fastpath
from peftlab.checkpoint import Checkpointer, StopRequest, TrainingState
from peftlab.config import TrainingConfig
from peftlab.evaluation import Evaluator
from peftlab.methods import MethodSpec
from peftlab.progress import TrainingProgress


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


def data_loader(encoded, training: TrainingConfig, collate: Callable) -> DataLoader:
    """The training batches in the resumable order of :class:`EpochSampler`."""
    sampler = EpochSampler([len(ids) for ids in encoded["input_ids"]], training.batch_size, training.seed,
                           training.group_by_length)
    # its own generator: starting an epoch must not draw from the global RNG (dropout), or a resumed run diverges
    return DataLoader(encoded, batch_size=training.batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(training.seed))


def _param_groups(model: torch.nn.Module, weight_decay: float, learning_rate: float,
                  new_weights: tuple[set[str], float] | None = None) -> list[dict[str, Any]]:
    """AdamW's groups: weight decay on matrices only; the weights the checkpoint lacked (``new_weights``: their
    parameter names and rate) at their own rate."""
    names, new_rate = new_weights or (set(), learning_rate)
    groups = {(True, False): [], (False, False): []}  # decay, no decay: always there (checkpoints hold both)
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = not (param.ndim < 2 or "norm" in name.lower())
            groups.setdefault((decays, name in names), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": new_rate if new else learning_rate} for (decays, new), params in groups.items()]


def build_optimizer(model: torch.nn.Module, spec: MethodSpec, learning_rate: float, weight_decay: float,
                    extras: dict[str, Any], fused: bool,
                    new_weights: tuple[set[str], float] | None = None) -> torch.optim.Optimizer:
    """The technique's own optimizer where it has one (LoRA+: its parameter groups), else AdamW (fused on GPUs);
    ``new_weights``: the names of the parameters that train at their own rate, and that rate."""
    if spec.make_optimizer:
        return spec.make_optimizer(model, learning_rate, weight_decay, extras)
    return fastpath.optimizer(_param_groups(model, weight_decay, learning_rate, new_weights), learning_rate, fused)


def total_steps(training: TrainingConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(steps per epoch, steps of the run): ``max_steps``, else ``epochs`` of optimizer steps."""
    per_epoch = max(1, math.ceil(batches_per_epoch / training.gradient_accumulation_steps))
    return per_epoch, training.max_steps or max(1, math.ceil(training.epochs * per_epoch))


def build_scheduler(training: TrainingConfig, optimizer: torch.optim.Optimizer, steps: int):
    """The learning-rate schedule over ``steps`` optimizer steps, with its warmup."""
    warmup = training.warmup_steps if training.warmup_steps is not None else int(training.warmup_ratio * steps)
    return get_scheduler(training.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


class Clock:
    """Training time, counting what a resumed run had trained before."""

    def __init__(self, before: float = 0.0):
        self.before, self.started = before, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)


@dataclass
class Loop:
    """What one run's loop runs on (``model``, ``optimizer``, ``loader`` as accelerate prepared them)."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # not prepared: accelerate would step it once per process, we step it once per optimizer step
    loader: DataLoader
    spec: MethodSpec
    training: TrainingConfig
    steps_per_epoch: int
    total_steps: int
    # the training loss as loss(model, batch) (a classifier's class weights); None: the model's own loss
    loss: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None


@dataclass
class Fitted:
    seconds: float  # training time (with the time before a resume), without the final evaluation
    notes: list[str]  # for the run record (a batch-size hint; the loss function's notes: a frozen reference's memory)


def fit(loop: Loop, state: TrainingState, evaluator: Evaluator, checkpointer: Checkpointer, clock: Clock,
        emit: Callable[[str, dict[str, Any]], None], tracker=None) -> Fitted:
    """Train from ``state`` to ``loop.total_steps``, evaluating as ``training.eval_strategy`` says and once at
    the end (unless the last step was just evaluated); ``tracker`` (:class:`peftlab.tracking.Tracking`) gets the
    loss curve."""
    accelerator, model, training = loop.accelerator, loop.model, loop.training
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    evaluated = {entry["step"] for entry in state.history}
    model.train()
    static_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    clock.start()
    with TrainingProgress(loop.total_steps, enabled=training.progress and accelerator.is_main_process,
                          completed=state.step) as progress, StopRequest() as stop:
        def show(entry: dict[str, Any]) -> None:
            progress.log_eval(entry, evaluator.main_metric)

        evaluator.listeners.append(show)
        step_losses: list[float] = []
        while state.step < loop.total_steps:
            loop.loader.set_epoch(state.epoch)
            batches = accelerator.skip_first_batches(loop.loader, state.batch) if state.batch else loop.loader
            for batch in batches:
                state.batch += 1
                with accelerator.accumulate(model):
                    loss = loop.loss(model, batch) if loop.loss else model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and training.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
                    loop.optimizer.step()
                    if accelerator.sync_gradients and loop.spec.on_step:  # e.g. AdaLoRA's rank allocation
                        loop.spec.on_step(unwrapped, state.step + 1)
                    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                        loop.scheduler.step()
                    loop.optimizer.zero_grad(set_to_none=True)
                tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                state.tokens += tokens
                step_losses.append(loss.item())
                progress.add(step_losses[-1], tokens, accelerator.sync_gradients)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                step_loss, step_losses = sum(step_losses) / len(step_losses), []
                end_of_epoch = state.batch >= len(loop.loader)
                if end_of_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0
                learning_rate = loop.scheduler.get_last_lr()[0]
                emit("step", {"step": state.step, "loss": step_loss, "learning_rate": learning_rate,
                              "tokens": state.tokens, "seconds": clock()})
                _log_loss(state, step_loss, learning_rate, training.log_every, tracker,
                          getattr(loop.loss, "logged", None))
                if ((training.eval_strategy == "steps" and state.step % training.eval_steps == 0)
                        or (training.eval_strategy == "epoch" and end_of_epoch)):
                    evaluator.record(state, loop.steps_per_epoch)
                    evaluated.add(state.step)
                checkpointer.after_step(state, loop.total_steps, stop)
                if state.step >= loop.total_steps:
                    break
            else:  # the epoch ran out (normally handled at its last step)
                if state.batch:
                    state.epoch, state.batch = state.epoch + 1, 0
        seconds = clock()
        hint = fastpath.batch_size_hint(training.batch_size, static_bytes) if accelerator.is_main_process else None
        if state.step not in evaluated:
            evaluator.record(state, loop.steps_per_epoch)
        evaluator.listeners.remove(show)
    return Fitted(seconds, ([hint] if hint else []) + list(getattr(loop.loss, "notes", [])))


def _log_loss(state: TrainingState, loss: float, learning_rate: float, every: int, tracker,
              loss_values: Callable[[], dict[str, float]] | None = None) -> None:
    """The loss curve: the mean step loss of every ``every`` steps (also to the trackers, training.report_to), with
    the values the loss function logs since the last entry (``loss.logged()``: a preference objective's rewards)."""
    state.unlogged.append(loss)
    if state.step % every:
        return
    logged = {"step": state.step, "loss": sum(state.unlogged) / len(state.unlogged), "learning_rate": learning_rate,
              **(loss_values() if loss_values else {})}
    state.losses.append(logged)
    state.unlogged = []
    if tracker:
        tracker.log(state.step, {f"train/{k}": v for k, v in logged.items() if k != "step"})

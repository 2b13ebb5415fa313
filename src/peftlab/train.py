"""Training: config -> data -> model -> method -> loop -> evaluation -> artifacts.

:func:`train` reads as setup -> fit -> finish:

- setup (:func:`prepare`): the accelerator, the data through the task family, the base with the
  technique on top (:mod:`peftlab.method_stage`), optimizer, schedule, a resumed loop state;
- fit (:func:`peftlab.loop.fit`): the steps, with evaluations (:mod:`peftlab.evaluation`),
  checkpoints and Ctrl-C (:mod:`peftlab.checkpoint`) as units of their own;
- finish (:func:`_finish`): the kept weights, the technique's finalize hook, the run directory.

The loop runs on ``accelerate`` (devices, mixed precision, gradient accumulation); the model
and the technique come from ``transformers`` and ``peft``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from peft import PeftModel

from peftlab import artifacts, checkpoint, fastpath, placement, tracking
from peftlab.checkpoint import Checkpointer, TrainingState
from peftlab.config import RunConfig
from peftlab.data import load_splits
from peftlab.errors import ConfigError, PeftlabError
from peftlab.evaluation import Evaluator
from peftlab.loop import Clock, Fitted, Loop, build_optimizer, build_scheduler, data_loader, fit, total_steps
from peftlab.method_stage import build_model, count_parameters, mixed_precision, new_weight_names, new_weights_rate
from peftlab.methods import MethodSpec, get_method
from peftlab.model import load_model_config, load_tokenizer, max_positions
from peftlab.progress import warn
from peftlab.tasks import balance, get_task, run_meta


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


@dataclass
class Prepared:
    """A run set up to train: what :func:`peftlab.loop.fit` runs and what :func:`_finish` saves."""

    config: RunConfig
    spec: MethodSpec
    task: Any
    meta: dict[str, Any]
    tokenizer: Any
    loop: Loop
    evaluator: Evaluator
    state: TrainingState
    resumed: bool
    precision: str
    fast: fastpath.FastPath
    max_length: int
    trainable: int
    total: int
    notes: list[str]
    initial_adapter: dict[str, torch.Tensor] | None  # PiSSA / OLoRA: the starting values, for the conversion
    class_weights: dict[str, float] | None = None  # training.class_weights resolved per label (None: unweighted)
    split_rows: dict[str, int] = field(default_factory=dict)  # rows per split: train, eval[, test]

    @property
    def accelerator(self) -> Accelerator:
        return self.loop.accelerator

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.loop.model)


def train(config: RunConfig, *, overwrite: bool = False, resume: bool = False, evaluate_before: bool = False,
          on_event: Callable[[str, dict[str, Any]], None] | None = None, experiment: str | None = None) -> RunResult:
    """Train an adapter (or, with method ``full``, the whole model) as ``config`` says and write the run directory.

    Args:
        config: a validated run config.
        overwrite: replace an existing, non-empty output directory (and unfinished checkpoints).
        resume: continue from the latest checkpoint of this run (same config; see peftlab.checkpoint).
        evaluate_before: also evaluate the untrained adapter (reported as ``initial_metrics``).
        on_event: called with ("step", {step, loss, ...}), ("evaluation", metrics) and ("checkpoint", {step, path}),
            for callers that report progress.
        experiment: the group of runs this one belongs to in the trackers of ``training.report_to`` (MLflow's
            experiment, W&B's group); ``peftlab compare`` passes its folder's name.
    """
    config = config.with_absolute_paths()  # the saved run (and its adapter_config.json) works from anywhere
    out = Path(config.output_dir)
    artifacts.check_output_dir(out, overwrite)
    _check_placement(config.model)
    trackers = tracking.trackers(config.training.report_to)  # a missing package fails here, before any work
    run = prepare(config, resume=resume, overwrite=overwrite)
    main_process = run.accelerator.is_main_process
    emit = (on_event if main_process else None) or (lambda kind, data: None)
    checkpoints = checkpoint.directory_for(config)
    with artifacts.staging_dir(out, overwrite) if main_process else _no_staging() as staging, \
            trackers if main_process else tracking.Tracking() as tracker:
        if tracker:
            tracker.start(tracking.RunInfo(out.name, out, staging, experiment, {"method": run.spec.name,
                                           "task": config.task}, run.state.step, dict(run.state.trackers)),
                          tracking.params(config))
            run.state.trackers = tracker.ids  # saved with each checkpoint: a resumed run continues these
        run.evaluator.listeners[:] = [tracker.evaluation, lambda entry: emit("evaluation", entry)]
        initial = None
        if evaluate_before and not run.resumed:
            initial = run.evaluator.evaluate()
            tracker.evaluation({"step": 0, **initial})
            emit("initial", initial)
        clock = Clock(run.state.seconds)
        every = None if _sharded(run.accelerator) else config.training.checkpoint_every
        checkpointer = Checkpointer(checkpoints, run.accelerator, run.loop.model, run.loop.optimizer,
                                    run.loop.scheduler, config, run.spec, every, config.training.checkpoint_keep,
                                    clock, lambda step, path: emit("checkpoint", {"step": step, "path": str(path)}))
        fitted = fit(run.loop, run.state, run.evaluator, checkpointer, clock, emit, tracker)
        metrics, adapter_bytes, notes = _finish(run, fitted, staging, initial)
        tracker.finish(staging, run.state.step, metrics)  # the saved run directory as artifacts (before the rename)
    run.accelerator.wait_for_everyone()
    if main_process:
        checkpoint.clear(checkpoints)
    return RunResult(output_dir=out, method=run.spec.name, task=config.task, main_metric=run.evaluator.main_metric,
                     metrics=metrics, initial_metrics=initial, history=run.state.history,
                     trainable_params=run.trainable, total_params=run.total, train_seconds=fitted.seconds,
                     adapter_bytes=adapter_bytes, notes=notes + tracker.notes,
                     losses=run.state.losses, model=run.unwrapped.eval(), tokenizer=run.tokenizer)


def prepare(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Prepared:
    """Everything a run trains with: accelerator, data, model + technique, optimizer, schedule, loop state."""
    training = config.training
    task = get_task(config.task)
    spec = get_method(config.method.name)
    fast = fastpath.resolve(config.model, training, packable=task.packs,
                            prompt_learning=spec.prompt_learning, full=spec.name == "full")
    precision = mixed_precision(training, fast.base_dtype)
    # accelerate keeps one precision per process; a process that trains several runs (compare, notebooks)
    # needs each run's own (the process group, PartialState, is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=_distributed_cpu(),
                              gradient_accumulation_steps=training.gradient_accumulation_steps)
    resume_from = _resume_point(config, resume, overwrite, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(training.seed)

    # data and task
    task.check_model(load_model_config(config.model), config.model.name)
    tokenizer = load_tokenizer(config.model)
    with accelerator.main_process_first():  # the others then reuse the main process's dataset cache
        splits = load_splits(config.data, seed=training.seed)
    meta = run_meta(task, splits, config)
    loss, weights, balance_notes = _class_balance(config, task, splits["train"], meta, accelerator.is_main_process)
    loss = loss or task.training_loss(meta)  # class weights, else the family's own loss (None: the model's)

    # model and method
    model, base, peft_config = build_model(config, task, spec, meta, tokenizer, fast)
    trainable, total = count_parameters(model)
    initial_adapter = artifacts.initial_adapter_state(model) if spec.converts_on_save else None
    notes: list[str] = list(fast.notes) + balance_notes
    reserved = getattr(peft_config, "num_virtual_tokens", 0) if spec.prompt_learning else 0
    max_length = min(config.data.max_length, max_positions(base.config, tokenizer) - reserved)
    if max_length < config.data.max_length:
        notes.append(f"max_length capped at {max_length} (model positions"
                     + (f" minus {reserved} virtual tokens)" if reserved else ")"))
    with accelerator.main_process_first():
        train_set = task.encode(splits["train"], tokenizer, config.data, meta, max_length, "the train split")
        eval_set = task.encode(splits["eval"], tokenizer, config.data, meta, max_length, "the eval split")
    loader = data_loader(train_set, training,
                         task.packed_collator(tokenizer) if fast.packing else task.collator(tokenizer))

    # optimisation
    new_weights = (new_weight_names(model, base, spec, task.peft_task_type), new_weights_rate(training))
    if new_weights[0] and new_weights[1] != training.learning_rate:
        notes.append(f"the weights the checkpoint lacked ({len(new_weights[0])} tensors) train at "
                     + (f"{new_weights[1]:g} (training.new_weights_learning_rate)" if not spec.make_optimizer else
                        f"{spec.name}'s own optimizer rates (training.new_weights_learning_rate does not apply)"))
    optimizer = build_optimizer(model, spec, training.learning_rate, training.weight_decay,
                                spec.extras(config.method.options), fast.fused_optimizer, new_weights)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch, steps = total_steps(training, len(loader))
    if spec.on_schedule:  # e.g. AdaLoRA: its rank schedule follows the step budget
        notes += spec.on_schedule(accelerator.unwrap_model(model), steps, config.method.options)
    scheduler = build_scheduler(training, optimizer, steps)
    notes += _check_sharding(accelerator, spec, resume_from)
    state = TrainingState()
    if resume_from is not None:
        state = checkpoint.restore(resume_from, accelerator, model, optimizer, scheduler, config, spec)
        notes.append(f"resumed from {resume_from} (step {state.step})")

    evaluator = Evaluator(task, accelerator.unwrap_model(model), tokenizer, splits["eval"], eval_set, config.data,
                          meta, max_length, training.eval_batch_size,
                          training.metric_for_best or task.main_metric(meta), training.keep, accelerator, model)
    loop = Loop(accelerator, model, optimizer, scheduler, loader, spec, training, steps_per_epoch, steps, loss)
    return Prepared(config, spec, task, meta, tokenizer, loop, evaluator, state, resume_from is not None, precision,
                    fast, max_length, trainable, total, notes, initial_adapter, weights,
                    split_rows={name: len(rows) for name, rows in splits.items()})


def _class_balance(config: RunConfig, task, train_rows, meta: dict[str, Any], main_process: bool):
    """A classifier's training labels: one warning when imbalanced; ``training.class_weights`` resolved.

    Returns the loss with the class weights (None: the model's own), the weights per label (None) and notes.
    """
    counts = task.label_counts(train_rows, config.data, meta) if task.classifies else {}
    warning = (balance.imbalance_warning(counts, config.training.class_weights)
               if counts and task.warns_imbalance else None)
    if warning and main_process:
        warn(warning)
    setting = config.training.class_weights
    if setting is None:
        return None, None, []
    if not counts:
        raise ConfigError("training.class_weights weights a classifier's loss per class; this run has no classes",
                          "leave training.class_weights out (null)")
    weights = balance.class_weights(setting, counts)
    return (task.loss_function(list(weights.values())), weights,
            [balance.weights_note(weights, setting, counts)])


def _finish(run: Prepared, fitted: Fitted, staging: Path | None,
            initial: dict[str, float] | None) -> tuple[dict[str, float], int, list[str]]:
    """The weights to keep (best or last), the technique's finalize hook, and the run directory (main process).

    Returns the final metrics, the size of the saved weights (0 off the main process) and the run's notes.
    """
    accelerator, unwrapped, sharded = run.accelerator, run.unwrapped, _sharded(run.accelerator)
    weights = checkpoint.trainable_weights(accelerator, run.loop.model)  # gathered on every process
    final, best = run.evaluator.kept(run.state)
    if best is not None:
        weights = best
        if not sharded:  # the in-memory model (RunResult.model) is the kept one too
            with torch.no_grad():
                for name, param in unwrapped.named_parameters():
                    if name in best:
                        param.copy_(best[name].to(param.device))
    notes = run.notes + fitted.notes
    if run.spec.finalize and not sharded:  # e.g. AdaLoRA: the kept weights under the final rank budget
        notes += run.spec.finalize(unwrapped)
        weights = checkpoint.trainable_weights(accelerator, run.loop.model)
    metrics = {k: v for k, v in final.items() if k not in {"step", "epoch"}}
    if staging is None:
        return metrics, 0, notes
    state, config = run.state, run.config
    record = artifacts.RunRecord(
        task=config.task, method=run.spec.name, meta=run.meta, main_metric=run.evaluator.main_metric,
        trainable_params=run.trainable, total_params=run.total, train_seconds=round(fitted.seconds, 2),
        steps=state.step, kept={"which": config.training.keep, **{k: final[k] for k in ("step", "epoch")}},
        max_length=run.max_length, precision=run.precision, fast_path=run.fast.record(),
        num_processes=accelerator.num_processes, hardware=artifacts.hardware(accelerator.device),
        split_rows=run.split_rows, notes=notes, class_weights=run.class_weights)
    if run.spec.full and not sharded:
        weights = None  # the kept weights are in the model (copied above): save it whole, buffers included
    artifacts.save_run(staging, unwrapped, run.tokenizer, config, record,
                       {**metrics, "initial": initial, "history": state.history, "losses": state.losses},
                       state_dict=weights, initial_adapter=run.initial_adapter)
    return metrics, artifacts.weights_bytes(staging), notes


def _sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in {DistributedType.FSDP, DistributedType.DEEPSPEED}


def _check_sharding(accelerator: Accelerator, spec: MethodSpec, resume_from: Path | None) -> list[str]:
    """What FSDP / DeepSpeed runs cannot do yet: refused, or noted (periodic checkpoints are off)."""
    if not _sharded(accelerator):
        return []
    if spec.converts_on_save:
        raise ConfigError(f'method "{spec.name}" is not supported under FSDP / DeepSpeed yet: its adapter is converted '
                          "to a plain LoRA on save, which needs the whole model in one process",
                          "use lora or dora there, or train on one process / DDP")
    if resume_from is not None:
        raise ConfigError("--resume works for single-process and DDP runs, not yet under FSDP or DeepSpeed",
                          "restart the run with --overwrite (docs/training.md)")
    return ["periodic checkpoints are off under FSDP / DeepSpeed (not supported yet)"]


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


@contextmanager
def _no_staging():
    """Processes other than the main one write nothing."""
    yield None

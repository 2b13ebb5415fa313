"""Resumable training checkpoints, in safetensors and JSON only (no pickle).

One checkpoint is a directory ``step-00000120/`` under the run's checkpoint directory
(default ``<output_dir>.checkpoints``)::

    trainable.safetensors   the trainable parameters (never the frozen base)
    optimizer.safetensors   the optimizer's state tensors (optimizer.json: everything else)
    best.safetensors        with keep=best: the best weights seen so far
    method.safetensors      a technique's own loop state (AdaLoRA's importance scores; + method.json)
    rng-<rank>.safetensors  each process's random number generator states (+ rng-<rank>.json)
    state.json              step, data position, history, scheduler, scaler, the run config

It is written under a temporary name and renamed, so every ``step-*`` directory is complete:
a kill at any moment, even while saving, leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.config import RunConfig
from peftlab.errors import ConfigError, PeftlabError

PREFIX = "step-"
# settings that may change between the interrupted run and its resumption
RESUMABLE_CHANGES = {"training.progress", "training.tensorboard", "training.report_to", "training.log_every",
                     "training.eval_batch_size", "training.checkpoint_every", "training.checkpoint_keep",
                     "training.checkpoint_dir"}


class TrainingInterrupted(PeftlabError):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed."""


def directory_for(config: RunConfig) -> Path:
    return Path(config.training.checkpoint_dir or f"{config.output_dir}.checkpoints")


def saved(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def clear(root: Path) -> None:
    """Remove the checkpoints peftlab wrote under ``root`` (and ``root`` once empty); nothing else in it."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith(PREFIX) or path.name.startswith(f".tmp-{PREFIX}")):
            shutil.rmtree(path, ignore_errors=True)
    try:
        root.rmdir()
    except OSError:  # the user's own files stay (training.checkpoint_dir may be a folder of theirs)
        pass


def latest(root: Path) -> Path | None:
    found = saved(root)
    return found[-1] if found else None


@dataclass
class TrainingState:
    """Where the loop is: restored on resume, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this process already consumed in ``epoch``
    seconds: float = 0.0  # training time before this process started
    tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[dict[str, Any]] = field(default_factory=list)  # the loss curve: mean loss per log_every steps
    unlogged: list[float] = field(default_factory=list)  # step losses since the last entry of ``losses``
    best_score: float | None = None
    best_entry: dict[str, Any] | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    trackers: dict[str, str] = field(default_factory=dict)  # tracker -> its run id (a resumed run continues it)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "best_weights"}


# --- tensors <-> files --------------------------------------------------------------------

def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        rest["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                rest["state"][str(index)][key] = value
    return _cpu(tensors), rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py_version, py_state, py_gauss = random.getstate()
    rest = {"python": [py_version, list(py_state), py_gauss], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, rest


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py_version, py_state, py_gauss = rest["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, pos, has_gauss, gauss = rest["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


# --- saving -------------------------------------------------------------------------------

def trainable_weights(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable weights; every process must call this.

    FSDP and DeepSpeed ZeRO-3 shard parameters across processes: their state dict is
    gathered (accelerate's ``get_state_dict``), so a saved adapter is never empty or partial.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if accelerator.distributed_type in {DistributedType.FSDP, DistributedType.DEEPSPEED}:
        full = accelerator.get_state_dict(model) or {}
    else:
        full = dict(unwrapped.named_parameters())
    return {name: tensor for name, tensor in full.items() if name in names}


def save(root: Path, accelerator, model: torch.nn.Module, optimizer, scheduler, state: TrainingState,
         config: RunConfig, keep: int, spec=None) -> Path:
    """Write a checkpoint of the current step (every process calls this); returns its directory."""
    name = f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    trainable = trainable_weights(accelerator, model)
    try:
        rng_tensors, rng_rest = _rng_state()
        save_file(_cpu(rng_tensors), str(tmp / f"rng-{accelerator.process_index}.safetensors"))
        _write_json(tmp / f"rng-{accelerator.process_index}.json", rng_rest)
        if accelerator.is_main_process:
            save_file(_cpu(trainable), str(tmp / "trainable.safetensors"))
            opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", opt_rest)
            if state.best_weights is not None:
                save_file(_cpu(state.best_weights), str(tmp / "best.safetensors"))
            if spec is not None and spec.get_state:
                method_tensors, method_rest = spec.get_state(accelerator.unwrap_model(model))
                save_file(_cpu(method_tensors), str(tmp / "method.safetensors"))
                _write_json(tmp / "method.json", method_rest)
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            _write_json(tmp / "state.json", {
                **state.to_json(), "scheduler": scheduler.state_dict(), "scaler": scaler,
                "num_processes": accelerator.num_processes, "config": config.to_dict(),
            })
    except OSError as error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise PeftlabError(f"could not write the checkpoint {final}: {error}",
                           "free disk space or set training.checkpoint_dir; earlier checkpoints are intact") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in saved(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- loading ------------------------------------------------------------------------------

def _differences(saved_config: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(saved_config) | set(current)):
        path = f"{prefix}{key}"
        a, b = saved_config.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and path != "method.options":
            found += _differences(a, b, path + ".")
        elif a != b and path not in RESUMABLE_CHANGES and path != "output_dir":
            found.append(f"{path}: {a!r} in the checkpoint, {b!r} now")
    return found


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise PeftlabError(f"checkpoint file {path} is unreadable: {error}",
                           f"delete {path.parent} to resume from the checkpoint before it") from None


def restore(path: Path, accelerator, model: torch.nn.Module, optimizer, scheduler, config: RunConfig,
            spec=None) -> TrainingState:
    """Load a checkpoint into the prepared model, optimizer and scheduler; returns the loop state."""
    try:
        saved_state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PeftlabError(f"checkpoint {path} is unreadable: {error}",
                           f"delete {path} to resume from the checkpoint before it") from None
    saved_config = saved_state["config"]
    try:  # a checkpoint from before runs stored absolute paths: compare like with like
        saved_config = RunConfig.model_validate(saved_config).with_absolute_paths().to_dict()
    except Exception:  # noqa: BLE001 - an unreadable old config is reported by the comparison below
        pass
    changed = _differences(saved_config, config.to_dict())
    if changed:
        raise ConfigError(f"the config differs from the checkpointed run's: {'; '.join(changed)}",
                          "resume with the same recipe and overrides, or start over with --overwrite")
    if saved_state["num_processes"] != accelerator.num_processes:
        raise ConfigError(f"the checkpoint was made with {saved_state['num_processes']} processes, "
                          f"this run has {accelerator.num_processes}",
                          "resume with the same number of processes (the data order depends on it)")

    unwrapped = accelerator.unwrap_model(model)
    trainable = _load_tensors(path / "trainable.safetensors")
    expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
    if set(trainable) != expected:
        raise PeftlabError(f"checkpoint {path} does not fit this model's trainable parameters",
                           "resume with the same recipe, or start over with --overwrite")
    with torch.no_grad():
        for name, param in unwrapped.named_parameters():
            if name in trainable:
                param.copy_(trainable[name].to(param.device))
    optimizer.load_state_dict(_join_optimizer(_load_tensors(path / "optimizer.safetensors"),
                                              json.loads((path / "optimizer.json").read_text())))
    scheduler.load_state_dict(saved_state["scheduler"])
    if spec is not None and spec.set_state and (path / "method.json").is_file():
        spec.set_state(unwrapped, {k: v.to(accelerator.device) for k, v in
                                   _load_tensors(path / "method.safetensors").items()},
                       json.loads((path / "method.json").read_text()))
    if saved_state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved_state["scaler"])
    rank = accelerator.process_index
    _set_rng_state(_load_tensors(path / f"rng-{rank}.safetensors"),
                   json.loads((path / f"rng-{rank}.json").read_text()))

    fields = {k: saved_state[k] for k in TrainingState.__dataclass_fields__ if k in saved_state}
    state = TrainingState(**fields)
    if (path / "best.safetensors").is_file():
        state.best_weights = _load_tensors(path / "best.safetensors")
    return state


# --- during training: periodic checkpoints and Ctrl-C ----------------------------------------

class StopRequest:
    """Turns the first Ctrl-C into a request to checkpoint and stop at the next step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
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

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


@dataclass
class Checkpointer:
    """Saves the loop's checkpoints: every ``every`` steps (None: only on Ctrl-C), and on a stop request.

    ``clock`` gives the training time so far (saved with the state, so a resumed run counts on).
    """

    root: Path
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    config: RunConfig
    spec: Any
    every: int | None
    keep: int
    clock: Any  # () -> seconds
    on_save: Any = None  # (step, path) -> None

    def save(self, state: TrainingState) -> Path:
        state.seconds = self.clock()
        path = save(self.root, self.accelerator, self.model, self.optimizer, self.scheduler, state, self.config,
                    self.keep, self.spec)
        if self.on_save:
            self.on_save(state.step, path)
        return path

    def after_step(self, state: TrainingState, total_steps: int, stop: StopRequest) -> None:
        """A periodic checkpoint when one is due; on a stop request, a checkpoint and TrainingInterrupted."""
        if stop.agreed(self.accelerator):
            path = self.save(state)
            raise TrainingInterrupted(f"interrupted at step {state.step} of {total_steps}; checkpoint saved in {path}",
                                      "continue with the same command plus --resume")
        if self.every and state.step % self.every == 0 and state.step < total_steps:
            self.save(state)

"""Where a base model's weights live: device maps, memory budgets, disk offload, quantization.

A base model bigger than the GPU (or than a memory budget on a CPU-only machine) is loaded
with transformers' ``device_map`` / ``max_memory`` / ``offload_folder`` (accelerate does the
placing and moves each layer to the execution device when it runs), or with its linear
layers quantized to 8 or 4 bits by bitsandbytes. peftlab checks the request before anything
is loaded (a budget that cannot hold one layer, an offload folder it cannot write, 4-bit on
a machine without a CUDA GPU) and reports where the layers went afterwards.

The options live in ``model:`` of a config (``device_map``, ``max_memory``,
``offload_folder``, ``quantization``) and on the command line of eval / predict.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from peftlab.config import ModelConfig
from peftlab.fastpath import base_dtype
from peftlab.errors import ConfigError

DISK = "disk"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_max_memory(items: list[str] | dict[str, Any] | None) -> dict[str, str] | None:
    """``["cpu=2GiB", "0=20GiB"]`` (the CLI form) or a mapping -> ``{"cpu": "2GiB", "0": "20GiB"}``."""
    if not items:
        return None
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    budget: dict[str, str] = {}
    for item in items:
        device, sep, amount = item.partition("=")
        if not sep or not device.strip() or not amount.strip():
            raise ConfigError(f'--max-memory "{item}" is not DEVICE=AMOUNT', 'e.g. --max-memory cpu=4GiB '
                                                                           '--max-memory 0=20GiB')
        budget[device.strip()] = amount.strip()
    return budget


def _device_key(key: str) -> int | str:
    """A max_memory key as accelerate wants it: GPU indices as ints, ``cpu``, ``mps``."""
    key = key.strip().lower()
    if key.startswith("cuda:"):
        key = key[5:]
    if key.isdigit():
        index = int(key)
        available = torch.cuda.device_count()
        if index >= available:
            raise ConfigError(f"model.max_memory names GPU {index}, but this machine has "
                              f"{available or 'no'} CUDA GPU{'s' if available != 1 else ''}",
                              "budget only the devices you have, e.g. cpu=4GiB")
        return index
    if key in {"cpu", "mps"}:
        return key
    raise ConfigError(f'model.max_memory has an unknown device "{key}"', "use cpu or a GPU index (0, 1, ...)")


def _bytes(amount: str, key: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    plain = amount.strip().upper().removesuffix("B").strip()
    try:
        value = int(plain) if plain.isdigit() else convert_file_size_to_int(amount)
    except (ValueError, TypeError):
        value = -1
    if value < 0:
        raise ConfigError(f'model.max_memory {key}="{amount}" is not an amount of memory', 'e.g. "4GiB" or "500MB"')
    return value


def max_memory(model_cfg: ModelConfig) -> dict[int | str, int] | None:
    """The budget in the form accelerate takes (device -> bytes), checked."""
    if not model_cfg.max_memory:
        return None
    return {_device_key(key): _bytes(amount, key) for key, amount in model_cfg.max_memory.items()}


def uses_placement(model_cfg: ModelConfig) -> bool:
    return bool(model_cfg.device_map or model_cfg.max_memory or model_cfg.offload_folder)


def _check_offload_folder(folder: str) -> Path:
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".peftlab-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"the offload folder {path} is not writable ({error.strerror or error})",
                          "pass a folder you can write to with --offload-folder (it needs room for the "
                          "offloaded layers)") from None
    return path


def check_quantization(model_cfg: ModelConfig) -> None:
    if model_cfg.quantization == "none":
        return
    bits = model_cfg.quantization
    if not torch.cuda.is_available():
        raise ConfigError(f"{bits} quantization (bitsandbytes) needs a CUDA GPU, and this machine has none",
                          "drop model.quantization here (dtype: bfloat16 halves the memory of float32), "
                          "or run on a machine with an NVIDIA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{bits} quantization needs the bitsandbytes package, which is not installed",
                          "pip install bitsandbytes")


def quantization_config(model_cfg: ModelConfig):
    """transformers' BitsAndBytesConfig for ``model.quantization`` (None for none).

    4bit is QLoRA's recipe: NF4 weights, double quantization, bf16 compute.
    """
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return None


def _devices(budget: dict[int | str, int]) -> list[int | str]:
    """Devices in the order layers fill them: GPUs by index, then mps, then the CPU."""
    return sorted(budget, key=lambda d: (0, d) if isinstance(d, int) else (1 if d == "mps" else 2, 0))


def plan(model_cfg: ModelConfig, auto_class: type, budget: dict[int | str, int], config: Any,
         **model_kwargs: Any) -> dict[str, int | str]:
    """A module -> device map for a memory budget, computed on an empty (meta) copy of the model.

    The model's repeated layers (its no-split blocks) fill the devices in order (GPUs, then
    the CPU), then the disk; everything else (embeddings, final norm, task head) stays on the
    first device, where the layers run. Keeping the heads off the disk matters: a task head
    that is not in the base checkpoint (a new classifier) has nothing on disk to reload.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    config = copy.deepcopy(config)
    for key, value in model_kwargs.items():  # e.g. num_labels: the head's size
        setattr(config, key, value)
    with init_empty_weights():
        empty = auto_class.from_config(config, dtype=base_dtype(model_cfg))
    no_split = set(getattr(empty, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(empty, dtype=base_dtype(model_cfg))
    blocks: list[str] = []
    for name, module in empty.named_modules():
        if type(module).__name__ in no_split and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    if not blocks:
        raise ConfigError(f"{model_cfg.name} ({type(empty).__name__}) declares no layers accelerate can place "
                          "one by one", "load it without model.max_memory / offload_folder")
    inside = tuple(b + "." for b in blocks)
    rest = [name for name, module in empty.named_modules()
            if name not in blocks and not name.startswith(inside)
            and (any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)))]
    devices = _devices(budget)
    main = devices[0]
    room = dict(budget)
    rest_bytes = sum(sum(t.numel() * t.element_size() for t in
                         [*empty.get_submodule(n).parameters(recurse=False), *empty.get_submodule(n).buffers(recurse=False)])
                     for n in rest)
    room[main] -= rest_bytes
    name, largest = max(((b, sizes[b]) for b in blocks), key=lambda item: item[1])
    if largest > room[main]:
        shown = ", ".join(f"{k}={_size(v)}" for k, v in budget.items())
        raise ConfigError(f"model.max_memory ({shown}) cannot hold even one layer of {model_cfg.name} beside its "
                          f"embeddings and head on {main}: the largest layer, {name}, needs {_size(largest)} and "
                          f"the embeddings and head {_size(rest_bytes)}",
                          "raise the budget: every layer runs on a device (the offload folder only stores "
                          "layers between uses)")
    device_map: dict[str, int | str] = {n: main for n in rest}
    position = 0
    for block in blocks:
        while position < len(devices) and room[devices[position]] < sizes[block]:
            position += 1
        device = devices[position] if position < len(devices) else DISK
        if device != DISK:
            room[device] -= sizes[block]
        device_map[block] = device
    return device_map


def from_pretrained_kwargs(model_cfg: ModelConfig, auto_class: type, config: Any,
                           **model_kwargs: Any) -> dict[str, Any]:
    """Placement and quantization arguments for ``from_pretrained``, checked before loading."""
    check_quantization(model_cfg)
    kwargs: dict[str, Any] = {}
    budget = max_memory(model_cfg)
    if model_cfg.offload_folder:
        kwargs["offload_folder"] = str(_check_offload_folder(model_cfg.offload_folder))
    if isinstance(model_cfg.device_map, dict):
        kwargs["device_map"] = dict(model_cfg.device_map)
    elif budget:
        kwargs["device_map"] = plan(model_cfg, auto_class, budget, config, **model_kwargs)
    elif uses_placement(model_cfg):
        kwargs["device_map"] = model_cfg.device_map or "auto"
    if isinstance(kwargs.get("device_map"), dict) and DISK in kwargs["device_map"].values() \
            and not model_cfg.offload_folder:
        raise ConfigError(f"{model_cfg.name} does not fit in model.max_memory, so some layers must go to disk",
                          "pass an offload folder (--offload-folder DIR, or model.offload_folder) or raise the "
                          "budget")
    quantized = quantization_config(model_cfg)
    if quantized is not None:
        kwargs["quantization_config"] = quantized
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    return kwargs


def device_map_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """The module -> device map accelerate dispatched the (base) model with, if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "hf_device_map", None)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first accelerator in the device map, else the first real parameter's device."""
    device_map = device_map_of(model)
    if device_map:
        for device in device_map.values():
            if device not in ("cpu", DISK):
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        return torch.device("cpu")
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def describe(model: torch.nn.Module) -> str | None:
    """Where the layers went, e.g. "cpu 1.2 MiB (2 modules), disk 40.0 MiB (3 modules)"; None if on one device."""
    device_map = device_map_of(model)
    if not device_map or len(set(device_map.values())) < 2 and DISK not in device_map.values():
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    count: dict[str, int] = {}
    size: dict[str, int] = {}
    for name, device in device_map.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        module = base.get_submodule(name) if name else base
        count[key] = count.get(key, 0) + 1
        size[key] = size.get(key, 0) + sum(p.numel() * p.element_size() for p in module.parameters())
    return ", ".join(f"{key} {_size(size[key])} ({count[key]} module{'s' if count[key] != 1 else ''})"
                     for key in sorted(count, key=lambda k: (k == DISK, k == "cpu", k)))


@contextlib.contextmanager
def quiet_dispatch():
    """Hide accelerate's "Some parameters are on the meta device" notice: peftlab reports placement itself."""
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

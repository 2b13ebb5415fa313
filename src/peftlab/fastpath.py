"""The fast training path: what peftlab switches on where the hardware allows.

Each switch is a config key, resolved here once per run (``auto`` -> on or off, with the
reason), applied by ``train()`` at one place each, and written to the run record
(``peftlab.json`` -> ``fast_path``), so a user can see what ran and turn any of it off:

==========================  =========================================  ==========================
switch                      what it does                               auto
==========================  =========================================  ==========================
``model.dtype``             frozen base weights in bf16 instead of     bf16 on a CUDA GPU with
                            fp32 + autocast (trainable weights stay    bf16, else float32
                            fp32)
``model.attention``         PyTorch SDPA / Flash attention kernels     sdpa (transformers' pick)
``training.fused_optimizer`` one fused AdamW kernel for all tensors    on for CUDA tensors
``training.packing``        causal LM: a batch's rows concatenated     on for weight adapters on
                            into one row, no padding, attention kept   models whose attention
                            inside each row (checked on the model)     stays inside each row
``training.group_by_length`` rows of similar length batched together   on
``training.compile``        ``torch.compile`` of the base model        off
``training.gradient_checkpointing``  recompute activations backward    off
==========================  =========================================  ==========================

Resume stays exact with every switch: none of them changes which rows form a batch or in
which order (packing flattens a batch the sampler already chose).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from peftlab.config import ModelConfig, TrainingConfig


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def base_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype the frozen base is loaded in: ``auto`` = bf16 on a CUDA GPU with bf16, else float32."""
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_cfg.dtype]


@dataclass
class FastPath:
    """The resolved switches of one run (what the run record shows)."""

    base_dtype: str
    attention: str
    fused_optimizer: bool
    packing: bool
    group_by_length: bool
    compile: bool
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)  # why an ``auto`` switch is off

    def record(self) -> dict[str, Any]:
        return asdict(self)


def resolve(model_cfg: ModelConfig, training: TrainingConfig, *, packable: bool, prompt_learning: bool,
            full: bool) -> FastPath:
    """Decide every switch before the model is built (packing is confirmed on the model later)."""
    notes = []
    dtype = base_dtype(model_cfg)
    if full and dtype != torch.float32 and model_cfg.dtype == "auto":
        dtype = torch.float32  # every weight trains: keep fp32 master weights, bf16 runs under autocast
        notes.append("base dtype float32: full fine-tuning trains every weight in float32 (bf16 via autocast)")
    fused = training.fused_optimizer
    if fused == "auto":
        fused = torch.cuda.is_available()
    packing = training.packing
    if packing == "auto":
        packing = packable and not prompt_learning
        if packable and prompt_learning:
            notes.append("packing off: prompt-learning techniques prepend virtual tokens to every row")
    elif packing and not packable:
        notes.append("packing off: only causal-LM training batches can be packed")
        packing = False
    elif packing and prompt_learning:
        notes.append("packing off: prompt-learning techniques prepend virtual tokens to every row")
        packing = False
    return FastPath(base_dtype=str(dtype).removeprefix("torch."), attention=model_cfg.attention, fused_optimizer=fused,
                    packing=packing, group_by_length=training.group_by_length, compile=training.compile,
                    gradient_checkpointing=training.gradient_checkpointing, notes=notes)


def upcast_trainable(model: torch.nn.Module) -> int:
    """Trainable weights in float32 on a bf16 / fp16 base (optimizer updates need the precision)."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            count += 1
    return count


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass; inputs carry gradients so frozen layers still backprop."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()


def compile_base(model: torch.nn.Module) -> None:
    """``torch.compile`` the base model in place (parameter names, and so the saved files, are unchanged)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.compile()


def optimizer(groups: list[dict[str, Any]], learning_rate: float, fused: bool) -> torch.optim.Optimizer:
    tensors = [p for group in groups for p in group["params"]]
    fused = fused and all(p.is_cuda and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(groups, lr=learning_rate, **({"fused": True} if fused else {}))


@torch.no_grad()
def packing_isolated(model: torch.nn.Module, vocab: int, device: torch.device | None = None) -> bool:
    """True when two rows packed into one give each row the logits it gets alone (no cross-row attention).

    transformers builds a block-diagonal mask from position ids that restart at 0 for
    models that route their mask through ``create_causal_mask``, when there is no attention
    mask and no KV cache (so packed batches carry ``use_cache=False``); for other models
    (ALiBi models, older code) packing would let tokens see the previous row, so it stays off.
    The probe runs where the model is (a quantized base is already on its GPU).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, max(4, vocab), (1, 7), generator=generator).to(device)
    second = torch.randint(3, max(4, vocab), (1, 5), generator=generator).to(device)
    try:
        alone = [model(input_ids=row, use_cache=False).logits.float() for row in (first, second)]
        positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions,
                       use_cache=False).logits.float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    tolerance = 1e-3 if packed.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 5e-2
    scale = max(1.0, float(alone[1].abs().max()))
    return bool(torch.allclose(packed[:, :7], alone[0], atol=tolerance * scale)
                and torch.allclose(packed[:, 7:], alone[1], atol=tolerance * scale))


def batch_size_hint(batch_size: int, static_bytes: int) -> str | None:
    """On a CUDA GPU with much memory left after training: about how large a batch would fit.

    ``static_bytes`` is what was allocated before the first step (weights, optimizer
    state); the rest of the peak is activations, which grow with the batch.
    """
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    activations = peak - static_bytes
    if activations <= 0 or peak > 0.5 * total:
        return None
    factor = int((0.8 * total - static_bytes) // activations)
    if factor < 2:
        return None
    return (f"GPU memory peaked at {peak / 2**30:.1f} of {total / 2**30:.0f} GiB: training.batch_size="
            f"{batch_size * factor} (x{factor}) would likely fit, and larger batches run faster per token")

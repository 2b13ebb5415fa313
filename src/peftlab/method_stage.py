"""The method stage: a base model in the fast path's dtype with the technique on top.

What :func:`peftlab.train.train` trains and what ``benchmarks/throughput.py`` measures:
the task family loads the base (heads sized from the data), added tokens get their rows,
the technique's registry entry builds the peft config (defaults per architecture and read off
the model), peft wraps the base, upstream fixes apply (compat.py), and the fast path's
changes follow (fp32 trainables on a half-precision base, packing probe, checkpointing, compile).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftlab import compat, fastpath
from peftlab.config import ModelConfig, RunConfig, TrainingConfig
from peftlab.errors import ConfigError, PeftlabError
from peftlab.methods import PEFT_SAVES, get_method, linear_layer_names, target_model_type
from peftlab.model import fit_embeddings, layer_name, new_token_ids, tied_embeddings, untrained_modules

NEW_WEIGHTS_RATE = 2e-3
"""The default rate of the weights the checkpoint lacked (training.new_weights_learning_rate): whole layers trained
from scratch, which the high rates of the small techniques (IA3 8e-3, prompt tuning 3e-2) wreck and full fine-
tuning's 2e-5 barely moves; at this rate the BERT2BERT cross-attention learned under every technique
(docs/techniques.md, calibration)."""


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, as peft counts them."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def mixed_precision(training: TrainingConfig, base_dtype: str = "float32") -> str:
    """accelerate's autocast setting: ``auto`` = bf16 on a CUDA GPU with bf16, or when the base is half precision."""
    if training.precision == "auto":
        if base_dtype == "float16":
            return "fp16"
        return "bf16" if fastpath.cuda_bf16() or base_dtype == "bfloat16" else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[training.precision]


def build_model(config: RunConfig, task, spec, meta: dict[str, Any], tokenizer, fast: fastpath.FastPath):
    """The base model (in the fast path's dtype) with the technique on top: ``(peft model, base, peft config)``.

    What ``train()`` trains, and what the throughput benchmark measures.
    """
    base = task.load_model(config.model.model_copy(update={"dtype": fast.base_dtype}), meta)
    if config.model.quantization != "none":  # QLoRA: fp32 norms and head, inputs that carry gradients
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    fit_embeddings(base, tokenizer)  # room for model.add_tokens (docs/big-models.md)
    options = new_token_options(config.model, spec.name, base, tokenizer, config.method.options)
    peft_config = spec.build(task.peft_task_type, target_model_type(base.config), options, model=base)
    spec.check_model(base, peft_config)
    if peft_config is None:  # full fine-tuning: the model itself, every weight trainable
        model = base.requires_grad_(True)
    else:
        try:
            model = get_peft_model(base, peft_config)
        except (ValueError, TypeError, RuntimeError) as error:
            targets = getattr(peft_config, "target_modules", None)
            hint = "set method.options to fit this architecture"
            if targets:
                hint = (f"target_modules={sorted(targets) if not isinstance(targets, str) else targets}; this "
                        f"model's linear layers are named: {', '.join(linear_layer_names(base))}")
            raise PeftlabError(f'method "{spec.name}" cannot be applied to {config.model.name}: '
                               f"{str(error).splitlines()[0]}", hint) from None
    compat.apply_fixes(model)
    fast_model(model, fast, tokenizer)
    return model, base, peft_config


def new_weight_names(model: torch.nn.Module, base: PreTrainedModel, spec, peft_task_type: str | None) -> set[str]:
    """The trainable parameters of ``model`` (by name) that hold weights the base checkpoint lacked
    (:func:`peftlab.model.untrained_modules`; a classification head that peft trains itself is not among them)."""
    modules = untrained_modules(base, PEFT_SAVES.get(peft_task_type or "", ()))
    if not modules:
        return set()
    prefix = "" if spec.full else "base_model." if spec.prompt_learning else "base_model.model."
    found = set()
    for name, param in model.named_parameters():
        path = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).removeprefix(prefix)  # a peft wrapper's copy
        if param.requires_grad and any(path.startswith(module + ".") for module in modules):
            found.add(name)
    return found


def new_weights_rate(training: TrainingConfig) -> float:
    """``training.new_weights_learning_rate``, else :data:`NEW_WEIGHTS_RATE` (whatever the technique's rate)."""
    return training.new_weights_learning_rate or NEW_WEIGHTS_RATE


def fast_model(model: torch.nn.Module, fast: fastpath.FastPath, tokenizer) -> None:
    """The fast path's changes to the built peft model (fastpath.py), confirming packing on the model itself."""
    if fast.base_dtype != "float32":
        fastpath.upcast_trainable(model)
    if fast.packing and not fastpath.packing_isolated(model, len(tokenizer)):
        fast.packing = False
        fast.notes.append(f"packing off: {model.config.model_type} attention is not kept inside packed rows")
    if fast.gradient_checkpointing:
        fastpath.enable_gradient_checkpointing(model)
    if fast.compile:
        fastpath.compile_base(model)


def new_token_options(model_cfg: ModelConfig, method: str, model: PreTrainedModel,
                      tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]) -> dict[str, Any]:
    """The method options that train the added tokens (``model.train_new_tokens``)."""
    if not model_cfg.new_tokens() or method == "full":  # full fine-tuning trains the whole embeddings anyway
        return options
    if method != "lora":
        raise ConfigError(f'added tokens (model.add_tokens / add_special_tokens) are trained with method "lora", '
                          f'not "{method}": other techniques would leave their embeddings untrained',
                          "use method.name=lora (docs/big-models.md)")
    ids = new_token_ids(tokenizer, model_cfg)
    embed = layer_name(model, model.get_input_embeddings())
    output = model.get_output_embeddings()
    head = None if output is None else layer_name(model, output)
    if model_cfg.train_new_tokens == "rows":
        if "trainable_token_indices" in options:
            return options
        layers = [embed] + ([head] if head and not tied_embeddings(model) else [])
        return {**options, "trainable_token_indices": {name.split(".")[-1]: ids for name in layers}}
    targets = get_method(method).resolve_options(target_model_type(model.config), options,
                                                 model).get("target_modules")
    if isinstance(targets, str):
        raise ConfigError("model.train_new_tokens=lora adds the embedding layers to method.options.target_modules, "
                          "which is a regular expression here", "give target_modules as a list")
    extra = [name.split(".")[-1] for name in (embed, head) if name]
    return {**options, "target_modules": list(dict.fromkeys([*targets, *extra]))}

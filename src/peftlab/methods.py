"""The technique registry: one entry per PEFT method, built on the ``peft`` library.

A :class:`MethodSpec` declares everything the rest of peftlab needs to know about a
technique: the peft config class it builds, its defaults (general and per
architecture), its capability flags (prompt learning, mergeable) and the task families
it supports. Adding a technique is one ``register(MethodSpec(...))`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft.utils import constants as peft_tables

from peftlab.errors import MethodError, did_you_mean

# Fields of peft configs that peftlab sets itself; users do not pass them as options.
_MANAGED_FIELDS = {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision",
                   "inference_mode", "peft_version"}

# Where peft's own target-module tables have no entry, peftlab adds one.
_EXTRA_LORA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
}
_EXTRA_IA3_TARGETS = {
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}


def _lora_arch(model_type: str) -> dict[str, Any]:
    targets = _EXTRA_LORA_TARGETS.get(model_type) or peft_tables.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        model_type
    )
    return {"target_modules": list(targets)} if targets else {}


def _ia3_arch(model_type: str) -> dict[str, Any]:
    if model_type in _EXTRA_IA3_TARGETS:
        targets, feedforward = _EXTRA_IA3_TARGETS[model_type]
    else:
        targets = peft_tables.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        feedforward = peft_tables.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    if not targets:
        return {}
    return {"target_modules": list(targets), "feedforward_modules": list(feedforward or [])}


def _no_arch(model_type: str) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """What peftlab knows about one technique."""

    name: str
    title: str
    summary: str
    config_cls: type[peft.PeftConfig]
    defaults: dict[str, Any] = field(default_factory=dict)
    arch_defaults: Callable[[str], dict[str, Any]] = _no_arch
    prompt_learning: bool = False
    mergeable: bool = False
    needs_targets: bool = False
    tasks: frozenset[str] = frozenset({"seq-cls", "seq2seq", "causal-lm"})

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls) if f.name not in _MANAGED_FIELDS]

    def check_options(self, options: dict[str, Any]) -> None:
        allowed = self.option_names()
        for key in options:
            if key not in allowed:
                raise MethodError(
                    f'unknown option `{key}` for method "{self.name}"{did_you_mean(key, allowed)}',
                    f"`peftlab methods {self.name}` lists its options",
                )

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise MethodError(
                f'method "{self.name}" does not support task "{task}"',
                f"it supports: {', '.join(sorted(self.tasks))}",
            )

    def resolve_options(self, model_type: str, options: dict[str, Any]) -> dict[str, Any]:
        """General defaults < architecture defaults < the user's options."""
        resolved = {**self.defaults, **self.arch_defaults(model_type), **options}
        if self.needs_targets and not resolved.get("target_modules"):
            raise MethodError(
                f'method "{self.name}" has no default target modules for architecture "{model_type}"',
                f"set method.options.target_modules (e.g. the attention projections' names)",
            )
        return resolved

    def build(self, task_type: str, model_type: str, options: dict[str, Any]) -> peft.PeftConfig:
        """The peft config for this technique on a model of ``model_type``."""
        self.check_options(options)
        resolved = self.resolve_options(model_type, options)
        try:
            return self.config_cls(task_type=task_type, **resolved)
        except (TypeError, ValueError) as error:
            raise MethodError(f'invalid options for method "{self.name}": {error}') from None


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(
            f'unknown method "{name}"{did_you_mean(name, METHODS)}', f"known methods: {', '.join(METHODS)}"
        )
    return METHODS[name]


register(MethodSpec(
    name="lora",
    title="Low-rank adaptation",
    summary="LoRA: trainable low-rank updates added to chosen weight matrices (Hu et al. 2021).",
    config_cls=peft.LoraConfig,
    defaults={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
    arch_defaults=_lora_arch,
    mergeable=True,
    needs_targets=True,
))
register(MethodSpec(
    name="ia3",
    title="IA3 activation scaling",
    summary="IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022).",
    config_cls=peft.IA3Config,
    arch_defaults=_ia3_arch,
    mergeable=True,
    needs_targets=True,
))
register(MethodSpec(
    name="prefix",
    title="Prefix tuning (MLP-reparameterised)",
    summary="Prefix tuning: trainable key/value prefixes in every layer, reparameterised by an MLP "
            "during training (Li & Liang 2021).",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": True},
    prompt_learning=True,
))
register(MethodSpec(
    name="ptuning-v2",
    title="P-tuning v2 (deep prompts)",
    summary="P-tuning v2: deep prompts in every layer, trained directly without reparameterisation "
            "(Liu et al. 2021); prefix tuning as used for understanding tasks.",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": False},
    prompt_learning=True,
))
register(MethodSpec(
    name="prompt",
    title="Prompt tuning (soft prompt)",
    summary="Prompt tuning: trainable soft-prompt embeddings prepended to the input (Lester et al. 2021).",
    config_cls=peft.PromptTuningConfig,
    defaults={"num_virtual_tokens": 20, "prompt_tuning_init": "RANDOM"},
    prompt_learning=True,
))
register(MethodSpec(
    name="ptuning",
    title="P-tuning (prompt encoder)",
    summary="P-tuning: virtual input tokens produced by a prompt encoder, MLP or LSTM (Liu et al. 2021).",
    config_cls=peft.PromptEncoderConfig,
    defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128, "encoder_reparameterization_type": "MLP"},
    prompt_learning=True,
))


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Short names of the model's linear layers (what ``target_modules`` can name)."""
    names = {name.split(".")[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"}
    return sorted(names)


def _registered_tasks() -> list[str]:
    from peftlab.tasks import TASKS

    return list(TASKS)


def describe(spec: MethodSpec, model_type: str | None = None) -> dict[str, Any]:
    """A plain description for `peftlab methods`."""
    info = {
        "name": spec.name,
        "summary": spec.summary,
        "peft_config": spec.config_cls.__name__,
        "defaults": dict(spec.defaults),
        "prompt_learning": spec.prompt_learning,
        "mergeable": spec.mergeable,
        "tasks": sorted(spec.tasks & set(_registered_tasks())),
        "options": spec.option_names(),
    }
    if model_type:
        info["defaults"] = spec.resolve_options(model_type, {}) if not spec.needs_targets or spec.arch_defaults(
            model_type) else {**spec.defaults, "target_modules": "(none known: set target_modules)"}
    return info

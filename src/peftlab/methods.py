"""The technique registry: one entry per PEFT method, built on the ``peft`` library.

A :class:`MethodSpec` declares everything the rest of peftlab needs to know about a
technique: the peft config class it builds, its defaults (general, per architecture and,
where they depend on the model's layers, read off the model), its capability flags
(prompt learning, mergeable, which layer types it handles), the task families it
supports, its group and one line on when it helps, and the hooks through which a
technique changes training without the loop naming it: ``make_optimizer`` (LoRA+),
``on_schedule`` / ``on_step`` / ``state`` (AdaLoRA's rank budget), ``converts_on_save``
(PiSSA / OLoRA, saved as a plain LoRA of the original base). Adding a technique is one
``register(...)`` call: a ``MethodSpec``, or one of the presets ``_lora`` (a LoraConfig variant),
``_adapter`` (a mergeable weight adapter), ``_compact`` (one in the compact-adapters group) and ``_prompt`` (prompt learning), which fill in what
every technique of that kind shares.
"""

from __future__ import annotations

import dataclasses
import re
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


def target_model_type(config) -> str:
    """The model type whose target-module tables apply; a composite EncoderDecoderModel (BERT2BERT) has no
    table of its own in peft, and its layers are named as its encoder's (the decoder is usually the same kind)."""
    encoder = getattr(config, "encoder", None)
    if config.model_type == "encoder-decoder" and encoder is not None:
        return encoder.model_type
    return config.model_type


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


def _adalora_arch(model_type: str) -> dict[str, Any]:
    targets = (_EXTRA_LORA_TARGETS.get(model_type)
               or peft_tables.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING.get(model_type)
               or peft_tables.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type))
    return {"target_modules": list(targets)} if targets else {}


# LayerNorm module names where peft's LN-tuning table has no entry (BERT-family encoders name them LayerNorm).
_EXTRA_LN_TARGETS = {name: ["LayerNorm"] for name in ("bert", "roberta", "xlm-roberta", "deberta-v2", "electra")}
_EXTRA_LN_TARGETS["distilbert"] = ["sa_layer_norm", "output_layer_norm"]


def _ln_arch(model_type: str) -> dict[str, Any]:
    targets = _EXTRA_LN_TARGETS.get(model_type) or peft_tables.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING.get(
        model_type)
    return {"target_modules": list(targets)} if targets else {}


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2 style)


def _bias_layers(model: torch.nn.Module) -> dict[str, Any]:
    """BitFit's targets: every linear layer that has a bias (the classification head is trained whole anyway)."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module.bias is not None
             and not any(part in {"classifier", "score", "lm_head"} for part in name.split("."))]
    if not names:
        conv = any(_is_conv1d(m) for m in model.modules())
        raise MethodError(
            f'method "bitfit" cannot be applied to {model.config.model_type}: '
            + ("its layers are GPT-2-style Conv1D, which peft's bias tuning (BEFT) does not handle" if conv
               else "its linear layers have no bias terms, so there is nothing for BitFit to train"),
            "use ln-tuning or ia3 for a comparably tiny adapter, or lora")
    # a regular expression over the full module names: exact layers, nothing else
    return {"target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$"}


@dataclass(frozen=True)
class MethodSpec:
    """What peftlab knows about one technique."""

    name: str
    title: str
    summary: str
    config_cls: type[peft.PeftConfig] | None  # None: full fine-tuning (no adapter)
    defaults: dict[str, Any] = field(default_factory=dict)
    arch_defaults: Callable[[str], dict[str, Any]] = _no_arch
    prompt_learning: bool = False
    mergeable: bool = False
    needs_targets: bool = False
    tasks: frozenset[str] = frozenset({"seq-cls", "seq2seq", "causal-lm"})
    group: str = "LoRA family"  # the heading `peftlab methods` lists it under (GROUPS)
    when: str = ""  # one line: when it helps
    trains: str = ""  # what is trained, in a few words
    full: bool = False  # full fine-tuning: every weight trains, the run saves a plain transformers model
    linear_only: bool = False  # peft implements it for torch.nn.Linear layers only (not GPT-2's Conv1D)
    # peftlab's own options (not fields of the peft config), with their defaults; read by the hooks below
    extra_options: dict[str, Any] = field(default_factory=dict)
    # options the peft config needs to be constructed, replaced once the run is known (AdaLoRA's total_step)
    build_defaults: dict[str, Any] = field(default_factory=dict)
    # defaults read off the loaded model (BitFit: the linear layers that have a bias); may raise MethodError
    model_defaults: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    # hooks: the optimizer (model, lr, weight_decay, options) -> torch optimizer; default AdamW
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = None
    # once the step budget is known: (peft model, total_steps, user options) -> notes for the run record
    on_schedule: Callable[..., list[str]] | None = None
    # after each optimizer step, before the gradients are cleared: (peft model, step number from 1)
    on_step: Callable[[Any, int], None] | None = None
    # loop state of the technique for checkpoints: get(model) -> (tensors, json), set(model, tensors, json)
    get_state: Callable[[Any], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    set_state: Callable[[Any, dict[str, torch.Tensor], dict[str, Any]], None] | None = None
    # before saving, after the kept (best or last) weights are in the model: (peft model) -> notes
    finalize: Callable[[Any], list[str]] | None = None
    # PiSSA / OLoRA change the base weights at init: save the update as a plain LoRA of the original base
    converts_on_save: bool = False

    def option_names(self) -> list[str]:
        if self.config_cls is None:
            return list(self.extra_options)
        return [f.name for f in dataclasses.fields(self.config_cls) if f.name not in _MANAGED_FIELDS
                ] + list(self.extra_options)

    def extras(self, options: dict[str, Any]) -> dict[str, Any]:
        """peftlab's own options of this technique: defaults < the user's."""
        return {**self.extra_options, **{k: v for k, v in options.items() if k in self.extra_options}}

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
            others = [name for name, spec in METHODS.items() if task in spec.tasks and spec.group == self.group]
            raise MethodError(
                f'method "{self.name}" does not support task "{task}"',
                f"it supports: {', '.join(sorted(self.tasks))}"
                + (f"; for {task} try {', '.join(others)}" if others else ""),
            )

    def resolve_options(self, model_type: str, options: dict[str, Any],
                        model: torch.nn.Module | None = None) -> dict[str, Any]:
        """General defaults < architecture defaults < defaults read off the model < the user's options.

        peftlab's own options (``extra_options``) are not included: they are not peft config fields.
        """
        options = {k: v for k, v in options.items() if k not in self.extra_options}
        from_model = self.model_defaults(model) if self.model_defaults and model is not None and (
            "target_modules" not in options) else {}
        resolved = {**self.defaults, **self.arch_defaults(model_type), **from_model, **options}
        if self.needs_targets and not resolved.get("target_modules") and not (self.model_defaults and model is None):
            raise MethodError(
                f'method "{self.name}" has no default target modules for architecture "{model_type}"',
                f"set method.options.target_modules (e.g. the attention projections' names)",
            )
        return resolved

    def build(self, task_type: str, model_type: str, options: dict[str, Any],
              model: torch.nn.Module | None = None) -> peft.PeftConfig | None:
        """The peft config for this technique on a model of ``model_type`` (None for full fine-tuning)."""
        self.check_options(options)
        if self.config_cls is None:
            return None
        resolved = {**self.build_defaults, **self.resolve_options(model_type, options, model)}
        try:
            return self.config_cls(task_type=task_type, **resolved)
        except (TypeError, ValueError) as error:
            raise MethodError(f'invalid options for method "{self.name}": {error}') from None

    def check_model(self, model: torch.nn.Module, peft_config: peft.PeftConfig | None) -> None:
        """Refuse, before peft touches the model, a layer type the technique does not handle."""
        if not self.linear_only or peft_config is None:
            return
        from peft.tuners.tuners_utils import check_target_module_exists

        conv = [name for name, module in model.named_modules()
                if _is_conv1d(module) and check_target_module_exists(peft_config, name)]
        if conv:
            handles = [n for n, s in METHODS.items() if not s.linear_only and not s.prompt_learning and not s.full
                       and s.group in {self.group, "LoRA family"}]
            raise MethodError(
                f'method "{self.name}" does not support the {model.config.model_type} architecture: its target '
                f"layers ({', '.join(sorted({n.split('.')[-1] for n in conv}))}) are GPT-2-style Conv1D, and peft "
                f"implements {self.title} for torch.nn.Linear layers only",
                f"use {', '.join(handles[:4])} on this model (they handle Conv1D), or a model with linear layers")


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


# Presets for the three shapes of technique: an entry names only what differs from its kind.
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}


def _adapter(**fields: Any) -> MethodSpec:
    """A weight adapter on chosen layers (targets from the architecture's table), mergeable into the base."""
    return MethodSpec(**{"arch_defaults": _lora_arch, "mergeable": True, "needs_targets": True, **fields})


def _lora(defaults: dict[str, Any] | None = None, **fields: Any) -> MethodSpec:
    """A LoRA preset: peft's LoraConfig with LoRA's defaults, changed where the variant differs."""
    return _adapter(config_cls=peft.LoraConfig, defaults={**_LORA_DEFAULTS, **(defaults or {})}, **fields)


def _compact(**fields: Any) -> MethodSpec:
    """A compact adapter (IA3, LoHa, LoKr, VeRA, OFT): a weight adapter listed in its own group."""
    return _adapter(group="compact adapters", **fields)


def _prompt(**fields: Any) -> MethodSpec:
    """A prompt-learning technique: virtual tokens; the model's own weights stay as they are, nothing to merge."""
    return MethodSpec(**{"prompt_learning": True, "group": "prompt learning", **fields})


register(_lora(
    name="lora",
    title="Low-rank adaptation",
    summary="LoRA: trainable low-rank updates added to chosen weight matrices (Hu et al. 2021).",
    when='the default: strong results at ~0.1-1% of the weights, merges away at no inference cost',
    trains='low-rank A, B matrices on chosen weights',
))
register(_compact(
    name="ia3",
    title="IA3 activation scaling",
    summary="IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022).",
    config_cls=peft.IA3Config,
    arch_defaults=_ia3_arch,
    when='the smallest weight adapter (a few thousand numbers); good when memory or storage is tight',
    trains='scaling vectors on keys, values, feed-forward',
))
register(_prompt(
    name="prefix",
    title="Prefix tuning (MLP-reparameterised)",
    summary="Prefix tuning: trainable key/value prefixes in every layer, reparameterised by an MLP "
            "during training (Li & Liang 2021).",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": True},
    when='generation tasks on large models; trains no weights of the model itself',
    trains='key/value prefixes in every layer (via an MLP)',
))
register(_prompt(
    name="ptuning-v2",
    title="P-tuning v2 (deep prompts)",
    summary="P-tuning v2: deep prompts in every layer, trained directly without reparameterisation "
            "(Liu et al. 2021); prefix tuning as used for understanding tasks.",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": False},
    when='understanding tasks (classification, tagging) with deep prompts; close to full fine-tuning on large models',
    trains='key/value prefixes in every layer',
))
register(_prompt(
    name="prompt",
    title="Prompt tuning (soft prompt)",
    summary="Prompt tuning: trainable soft-prompt embeddings prepended to the input (Lester et al. 2021).",
    config_cls=peft.PromptTuningConfig,
    defaults={"num_virtual_tokens": 20, "prompt_tuning_init": "RANDOM"},
    when='very large models (10B+), where a soft prompt alone matches fine-tuning; weakest on small models',
    trains='virtual input-token embeddings',
))
register(_prompt(
    name="ptuning",
    title="P-tuning (prompt encoder)",
    summary="P-tuning: virtual input tokens produced by a prompt encoder, MLP or LSTM (Liu et al. 2021).",
    config_cls=peft.PromptEncoderConfig,
    defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128, "encoder_reparameterization_type": "MLP"},
    when='few-shot understanding tasks on mid-sized models',
    trains='virtual tokens from a prompt encoder',
))


# --- the LoRA family -------------------------------------------------------------------------

def _loraplus_optimizer(model, lr: float, weight_decay: float, options: dict[str, Any]) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al. 2024): the B matrices learn ``loraplus_lr_ratio`` times faster than A (peft's helper)."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=options["loraplus_lr_ratio"],
                                     loraplus_weight_decay=weight_decay, weight_decay=weight_decay)


register(_lora(
    name="dora",
    title="DoRA (weight-decomposed LoRA)",
    summary="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (Liu et al. 2024).",
    defaults={"use_dora": True},
    when="low ranks (r 4-8), where it closes part of the gap to full fine-tuning; ~1.5-2x LoRA's step time",
    trains="LoRA A, B + a magnitude per output",
))
register(_lora(
    name="rslora",
    title="rsLoRA (rank-stabilised LoRA)",
    summary="rsLoRA: LoRA scaled by alpha/sqrt(r) instead of alpha/r, so higher ranks keep learning (Kalajdzievski "
            "2023).",
    defaults={"r": 16, "lora_alpha": 16, "use_rslora": True},
    when="ranks of 16 and up, where plain LoRA's alpha/r scaling starves the update",
    trains="LoRA A, B (rank-stabilised scaling)",
))
register(_lora(
    name="lora-plus",
    title="LoRA+ (larger learning rate for B)",
    summary="LoRA+: plain LoRA trained with a learning rate loraplus_lr_ratio times larger for the B matrices "
            "(Hayou et al. 2024; peft.optimizers.create_loraplus_optimizer).",
    extra_options={"loraplus_lr_ratio": 16.0},
    make_optimizer=_loraplus_optimizer,
    when="short budgets: same adapter as LoRA, reaches a given loss in fewer steps",
    trains="LoRA A, B (B at 16x the learning rate)",
))
register(_lora(
    name="pissa",
    title="PiSSA initialisation",
    summary="PiSSA: LoRA initialised from the principal singular vectors of each weight, the rest kept as the frozen "
            "residual (Meng et al. 2024); saved as a plain LoRA of the original base.",
    defaults={"lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": "pissa"},
    converts_on_save=True,
    when="faster convergence than LoRA's zero init; the saved adapter has rank 2r (peft's conversion)",
    trains="LoRA A, B started at the principal components",
))
register(_lora(
    name="olora",
    title="OLoRA initialisation",
    summary="OLoRA: LoRA initialised by a QR decomposition of each weight (Büyükakyüz 2024); saved as a plain LoRA of "
            "the original base.",
    defaults={"lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": "olora"},
    linear_only=True,
    converts_on_save=True,
    when="like PiSSA, a faster start than LoRA; cheaper to initialise (QR, no SVD)",
    trains="LoRA A, B started at an orthonormal basis",
))


# --- AdaLoRA: a rank budget reallocated during training -------------------------------------

def _adalora_schedule(model, total_steps: int, options: dict[str, Any]) -> list[str]:
    """AdaLoRA needs the run's step budget: total_step, and (unless set) warm-up / final phases of 10% / 20%."""
    config = model.peft_config[model.active_adapter]
    config.total_step = total_steps
    if "tinit" not in options:
        config.tinit = int(0.1 * total_steps)
    if "tfinal" not in options:
        config.tfinal = int(0.2 * total_steps)
    if config.tinit >= config.total_step - config.tfinal:
        config.tinit, config.tfinal = 0, 0
    return [f"AdaLoRA rank schedule: total_step={config.total_step}, tinit={config.tinit}, tfinal={config.tfinal}"]


def _adalora_step(model, step: int) -> None:
    model.base_model.update_and_allocate(step)


def _adalora_finalize(model) -> list[str]:
    """The saved adapter keeps only the ranks of the final budget: mask the kept weights the same way."""
    config = model.peft_config[model.active_adapter]
    if not config.rank_pattern:
        return []
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, config.rank_pattern)
    kept = sum(sum(bool(x) for x in v) for v in config.rank_pattern.values())
    return [f"AdaLoRA kept {kept} of {sum(len(v) for v in config.rank_pattern.values())} ranks"]


def _adalora_get_state(model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    allocator = model.base_model.rankallocator
    tensors = {f"{kind}/{name}": value for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
               for name, value in getattr(allocator, kind).items()}
    pattern = model.peft_config[model.active_adapter].rank_pattern
    return tensors, {"rank_pattern": {k: [bool(x) for x in v] for k, v in pattern.items()} if pattern else None}


def _adalora_set_state(model, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    allocator = model.base_model.rankallocator
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        getattr(allocator, kind).clear()
    for key, value in tensors.items():
        kind, name = key.split("/", 1)
        getattr(allocator, kind)[name] = value
    model.peft_config[model.active_adapter].rank_pattern = data.get("rank_pattern")


register(_adapter(
    name="adalora",
    title="AdaLoRA (adaptive rank budget)",
    summary="AdaLoRA: SVD-shaped LoRA whose rank budget moves during training to the layers that matter "
            "(Zhang et al. 2023); total_step follows the run's step budget.",
    config_cls=peft.AdaLoraConfig,
    defaults={"init_r": 12, "target_r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
    build_defaults={"total_step": 1},
    arch_defaults=_adalora_arch,
    on_schedule=_adalora_schedule,
    on_step=_adalora_step,
    finalize=_adalora_finalize,
    get_state=_adalora_get_state,
    set_state=_adalora_set_state,
    when="many target layers and a fixed parameter budget: spends rank where it helps most",
    trains="LoRA-style P, Lambda, Q with a moving rank budget",
))


# --- compact adapters ------------------------------------------------------------------------

register(_compact(
    name="loha",
    title="LoHa (low-rank Hadamard product)",
    summary="LoHa: the weight update as the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022; "
            "LyCORIS).",
    config_cls=peft.LoHaConfig,
    defaults={"r": 8, "alpha": 8},
    linear_only=True,
    when="a higher effective rank than LoRA for the same parameter count",
    trains="two low-rank pairs per weight, multiplied elementwise",
))
register(_compact(
    name="lokr",
    title="LoKr (low-rank Kronecker product)",
    summary="LoKr: the weight update as a Kronecker product of a small and a low-rank matrix (Edalati et al. 2022; "
            "LyCORIS).",
    config_cls=peft.LoKrConfig,
    defaults={"r": 8, "alpha": 8},
    linear_only=True,
    when="very small adapters with full-rank updates (Kronecker structure)",
    trains="Kronecker factors per weight",
))
register(_compact(
    name="vera",
    title="VeRA (shared random projections)",
    summary="VeRA: one pair of frozen random low-rank matrices shared by all layers; only per-layer scaling vectors "
            "train (Kopiczko et al. 2024).",
    config_cls=peft.VeraConfig,
    defaults={"r": 256},
    when="LoRA-like quality with 10x fewer trainable parameters; needs higher learning rates",
    trains="two scaling vectors per layer (shared frozen projections)",
))
register(_compact(
    name="oft",
    title="OFT (orthogonal fine-tuning)",
    summary="OFT: each weight is rotated by a trained block-diagonal orthogonal matrix, which keeps the angles "
            "between neurons (Qiu et al. 2023).",
    config_cls=peft.OFTConfig,
    defaults={"r": 0, "oft_block_size": 32},
    linear_only=True,
    when="keeping the pretrained model's knowledge (less forgetting); popular for diffusion, fine for text",
    trains="block-diagonal orthogonal rotations",
))


# --- selective: existing parameters ----------------------------------------------------------

register(_adapter(
    name="ln-tuning",
    title="LayerNorm tuning",
    summary="LN tuning: only the LayerNorm (RMSNorm) weights and biases train (Zhao et al. 2023; peft's "
            "LNTuningConfig).",
    config_cls=peft.LNTuningConfig,
    arch_defaults=_ln_arch,
    group="selective (BitFit, LayerNorm)",
    when="a strong, tiny baseline (0.01-0.1% of the weights); often close to LoRA on classification",
    trains="the LayerNorm / RMSNorm weights and biases",
))
register(_adapter(
    name="bitfit",
    title="BitFit (bias terms)",
    summary="BitFit: only bias terms train (Ben Zaken et al. 2022), here the biases of every linear layer that has "
            "one, as peft's BEFT adapter (a trained bias delta), so plain peft loads it.",
    config_cls=peft.BeftConfig,
    arch_defaults=_no_arch,
    model_defaults=_bias_layers,
    linear_only=True,
    group="selective (BitFit, LayerNorm)",
    when="the smallest baseline on encoders with biases (BERT, RoBERTa, BART, Qwen2); models without biases "
         "(Llama, T5) have nothing to train",
    trains="the linear layers' biases",
))


# --- reference ---------------------------------------------------------------------------------

register(MethodSpec(
    name="full",
    title="Full fine-tuning",
    summary="Full fine-tuning: every weight trains (same data, loop and evaluation); the run saves a plain "
            "transformers model, the reference row of every comparison.",
    config_cls=None,
    full=True,
    mergeable=False,
    group="reference (full)",
    when="the quality ceiling to measure adapters against; needs memory for all weights and their optimizer state",
    trains="every weight",
))

# The order `peftlab methods` and the docs list the groups in.
GROUPS = ["LoRA family", "compact adapters", "prompt learning", "selective (BitFit, LayerNorm)", "reference (full)"]


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
        "group": spec.group,
        "when": spec.when,
        "trains": spec.trains,
        "peft_config": spec.config_cls.__name__ if spec.config_cls else "(none: a plain transformers model)",
        "defaults": {**spec.defaults, **spec.extra_options},
        "prompt_learning": spec.prompt_learning,
        "mergeable": spec.mergeable,
        "tasks": sorted(spec.tasks & set(_registered_tasks())),
        "options": spec.option_names(),
    }
    if model_type and spec.model_defaults:
        info["defaults"] = {**info["defaults"], "target_modules": "(read off the model)"}
    elif model_type and spec.config_cls is not None:
        info["defaults"] = {**spec.resolve_options(model_type, {}), **spec.extra_options} if (
            not spec.needs_targets or spec.arch_defaults(model_type)) else {
            **info["defaults"], "target_modules": "(none known: set target_modules)"}
    return info

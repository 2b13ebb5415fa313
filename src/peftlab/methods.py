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
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import constants as peft_tables

from peftlab.errors import MethodError, did_you_mean
from peftlab.model import untrained_modules
from peftlab.tasks import TASKS

# Fields of peft configs that peftlab sets itself; users do not pass them as options.
_MANAGED_FIELDS = {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision",
                   "inference_mode", "peft_version"}

# The encoder families transformers ships a sequence-classification head for that users commonly fine-tune: each
# has default targets for every weight adapter (a table entry below or in peft's tables;
# tests/test_encoder_families.py).
# An encoder not listed still gets targets read off the loaded model (_attention_targets).
ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "deberta", "deberta-v2", "albert", "mpnet",
                    "distilbert", "electra", "modernbert")

# Where peft's own target-module tables have no entry, peftlab adds one.
_EXTRA_LORA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "camembert": ["query", "value"],  # a RoBERTa
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],  # fused query/key/value projection
}
_EXTRA_IA3_TARGETS = {
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "camembert": (["key", "value", "output.dense"], ["output.dense"]),
    "electra": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "albert": (["key", "value", "ffn_output"], ["ffn_output"]),
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
    "modernbert": (["Wqkv", "mlp.Wo"], ["mlp.Wo"]),
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
_EXTRA_LN_TARGETS = {name: ["LayerNorm"] for name in ("bert", "roberta", "xlm-roberta", "camembert", "deberta",
                                                      "deberta-v2", "electra", "mpnet")}
_EXTRA_LN_TARGETS["distilbert"] = ["sa_layer_norm", "output_layer_norm"]
_EXTRA_LN_TARGETS["albert"] = ["LayerNorm", "full_layer_layer_norm"]
# (ModernBERT: read off the model, _norm_layers: its first layer's attn_norm is an Identity, not a norm)


def _ln_arch(model_type: str) -> dict[str, Any]:
    targets = _EXTRA_LN_TARGETS.get(model_type) or peft_tables.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING.get(
        model_type)
    return {"target_modules": list(targets)} if targets else {}


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D (GPT-2 style)


# --- defaults read off the loaded model, where the tables have no entry -------------------------

_QUERY_NAMES = {"q", "query", "q_proj", "query_proj", "q_lin", "wq"}
_KEY_NAMES = {"k", "key", "k_proj", "key_proj", "k_lin", "wk"}
_VALUE_NAMES = {"v", "value", "v_proj", "value_proj", "v_lin", "wv"}
_FUSED_QKV = re.compile(r"qkv|in_proj|query_key_value|c_attn", re.IGNORECASE)
_TARGET_FIELDS = {"target_modules", "feedforward_modules"}


def _attention_linears(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers inside the model's attention modules, in order of appearance."""
    names: list[str] = []
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for sub, layer in module.named_modules():
            short = sub.rpartition(".")[2]
            if sub and (isinstance(layer, torch.nn.Linear) or _is_conv1d(layer)) and short not in names:
                names.append(short)
    return names


def _attention_targets(model: torch.nn.Module, *kinds: set[str]) -> list[str]:
    """The attention's projections of the given kinds (query / key / value names), else its fused projection."""
    linears = _attention_linears(model)
    chosen = [next((n for n in linears if n.lower() in kind), None) for kind in kinds]
    if all(chosen):
        return chosen
    return [n for n in linears if _FUSED_QKV.search(n)][:1]


def _lora_from_model(model: torch.nn.Module) -> dict[str, Any]:
    """LoRA-style targets of an architecture without a table entry: the attention's query and value layers."""
    targets = _attention_targets(model, _QUERY_NAMES, _VALUE_NAMES)
    return {"target_modules": targets} if targets else {}


def _ia3_from_model(model: torch.nn.Module) -> dict[str, Any]:
    """IA3's targets without a table entry: the attention's keys and values (no feed-forward layer is guessed)."""
    targets = _attention_targets(model, _KEY_NAMES, _VALUE_NAMES)
    return {"target_modules": targets, "feedforward_modules": []} if targets else {}


def _norm_layers(model: torch.nn.Module) -> dict[str, Any]:
    """LN tuning's targets without a table entry: exactly the normalisation layers that have weights."""
    names = [name for name, module in model.named_modules()
             if name and "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(False))]
    return {"target_modules": "^(" + "|".join(re.escape(n) for n in names) + ")$"} if names else {}


def _int_attr(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)  # through the config's attribute_map (DistilBERT: n_layers, n_heads, dim)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _layers_config(model: torch.nn.Module) -> Any:
    """The config that holds the layer counts: a composite encoder-decoder's (transformers' EncoderDecoderModel,
    whose own config has none) is its decoder's, where the prefix and the generated tokens live; peft reads only
    the top-level config and asks for num_layers otherwise."""
    config = model.config
    decoder = getattr(config, "decoder", None)
    if getattr(config, "is_encoder_decoder", False) and _int_attr(config, "num_hidden_layers") is None and decoder:
        return decoder
    return config


def _prompt_dims(model: torch.nn.Module) -> dict[str, Any]:
    """Prompt / P-tuning: virtual tokens enter as input embeddings, so token_dim is the input embedding's width
    (ALBERT: embedding_size, not hidden_size); layers and heads through the config's own attribute names."""
    config = _layers_config(model)
    dims = {"num_layers": _int_attr(config, "num_hidden_layers"),
            "num_attention_heads": _int_attr(config, "num_attention_heads")}
    try:
        dims["token_dim"] = int(model.get_input_embeddings().weight.shape[1])
    except (AttributeError, NotImplementedError, IndexError):
        pass
    return {k: v for k, v in dims.items() if v}


def _prefix_dims(model: torch.nn.Module) -> dict[str, Any]:
    """Prefix tuning: keys and values per layer, so token_dim is the attention's width (the hidden size)."""
    config = _layers_config(model)
    dims = {"num_layers": _int_attr(config, "num_hidden_layers"),
            "num_attention_heads": _int_attr(config, "num_attention_heads"),
            "token_dim": _int_attr(config, "hidden_size")}
    return {k: v for k, v in dims.items() if v}


# --- does the model consume a key/value cache (prefix tuning's way into every layer)? -----------

_CACHE_ARGS = {"past_key_values", "cache", "past_key_value", "layer_past"}


def _forward_params(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls.forward).parameters)
    except (AttributeError, TypeError, ValueError):
        return set()


def _consumes_cache(top: type, backbone: type, attention: list[type]) -> bool:
    """peft hands prefixes over as ``past_key_values`` of the model or its backbone (``cache=`` in transformers
    5.2x's BERT family, compat.py); they only act if the attention layers take that cache."""
    entry = "past_key_values" in _forward_params(top) or bool({"past_key_values", "cache"} & _forward_params(backbone))
    return entry and any(_CACHE_ARGS & _forward_params(cls) for cls in attention)


def takes_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the loaded model feeds a key/value cache to its attention layers."""
    backbone = getattr(model, "base_model", model)
    attention = list({type(m) for m in model.modules() if "attention" in type(m).__name__.lower()})
    return _consumes_cache(type(model), type(backbone), attention)


def kv_cache_support(model_type: str) -> bool | None:
    """:func:`takes_kv_cache` for an architecture's sequence-classification class, from transformers' code alone
    (no model built); None when transformers has no such class."""
    import transformers
    from transformers.models.auto import modeling_auto

    try:
        top = getattr(transformers, modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type])
        backbone = getattr(transformers, modeling_auto.MODEL_MAPPING_NAMES[model_type])
    except (KeyError, AttributeError, ImportError):
        return None
    module = sys.modules.get(backbone.__module__)
    attention = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, torch.nn.Module)
                 and "attention" in obj.__name__.lower()] if module else []
    return _consumes_cache(top, backbone, attention)


def _bias_layers(model: torch.nn.Module) -> dict[str, Any]:
    """BitFit's targets: every linear layer that has a bias, except those of the head, which is trained whole
    anyway (modules_to_save: peft's classifier / score, matched by name suffix as peft does, so DistilBERT's
    pre_classifier too, and what the checkpoint lacked, such as DeBERTa's pooler)."""
    whole = untrained_modules(model)
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module.bias is not None
             and not any(part.endswith(("classifier", "score", "lm_head")) for part in name.split("."))
             and not any(name == w or name.startswith(w + ".") for w in whole)]
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
class BudgetHint:
    """What the calibration (scripts/calibrate_defaults.py, docs/techniques.md) found a technique needs on a task
    family beyond the offline comparison recipe's budget: how many optimizer steps of how large a batch it took to
    beat the majority baseline at its default rate, and one line on what was measured."""

    note: str
    steps: int | None = None  # None: no budget tried was enough
    batch: int = 32

    def short_of(self, steps: int, batch: int) -> bool:
        """Is a run of ``steps`` x ``batch`` examples shorter than what the technique needed?"""
        return self.steps is None or steps * batch < self.steps * self.batch

    def steps_at(self, batch: int) -> int | None:
        """The steps it needed, at another batch size (the same number of examples)."""
        return None if self.steps is None else -(-self.steps * self.batch // batch)

    def __str__(self) -> str:
        need = (f"needs about {self.steps} steps of batch {self.batch} at its default rate" if self.steps
                else "no budget tried was enough")
        return f"{need}; {self.note}"


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
    tasks: frozenset[str] = frozenset(TASKS)  # every registered family unless the entry says otherwise
    # why a technique does not fit a task family it leaves out ({task: reason}; `peftlab methods` and the error say it)
    unsupported: dict[str, str] = field(default_factory=dict)
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
    # defaults read off the loaded model beneath the architecture's table: targets where the table has no entry
    # (the attention's query/value layers of an unknown encoder), prompt learning's token_dim / layers / heads;
    # never raises, {} when it finds nothing
    model_fallback: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    # feeds trained keys/values to every layer through the model's key/value cache (prefix tuning): refused on
    # models whose attention takes none (takes_kv_cache)
    needs_kv_cache: bool = False
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
    # the default learning rate: a comparison's rate for the technique when neither a per-method override nor the
    # recipe sets one (docs/compare.md has the reasons for each); every registered technique has one
    learning_rate: float = 0.0
    # a task family that needs another default rate than learning_rate: {task: rate}
    task_learning_rates: dict[str, float] = field(default_factory=dict)
    # the test suite's tiny random models learn their keyword task within a few dozen steps only at rates above the
    # defaults for real models, by a factor that differs per technique (0.3x-50x): the rate they train at
    # (peftlab.testing.tiny_model_rate); None: learning_rate itself; per task family where that differs
    test_learning_rate: float | None = None
    test_task_learning_rates: dict[str, float] = field(default_factory=dict)
    # what the calibration found a task family needs beyond the default budget: {task: BudgetHint}; `peftlab methods`
    # prints it, and a comparison's verdict repeats it for the techniques that did not beat the baseline and sizes
    # its next command's budget by it
    budget_hints: dict[str, BudgetHint] = field(default_factory=dict)

    def learning_rate_for(self, task: str) -> float:
        """The default learning rate for ``task`` (a family's own rate, else the technique's)."""
        return self.task_learning_rates.get(task, self.learning_rate)

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
            why = f": {self.unsupported[task]}" if task in self.unsupported else ""
            raise MethodError(
                f'method "{self.name}" does not support task "{task}"{why}',
                f"it supports: {', '.join(sorted(self.tasks))}"
                + (f"; for {task} try {', '.join(others)}" if others else ""),
            )

    def resolve_options(self, model_type: str, options: dict[str, Any],
                        model: torch.nn.Module | None = None) -> dict[str, Any]:
        """General defaults < fallbacks read off the model < architecture defaults < defaults read off the model
        < the user's options.

        peftlab's own options (``extra_options``) are not included: they are not peft config fields.
        """
        options = {k: v for k, v in options.items() if k not in self.extra_options}
        arch = self.arch_defaults(model_type)
        from_model = self.model_defaults(model) if self.model_defaults and model is not None and (
            "target_modules" not in options) else {}
        fallback = self.model_fallback(model) if self.model_fallback and model is not None else {}
        if "target_modules" in arch or "target_modules" in options:  # the table or the user named the targets
            fallback = {k: v for k, v in fallback.items() if k not in _TARGET_FIELDS}
        resolved = {**self.defaults, **fallback, **arch, **from_model, **options}
        if self.needs_targets and not resolved.get("target_modules") and not (self.model_defaults and model is None):
            raise MethodError(
                f'method "{self.name}" has no default target modules for architecture "{model_type}"',
                "set method.options.target_modules (e.g. the attention projections' names)",
            )
        return resolved

    def build(self, task_type: str, model_type: str, options: dict[str, Any],
              model: torch.nn.Module | None = None) -> peft.PeftConfig | None:
        """The peft config for this technique on a model of ``model_type`` (None for full fine-tuning)."""
        self.check_options(options)
        if self.config_cls is None:
            return None
        resolved = {**self.build_defaults, **self.resolve_options(model_type, options, model)}
        if model is not None:  # weights the base checkpoint lacked train and save with the adapter
            untrained = self._save_names(model, untrained_modules(model, PEFT_SAVES.get(task_type, ())), task_type)
            if untrained:
                resolved["modules_to_save"] = list(dict.fromkeys([*(resolved.get("modules_to_save") or []),
                                                                  *untrained]))
        try:
            return self.config_cls(task_type=task_type, **resolved)
        except (TypeError, ValueError) as error:
            raise MethodError(f'invalid options for method "{self.name}": {error}') from None

    def _save_names(self, model: torch.nn.Module, names: list[str], task_type: str) -> list[str]:
        """``modules_to_save`` entries for modules of ``model`` (full names). peft matches an entry against the
        names in the PeftModel by string suffix (``key.endswith(entry)``), so a bare name can catch modules peft
        adds itself (ModernBERT's ``head`` would catch P-tuning's ``prompt_encoder.default.mlp_head``) or
        another module of the model. Those entries carry the PeftModel path: ``base_model.`` + name under prompt
        learning for the task types whose PeftModel marks them trainable on itself (sequence classification:
        PeftModel.base_model is the transformers model), ``base_model.model.`` + name under a tuner. Prompt
        learning for generation marks them on the transformers model (``PeftModel.add_adapter``), where the full
        name is the path; the prompt encoder is not in there. Bare names are kept where they are unambiguous:
        peft's guard that keeps adapter layers out of saved modules matches bare names only."""
        if self.prompt_learning:
            return [f"base_model.{name}" if task_type in PEFT_SAVES else name for name in names]
        every = [other for other, _ in model.named_modules()]
        return [f"base_model.model.{name}" if any(o != name and o.endswith(name) for o in every) else name
                for name in names]

    def check_model(self, model: torch.nn.Module, peft_config: peft.PeftConfig | None) -> None:
        """Refuse, before peft touches the model, a layer type or an attention the technique does not handle."""
        if self.needs_kv_cache and not takes_kv_cache(model):
            others = [n for n, s in METHODS.items() if s.prompt_learning and not s.needs_kv_cache]
            raise MethodError(
                f'method "{self.name}" does not support the {target_model_type(model.config)} architecture: its '
                f"attention layers take no key/value cache ({type(model).__name__}), and {self.title.split(' (')[0]} "
                "hands its trained prefixes to every layer through that cache",
                f"use lora (or {' / '.join(others)}: prompt learning at the input) on this model")
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

# Modules peft already trains and saves for a task type, named as its modules_to_save rule matches them
# (PeftModelForSequenceClassification adds these to every SEQ_CLS config); untrained_modules() skips what they hold.
PEFT_SAVES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def register(spec: MethodSpec) -> MethodSpec:
    if not spec.learning_rate > 0:  # a new technique gets a deliberate default rate, not a silent fallback
        raise ValueError(f'method "{spec.name}" needs a default learning_rate (docs/compare.md lists the rates)')
    unknown = (set(spec.task_learning_rates) | set(spec.test_task_learning_rates) | set(spec.budget_hints)) - spec.tasks
    if unknown:
        raise ValueError(f'method "{spec.name}" sets learning rates for tasks it does not support: {sorted(unknown)}')
    METHODS[spec.name] = spec
    return spec


def spec_for_peft_type(peft_type: Any) -> MethodSpec | None:
    """The registered technique an adapter of this peft type (``LORA``, ``PREFIX_TUNING``, ...) was made with, for
    plain-peft adapters that name no peftlab method; the first registered of those sharing the peft config class (LoRA
    and its variants; prefix tuning and P-tuning v2), which agree on their capability flags. None: not registered."""
    wanted = str(getattr(peft_type, "value", peft_type))
    for spec in METHODS.values():
        if spec.config_cls is not None and str(getattr(peft_type_of(spec.config_cls), "value", "")) == wanted:
            return spec
    return None


def peft_type_of(config_cls: type[peft.PeftConfig]) -> Any:
    """The peft type a peft config class builds (peft's own mapping, read backwards)."""
    return next((kind for kind, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls is config_cls), None)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise MethodError(
            f'unknown method "{name}"{did_you_mean(name, METHODS)}', f"known methods: {', '.join(METHODS)}"
        )
    return METHODS[name]


# Presets for the three shapes of technique: an entry names only what differs from its kind.
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}


def _adapter(**fields: Any) -> MethodSpec:
    """A weight adapter on chosen layers (targets from the architecture's table, else the attention's query and
    value layers read off the model), mergeable into the base."""
    return MethodSpec(**{"arch_defaults": _lora_arch, "model_fallback": _lora_from_model, "mergeable": True,
                         "needs_targets": True, **fields})


def _lora(defaults: dict[str, Any] | None = None, **fields: Any) -> MethodSpec:
    """A LoRA preset: peft's LoraConfig with LoRA's defaults, changed where the variant differs."""
    return _adapter(config_cls=peft.LoraConfig, defaults={**_LORA_DEFAULTS, **(defaults or {})}, **fields)


def _compact(**fields: Any) -> MethodSpec:
    """A compact adapter (IA3, LoHa, LoKr, VeRA, OFT): a weight adapter listed in its own group."""
    return _adapter(group="compact adapters", **fields)


# prompt learning at the input (prompt tuning, P-tuning) and a head per token: peft 0.21's token-classification forward
# prepends the virtual tokens to the sequence and hands the labels over as they are, so the logits have
# num_virtual_tokens more positions than the labels (a shape error in the loss; its outputs would need the prompt cut
# off too). The prefix techniques hand their prompts over as keys/values and keep the positions, so they fit.
_INPUT_PROMPT_UNSUPPORTED = {
    "token-cls": "its virtual tokens are prepended to the sequence, so the model tags num_virtual_tokens positions "
                 "more than the text has (peft's token-classification forward keeps them); prefix tuning and "
                 "P-tuning v2 add their prompts as keys/values and fit",
    "qa": "its virtual tokens are prepended to the sequence, so every answer position moves by num_virtual_tokens "
          "while peft's question-answering forward hands the start / end positions over unchanged; prefix tuning "
          "and P-tuning v2 add their prompts as keys/values and fit"}
_INPUT_PROMPT_TASKS = frozenset(TASKS) - set(_INPUT_PROMPT_UNSUPPORTED)


def _prompt(**fields: Any) -> MethodSpec:
    """A prompt-learning technique: virtual tokens; the model's own weights stay as they are, nothing to merge.
    Their sizes are read off the model (input embedding width, or the attention's width for prefixes). On the tiny
    generative test models (seq2seq, causal LM) they need 5e-2 to learn the label in 12 epochs."""
    return MethodSpec(**{"prompt_learning": True, "group": "prompt learning", "model_fallback": _prompt_dims,
                         "test_task_learning_rates": {"seq2seq": 5e-2, "causal-lm": 5e-2}, **fields})


# Default learning rates (learning_rate; docs/compare.md gives the source of each). Prompt techniques train few
# parameters from scratch and need rates 10-100x those of weight adapters. The published recipes
# (src/peftlab/recipes/) use LoRA 3e-4 and IA3 1e-3 on roberta-large over 12-20 epochs, IA3 8e-3 on mt0-large,
# prefix tuning 1e-2 (3e-2 on bloomz-560m, a causal LM); comparisons run short step budgets, so the defaults sit at
# the upper end of each range (LoRA 2e-3 is the quickstart's rate, P-tuning v2 3e-2 that of the MiniLM recipe).
# LoRA variants: LoRA's rate, lower where the start is not zero (PiSSA / OLoRA begin at the principal components) or
# B already learns 16x faster (LoRA+); AdaLoRA and the compact adapters a little higher; VeRA trains only scaling
# vectors and needs ~10x LoRA's rate (Kopiczko et al. 2024); the selective techniques train few parameters, each
# carrying a lot (rates as for IA3); full fine-tuning the usual BERT-family rate.
# Sequence classification has its own rates (task_learning_rates) where the calibration sweep on the offline
# comparison recipe (scripts/calibrate_defaults.py, docs/techniques.md "Calibrated defaults") found that the general
# rate leaves the majority class at the recipe's 60 steps and a rate 3-10x higher does not: the smallest rate within
# one point of the best of x1 / x3 / x10. Full fine-tuning takes x3 (6e-5), not the sweep's x10 (2e-4, best on the
# 22M MiniLM), which is past the usual range for large encoders.


register(_lora(
    name="lora",
    learning_rate=2e-3,
    test_learning_rate=1e-2,
    title="Low-rank adaptation",
    summary="LoRA: trainable low-rank updates added to chosen weight matrices (Hu et al. 2021).",
    when='the default: strong results at ~0.1-1% of the weights, merges away at no inference cost',
    trains='low-rank A, B matrices on chosen weights',
))
register(_compact(
    name="ia3",
    learning_rate=8e-3,
    task_learning_rates={"seq-cls": 0.024},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=5e-2,
    title="IA3 activation scaling",
    summary="IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022).",
    config_cls=peft.IA3Config,
    arch_defaults=_ia3_arch,
    model_fallback=_ia3_from_model,
    when='the smallest weight adapter (a few thousand numbers); good when memory or storage is tight',
    trains='scaling vectors on keys, values, feed-forward',
))
register(_prompt(
    name="prefix",
    learning_rate=1e-2,
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes it stayed at the majority class at every rate from 3e-3 to 1e-1 and every budget up to 360 steps: its MLP-made prefixes outgrow the real tokens' keys and values until every review gets the same [CLS] output; use ptuning-v2 (the same prefixes without the MLP) (docs/techniques.md#calibrated-defaults)"),
                  "causal-lm": BudgetHint("on SmolLM2 / Rotten Tomatoes labels it stayed below always answering \"positive\" (0.66) at 0.3x-3x its rate for 30 steps of batch 8 and at its rate up to 120 steps (0.00 / 0.58 / 0.21 / 0.34 every 30): unstable there; LoRA scored 0.81 at 30 (docs/techniques.md#calibrated-defaults)"),
                  "seq2seq": BudgetHint("on the offline BERT2BERT / Rotten Tomatoes labels it generated almost nothing after 100 steps of batch 16 at 0.3x-3x its rate (accuracy 0.00-0.01, LoRA 0.71) (docs/techniques.md#calibrated-defaults)")},
    title="Prefix tuning (MLP-reparameterised)",
    summary="Prefix tuning: trainable key/value prefixes in every layer, reparameterised by an MLP "
            "during training (Li & Liang 2021).",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": True},
    model_fallback=_prefix_dims,
    needs_kv_cache=True,
    when='generation tasks on large models; trains no weights of the model itself',
    trains='key/value prefixes in every layer (via an MLP)',
))
register(_prompt(
    name="ptuning-v2",
    learning_rate=3e-2,
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes 0.732 at 120 steps (majority class 0.596), still the majority class at 60 (docs/techniques.md#calibrated-defaults)", steps=120),
                  "causal-lm": BudgetHint("on SmolLM2 / Rotten Tomatoes labels it stayed below always answering \"positive\" (0.66) at 0.3x-3x its rate for 30 steps of batch 8 (0.46-0.56) and at its rate up to 120 steps (0.34 / 0.47 / 0.66 / 0.60 every 30); LoRA scored 0.81 at 30 (docs/techniques.md#calibrated-defaults)"),
                  "seq2seq": BudgetHint("on the offline BERT2BERT / Rotten Tomatoes labels it generated almost nothing after 100 steps of batch 16 at 0.3x-3x its rate (accuracy 0.01-0.17, LoRA 0.71) (docs/techniques.md#calibrated-defaults)")},
    title="P-tuning v2 (deep prompts)",
    summary="P-tuning v2: deep prompts in every layer, trained directly without reparameterisation "
            "(Liu et al. 2021); prefix tuning as used for understanding tasks.",
    config_cls=peft.PrefixTuningConfig,
    defaults={"num_virtual_tokens": 20, "prefix_projection": False},
    model_fallback=_prefix_dims,
    needs_kv_cache=True,
    when='understanding tasks (classification, tagging) with deep prompts; close to full fine-tuning on large models',
    trains='key/value prefixes in every layer',
))
register(_prompt(
    name="prompt",
    tasks=_INPUT_PROMPT_TASKS,
    unsupported=_INPUT_PROMPT_UNSUPPORTED,
    learning_rate=3e-2,
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes 0.706 at 120 steps (majority class 0.596), still the majority class at 60 (docs/techniques.md#calibrated-defaults)", steps=120)},
    test_learning_rate=1e-2,
    title="Prompt tuning (soft prompt)",
    summary="Prompt tuning: trainable soft-prompt embeddings prepended to the input (Lester et al. 2021).",
    config_cls=peft.PromptTuningConfig,
    defaults={"num_virtual_tokens": 20, "prompt_tuning_init": "RANDOM"},
    when='very large models (10B+), where a soft prompt alone matches fine-tuning; weakest on small models',
    trains='virtual input-token embeddings',
))
register(_prompt(
    name="ptuning",
    tasks=_INPUT_PROMPT_TASKS,
    unsupported=_INPUT_PROMPT_UNSUPPORTED,
    learning_rate=1e-2,
    task_learning_rates={"seq-cls": 0.03, "causal-lm": 3e-3},  # calibrated (seq-cls at 120 steps): calibrate_defaults
    # the tiny test models keep the rates they learn at (the calibrated ones are for real models)
    test_task_learning_rates={"seq-cls": 1e-2, "seq2seq": 5e-2, "causal-lm": 5e-2},
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes 0.696 at 120 steps (majority class 0.596), still the majority class at 60 at every rate tried (docs/techniques.md#calibrated-defaults)", steps=120)},
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
    learning_rate=2e-3,
    test_learning_rate=1e-2,
    title="DoRA (weight-decomposed LoRA)",
    summary="DoRA: LoRA on the direction of each weight plus a trained magnitude vector (Liu et al. 2024).",
    defaults={"use_dora": True},
    when="low ranks (r 4-8), where it closes part of the gap to full fine-tuning; ~1.5-2x LoRA's step time",
    trains="LoRA A, B + a magnitude per output",
))
register(_lora(
    name="rslora",
    learning_rate=2e-3,
    test_learning_rate=1e-2,
    title="rsLoRA (rank-stabilised LoRA)",
    summary="rsLoRA: LoRA scaled by alpha/sqrt(r) instead of alpha/r, so higher ranks keep learning (Kalajdzievski "
            "2023).",
    defaults={"r": 16, "lora_alpha": 16, "use_rslora": True},
    when="ranks of 16 and up, where plain LoRA's alpha/r scaling starves the update",
    trains="LoRA A, B (rank-stabilised scaling)",
))
register(_lora(
    name="lora-plus",
    learning_rate=1e-3,
    test_learning_rate=5e-3,
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
    learning_rate=1e-3,
    task_learning_rates={"seq-cls": 0.01},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=1e-2,
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
    learning_rate=1e-3,
    task_learning_rates={"seq-cls": 0.01},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=1e-2,
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
    """peft counts AdaLoRA's steps from 0 (its examples call update_and_allocate before counting the step): with the
    loop's count from 1, the last step of a run with tfinal=0 masked the ranks before any importance was measured
    (a KeyError on a 1-step run)."""
    model.base_model.update_and_allocate(step - 1)


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
    learning_rate=3e-3,
    task_learning_rates={"seq-cls": 0.03},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=2e-2,
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
    learning_rate=3e-3,
    task_learning_rates={"seq-cls": 0.03, "causal-lm": 9e-3},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=2e-2,
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
    learning_rate=5e-3,
    task_learning_rates={"seq-cls": 0.015},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=5e-2,
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
    learning_rate=1e-2,
    task_learning_rates={"seq-cls": 0.1, "causal-lm": 0.03},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=5e-2,
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
    learning_rate=3e-3,
    test_learning_rate=1e-2,
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
    learning_rate=5e-3,
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes 0.732 at 120 steps and 0.784 at 240 (majority class 0.596); at 60 steps its eval loss falls (0.675 -> 0.630) but it still answers the majority class, and higher rates do worse (docs/techniques.md#calibrated-defaults)", steps=120)},
    test_learning_rate=5e-2,
    title="LayerNorm tuning",
    summary="LN tuning: only the LayerNorm (RMSNorm) weights and biases train (Zhao et al. 2023; peft's "
            "LNTuningConfig).",
    config_cls=peft.LNTuningConfig,
    arch_defaults=_ln_arch,
    model_fallback=_norm_layers,
    group="selective (BitFit, LayerNorm)",
    when="a strong, tiny baseline (0.01-0.1% of the weights); often close to LoRA on classification",
    trains="the LayerNorm / RMSNorm weights and biases",
))
register(_adapter(
    name="bitfit",
    learning_rate=5e-3,
    budget_hints={"seq-cls": BudgetHint("on MiniLM / Rotten Tomatoes 0.740 at 120 steps and 0.766 at 240 (majority class 0.596); at 60 steps its eval loss falls (0.675 -> 0.648) but it still answers the majority class, and higher rates do worse (docs/techniques.md#calibrated-defaults)", steps=120)},
    test_learning_rate=5e-2,
    title="BitFit (bias terms)",
    summary="BitFit: only bias terms train (Ben Zaken et al. 2022), here the biases of every linear layer that has "
            "one, as peft's BEFT adapter (a trained bias delta), so plain peft loads it.",
    config_cls=peft.BeftConfig,
    arch_defaults=_no_arch,
    model_defaults=_bias_layers,
    model_fallback=None,
    linear_only=True,
    group="selective (BitFit, LayerNorm)",
    when="the smallest baseline on encoders with biases (BERT, RoBERTa, BART, Qwen2); models without biases "
         "(Llama, T5) have nothing to train",
    trains="the linear layers' biases",
))


# --- reference ---------------------------------------------------------------------------------

register(MethodSpec(
    name="full",
    learning_rate=2e-5,
    task_learning_rates={"seq-cls": 6e-05},  # calibrated: scripts/calibrate_defaults.py
    test_learning_rate=1e-3,
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
        "learning_rate": spec.learning_rate,  # the default (peftlab compare's, when nothing sets one)
    }
    if spec.task_learning_rates:
        info["task_learning_rates"] = dict(spec.task_learning_rates)
    if spec.unsupported:
        info["unsupported"] = {task: why for task, why in spec.unsupported.items() if task in _registered_tasks()}
    if spec.budget_hints:
        info["budget_hints"] = {task: str(hint) for task, hint in spec.budget_hints.items()}
    if model_type and spec.model_defaults:
        info["defaults"] = {**info["defaults"], "target_modules": "(read off the model)"}
    elif model_type and spec.config_cls is not None:
        info["defaults"] = {**spec.resolve_options(model_type, {}), **spec.extra_options} if (
            not spec.needs_targets or spec.arch_defaults(model_type)) else {
            **info["defaults"], "target_modules": f"(read off the model: {_READ_OFF[spec.model_fallback]})"
            if spec.model_fallback in _READ_OFF else "(none known: set target_modules)"}
    architectures = _architectures(spec, model_type)
    if architectures:
        info["architectures"] = architectures
    return info


_READ_OFF = {_lora_from_model: "the attention's query/value layers",
             _ia3_from_model: "the attention's key/value layers", _norm_layers: "its normalisation layers"}


def _architectures(spec: MethodSpec, model_type: str | None) -> str | None:
    """Which architectures the technique supports, in a line (the encoder families, read off transformers' code)."""
    if spec.needs_kv_cache:
        others = [n for n, s in METHODS.items() if s.prompt_learning and not s.needs_kv_cache]
        support = kv_cache_support(model_type) if model_type else None
        if support is not None:
            return f"{model_type}: " + ("supported (its attention takes a key/value cache)" if support else
                                        "not supported: its attention takes no key/value cache (refused before "
                                        f"training: use lora or {' / '.join(others)})")
        families = {family: kv_cache_support(family) for family in ENCODER_FAMILIES}
        yes = [f for f, ok in families.items() if ok]
        no = [f for f, ok in families.items() if ok is False]
        return (f"models whose attention takes a key/value cache: decoder-only and encoder-decoder models, and the "
                f"encoders {', '.join(yes)}; not {', '.join(no)} (refused before training: use lora or "
                f"{' / '.join(others)} there)")
    if spec.prompt_learning:
        return "every architecture (token_dim, layers and heads read off the model)"
    if spec.needs_targets and not spec.model_defaults:
        known = [f for f in ENCODER_FAMILIES if spec.arch_defaults(f).get("target_modules")]
        return (f"default targets for the encoders {', '.join(known)} and the models in peft's tables; others: "
                + (f"read off the model ({_READ_OFF[spec.model_fallback]})" if spec.model_fallback in _READ_OFF
                   else "set target_modules"))
    return None

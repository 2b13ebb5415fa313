"""Fixes for breakages in the current Hugging Face stack, each isolated and tested.

Every workaround for an upstream bug lives here, in a section of its own, with a canary test that
fails when upstream fixes the bug (then the workaround can go). Sections and canaries:

- prefix tuning on encoder classifiers (``apply_fixes``):
  tests/test_compat.py::test_upstream_prefix_tuning_is_still_broken
- merging IA3 with a trained classification head (``unwrap_modules_to_save``):
  tests/test_compat.py::test_upstream_ia3_merge_with_a_roberta_head_is_still_broken
- attaching an adapter to a disk-offloaded base (``redirect_offloaded_weights``):
  tests/test_big_models.py::test_upstream_offload_rewrite_is_still_broken
- PiSSA / OLoRA conversion drops the other saved tensors (``restore_dropped_tensors``):
  tests/test_compat.py::test_upstream_pissa_conversion_still_drops_the_head
- prompt-learning generation and transformers' ``cache`` rename (``fix_prompt_generation``):
  tests/test_generative.py::test_upstream_prompt_learning_generation_is_still_broken
- switching a prompt-learning classifier's adapter off (``adapter_disabled``):
  tests/test_compat.py::test_upstream_disable_adapter_still_fails_for_prompt_learning_classifiers
- upstream notices that are not actionable for users (``silence_upstream_notices``):
  tests/test_compat.py::test_upstream_notices_are_still_raised
- a failed mixed-adapter forward leaves peft's adapter_names hooks behind (``guard_mixed_batch_hooks``):
  tests/test_compat.py::test_upstream_mixed_batch_hooks_still_outlive_an_error
- question answering drops the segment ids (``keep_question_answering_segments``, applied by ``apply_fixes``):
  tests/test_compat.py::test_upstream_question_answering_still_drops_token_type_ids
- prompt tuning / P-tuning generation ignores position ids (``prompt_positions_dropped``: batch
  only prompts of one length): tests/test_generative.py::test_prompt_learning_generation_does_not_depend_on_the_batch

Prefix tuning on encoder classifiers (BERT, RoBERTa, ...)
--------------------------------------------------------
transformers 5.2x renamed the key/value cache argument of the BERT-family encoders from
``past_key_values`` to ``cache`` (the old name still works through a deprecation shim on
the top-level forward, but is gone from the signature). peft 0.21's
``PeftModel._prefix_tuning_forward`` inspects the backbone's signature for
``past_key_values``, finds none, and raises "Model does not support past key values which
are required for prefix tuning." (reported upstream in huggingface/peft for transformers
v5 encoder models). The fix below replaces that method on the affected model instance
only: it builds the same prefix cache with peft's own ``get_prompt`` and hands it to the
classifier under the new name, so the forward (positions offset by the prefix length,
prefix always visible in the attention mask, classification head and loss) is exactly
the one transformers <= 5.17 + peft 0.21.0 ran. Remove it when peft checks for ``cache``.

Prompt-learning generation and transformers' ``cache`` rename
-------------------------------------------------------------
peft 0.21.2's ``prepare_inputs_for_generation`` hands the prefix over as ``past_key_values``
and looks for the running cache under that name, while transformers 5.24's generate() carries
it as ``cache=`` (and Llama-family / T5 models hand back the cache they were given even with
``use_cache=False``): prefix tuning / P-tuning v2 generations drift from the forward pass after
the first token. ``fix_prompt_generation`` (applied by ``apply_fixes``) translates between the
two names on the model instance; details in its section below.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import types
import warnings
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.utils import PeftType

from peftlab.errors import ConfigError


def _backbone_forward_params(model: PeftModel) -> set[str]:
    name = getattr(model, "transformer_backbone_name", None)
    base = model.base_model
    backbone = base.get_submodule(name) if name else base
    return set(inspect.signature(backbone.forward).parameters)


def prefix_tuning_needs_cache_fix(model: PeftModel) -> bool:
    """True when peft would refuse prefix tuning because the backbone takes ``cache=``."""
    config = model.active_peft_config
    if config.peft_type != PeftType.PREFIX_TUNING or not hasattr(model, "_prefix_tuning_forward"):
        return False
    if "past_key_values" in inspect.signature(model.base_model.forward).parameters:
        return False  # peft calls the full model directly; nothing to fix
    params = _backbone_forward_params(model)
    return "cache" in params and "past_key_values" not in params


def _prefix_tuning_forward_with_cache(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
):
    batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
    cache = self.get_prompt(batch_size)
    return self.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        labels=labels,
        cache=cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        return_dict=return_dict,
        **kwargs,
    )


def apply_fixes(model: PeftModel) -> PeftModel:
    """Apply every needed fix to a freshly built or loaded peft model (idempotent)."""
    if isinstance(model, PeftModel) and prefix_tuning_needs_cache_fix(model):
        model._prefix_tuning_forward = types.MethodType(_prefix_tuning_forward_with_cache, model)
    fix_prompt_generation(model)  # defined below
    guard_mixed_batch_hooks(model)  # defined below
    keep_question_answering_segments(model)  # defined below
    return model


# Merging IA3 with a trained classification head
# ----------------------------------------------
# peft 0.21's IA3 merge_and_unload() replaces each ModulesToSaveWrapper (the trained head of
# a SEQ_CLS adapter) through the generic BaseTuner._replace_module, which copies
# `child.weight` onto the new module; RoBERTa's head (dense + out_proj) has no `weight`, so
# the merge fails with "'RobertaClassificationHead' object has no attribute 'weight'".
# (LoRA has its own _replace_module and is not affected.) Unwrapping the heads first, with
# peft's own ModulesToSaveWrapper.unload_and_optionally_merge_module, leaves merge_and_unload
# only the IA3 layers. Harmless for every technique; remove when peft's IA3 unload handles it
# (canary: tests/test_compat.py::test_upstream_ia3_merge_with_a_roberta_head_is_still_broken).


def unwrap_modules_to_save(model: PeftModel) -> None:
    """Replace every modules_to_save wrapper by its trained module (in place), before merge_and_unload()."""
    from peft.utils.other import ModulesToSaveWrapper

    root = model.base_model.model
    for name, module in list(root.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, module.unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                                              adapter_names=None))


# Attaching an adapter to a disk-offloaded base
# ---------------------------------------------
# peft 0.21's PeftModel.from_pretrained re-dispatches a base that has layers on the CPU or
# disk (accelerate), and for disk-offloaded layers _update_offload rewrites the safetensors
# file each offloaded weight is read from, with the keys renamed for the peft model, to a
# name made by appending "-peft" to the first path component that contains "--" (as in
# the Hub cache, "models--org--name"). transformers 5 reads disk-offloaded weights straight
# from the base model's own checkpoint, and for a base in an ordinary folder (no "--" in the
# path) the "new" name is the old one, rebuilt without its leading "/": for a base named by
# a relative path (`--base models/x`) peft overwrites the user's model.safetensors with
# renamed keys, and the model no longer loads; for an absolute path it writes a renamed copy
# of the checkpoint under the working directory (upstream: the approach of
# huggingface/peft#1431; canary: test_upstream_offload_rewrite_is_still_broken). The fix: before peft runs, point every offloaded weight at a
# symlink to its file, at a cwd-relative path inside the offload folder whose first "--"
# component is ours; peft then writes its renamed copy beside it, inside the offload
# folder, and never touches the base model. Tested in tests/test_big_models.py (the base
# checkpoint's bytes are unchanged and generations equal the in-memory model's).

_LINK_DIR = "peftlab--offloaded-base"


def redirect_offloaded_weights(model, offload_folder: str) -> None:
    """Make peft's rewrite of disk-offloaded weights land in ``offload_folder`` (see above)."""
    folder = os.path.relpath(os.path.abspath(offload_folder))
    if "--" in folder:
        raise ConfigError(f'the offload folder path "{folder}" contains "--", which peft treats specially when '
                          "it rewrites offloaded weights", "use an offload folder whose path has no \"--\"")
    for module in model.modules():
        dataset = getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        for entry in (getattr(dataset, "index", None) or {}).values():
            source = entry.get("safetensors_file")
            if not source or _LINK_DIR in source:
                continue
            source = os.path.abspath(source)
            tag = hashlib.sha1(source.encode()).hexdigest()[:12]
            link = os.path.join(folder, _LINK_DIR, f"{tag}-{os.path.basename(source)}")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.realpath(link) != source:
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(source, link)
            entry["safetensors_file"] = link


# PiSSA / OLoRA conversion drops the other saved tensors
# ------------------------------------------------------
# peft 0.21's save_pretrained(path_initial_model_for_weight_conversion=...) replaces the saved
# state dict by the converted LoRA tensors only (LoraModel.subtract_mutated_init returns just
# lora_A / lora_B), so a classification head in modules_to_save is silently not saved and
# plain peft then loads a random head. The tensors it dropped are written back unchanged.
# Remove when peft's conversion keeps them (canary:
# tests/test_compat.py::test_upstream_pissa_conversion_still_drops_the_head).


def restore_dropped_tensors(weights_file, expected: dict) -> list[str]:
    """Add to the saved safetensors file every non-LoRA tensor of ``expected`` it lacks; returns their names."""
    from safetensors.torch import load_file, save_file

    saved = load_file(str(weights_file))
    missing = [k for k in expected if k not in saved and "lora_" not in k]
    if missing:
        saved.update({k: expected[k].detach().to("cpu").contiguous() for k in missing})
        save_file(saved, str(weights_file), metadata={"format": "pt"})
    return missing


# Prompt-learning generation and transformers' `cache` rename
# -----------------------------------------------------------
# transformers 5.24 renamed the key/value cache of generate() and of the models' forward from
# `past_key_values` to `cache` (forward still takes the old name through a deprecation shim
# until 5.40, but ignores it when both are set: "Both `past_key_values` and `cache` are
# set ... ignoring") and no longer makes `cache_position`. peft 0.21.2's
# prepare_inputs_for_generation still speaks the old name: it hands the prefix of prefix
# tuning / P-tuning v2 over as `past_key_values`, and it decides whether the virtual tokens
# are still to be injected by looking for `past_key_values`, which is never there. So:
# - use_cache=False: Llama-family models and T5
#   return the cache they were given even without caching (GPT-2 does not), and generate()
#   feeds it back as `cache=`; from the second new token on, that stale cache (the prefix and
#   the previous passes' keys) wins over peft's fresh prefix, and prefix / P-tuning v2
#   generations drift from the forward pass (5 of 8 prompts for P-tuning v2 on Llama).
# - use_cache=True: generate()'s own empty cache wins over the prefix (the prefix is
#   ignored), and prompt tuning / P-tuning re-inject their virtual tokens at every step.
# The fix wraps peft's prepare_inputs_for_generation on the model instance: it drops the
# fed-back cache when use_cache is False, lets peft see generate()'s cache under its old
# name, hands peft's prefix over as `cache` (without a KV cache, a fresh prefix at every step,
# also where peft's seq2seq prepare would give it on the first step only), and leaves
# everything else to peft. peftlab generates with the KV cache (linear in the generated length)
# for every technique. Greedy generation then equals step-by-step
# argmax of the forward pass with and without the KV cache, for every technique x family
# (tests/test_generative.py, batched as peftlab batches). No upstream report found (related:
# huggingface/transformers#37078, a model updates the cache it is given even with
# use_cache=False; huggingface/peft#1962). Remove when peft reads and writes `cache`
# (canary: tests/test_generative.py::test_upstream_prompt_learning_generation_is_still_broken).

_GENERATION_FIX = "_peftlab_generation_fix"


def prompt_generation_needs_cache_fix(model) -> bool:
    """True for a peft generative model whose transformers generate() carries its cache as ``cache=``."""
    from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM

    if not isinstance(model, (PeftModelForCausalLM, PeftModelForSeq2SeqLM)):
        return False
    prepare = getattr(model, "base_model_prepare_inputs_for_generation", None)
    return prepare is not None and "cache" in inspect.signature(prepare).parameters


def _prepare_inputs_for_generation_with_cache(self, *args, **kwargs):
    upstream = type(self).prepare_inputs_for_generation  # peft's, for this model's task
    config = self.active_peft_config
    if not config.is_prompt_learning:
        return upstream(self, *args, **kwargs)
    without_cache = kwargs.get("use_cache") is False
    if without_cache:
        kwargs.pop("cache", None)  # what the last forward returned, not a KV cache of this generation
    base_prepare = self.base_model_prepare_inputs_for_generation

    def base_prepare_old_name(*base_args, **base_kwargs):
        inputs = base_prepare(*base_args, **base_kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    self.base_model_prepare_inputs_for_generation = base_prepare_old_name
    try:
        inputs = upstream(self, *args, **kwargs)
    finally:
        self.base_model_prepare_inputs_for_generation = base_prepare
    cache = inputs.pop("past_key_values", None)
    if cache is None and without_cache and config.peft_type in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE):
        ids = inputs["decoder_input_ids" if self.config.is_encoder_decoder else "input_ids"]
        cache = self.get_prompt(batch_size=ids.shape[0])  # each full pass needs its own prefix
    if cache is not None:
        inputs["cache"] = cache
    return inputs


def fix_prompt_generation(model):
    """Make generate() of a prompt-learning peft model equal its forward pass (see above; idempotent)."""
    if prompt_generation_needs_cache_fix(model) and not vars(model).get(_GENERATION_FIX):
        model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_for_generation_with_cache, model)
        setattr(model, _GENERATION_FIX, True)
    return model


# Switching a prompt-learning classifier's adapter off
# ----------------------------------------------------
# peft 0.21.2's PeftModel.disable_adapter() fails for prompt-learning adapters on models without
# generate() (classifiers): for prompt learning it swaps the base model's
# prepare_inputs_for_generation, which a classifier does not have, and its cleanup then fails with
# "UnboundLocalError: cannot access local variable 'old_prepare_inputs_for_generation'". The bare
# base of a prompt-learning adapter is the base's own forward (no virtual tokens) with the saved
# modules (the classification head) switched back to the original ones; weight adapters go
# through peft's disable_adapter() unchanged. Used by inference.logits(without_adapter=True).
# Remove when peft's disable_adapter() works on prompt-learning classifiers (canary:
# tests/test_compat.py::test_upstream_disable_adapter_still_fails_for_prompt_learning_classifiers).


@contextmanager
def adapter_disabled(model: PeftModel):
    """The base model alone, as a context manager yielding the module to call (see above)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not model.active_peft_config.is_prompt_learning:
        with model.disable_adapter():
            yield model
        return
    wrappers = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for wrapper in wrappers:
        wrapper.enable_adapters(False)
    try:
        yield model.get_base_model()
    finally:
        for wrapper in wrappers:
            wrapper.enable_adapters(True)


# Upstream notices that are not actionable for users
# --------------------------------------------------
# Warnings upstream raises on peftlab's normal path, about upstream's own code, that a user can do
# nothing about; silenced process-wide when peftlab is imported (peftlab/__init__.py):
# - peft 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5
#   deprecated (FutureWarning "`is_gradient_checkpointing` is deprecated ... Use
#   `is_activation_checkpointing`") at every get_peft_model / from_pretrained. Remove when peft
#   reads is_activation_checkpointing.
# - transformers' EncoderDecoderModel (BERT2BERT) repeats its v4.12 migration notice ("Version
#   v4.12.0 introduces a better way to train encoder-decoder models ...", FutureWarning) on every
#   forward with labels. Remove when transformers drops the notice.
# Canary for both: tests/test_compat.py::test_upstream_notices_are_still_raised.

UPSTREAM_NOTICES: list[tuple[str, type[Warning]]] = [
    (r".*is_gradient_checkpointing.*", FutureWarning),
    (r".*introduces a better way to train encoder-decoder.*", FutureWarning),
]


def silence_upstream_notices() -> None:
    """Ignore the notices above (idempotent: warnings.filterwarnings drops duplicates)."""
    for message, category in UPSTREAM_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


# Prompt tuning / P-tuning generation ignores position ids
# --------------------------------------------------------
# peft 0.21.2 drops the position ids of prompt tuning / P-tuning models (virtual token embeddings
# before the input) in generate(), so a left-padded row is generated at shifted positions and its
# output depends on its batch. peftlab's generation (tasks/generation.py) therefore batches only
# prompts of one length for these models. Prefix tuning / P-tuning v2 keep their position ids (peft
# offsets them by the prefix length): their left-padded rows are generated as they are alone.
# Canary: tests/test_generative.py::test_prompt_learning_generation_does_not_depend_on_the_batch
# (without the equal-length batches the outputs differ; it fails when peft keeps position ids).

def prompt_positions_dropped(model) -> bool:
    """Whether peft drops the position ids of this model's generation (prompt tuning / P-tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning
                and config.peft_type not in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE))


# A failed mixed-adapter forward leaves its hooks behind
# -----------------------------------------------------
# peft 0.21.2's LoraModel._enable_peft_forward_hooks (a context manager) registers a forward
# pre-hook with the call's `adapter_names` on every LoRA layer and removes them after its `yield`,
# not in a `finally`: when the forward raises (a model whose LoRA layers also see inputs that are
# not batch-shaped, such as DeBERTa's relative position embeddings, or any error mid-forward), the
# hooks stay, and every later forward of that model runs with the stale adapter names: it fails
# ("Length of `adapter_names` should be the same as the number of inputs") or mixes adapters
# wrongly. The server probes mixed batches and serves many requests on one model, so one failure
# would break all that follow. The guard below removes the call's hooks however the forward ends.
# Canary: tests/test_compat.py::test_upstream_mixed_batch_hooks_still_outlive_an_error.

_CALL_HOOKS = {"_adapter_names_pre_forward_hook", "_alora_offsets_pre_forward_hook"}


def _call_hooks(model) -> list[tuple[torch.nn.Module, int]]:
    return [(module, key) for module in model.modules() for key, hook in module._forward_pre_hooks.items()
            if getattr(getattr(hook, "func", None), "__name__", None) in _CALL_HOOKS]


def remove_call_hooks(model, keep: set[tuple[int, int]] = frozenset()) -> int:
    """Remove peft's per-call forward pre-hooks (adapter_names / alora_offsets) from ``model``'s modules, except
    those in ``keep`` ((id(module), hook id): an enclosing call's)."""
    removed = 0
    for module, key in _call_hooks(model):
        if (id(module), key) not in keep:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            removed += 1
    return removed


def guard_mixed_batch_hooks(model) -> None:
    """Make the tuner's per-call hooks go away even when the forward raises (idempotent)."""
    tuner = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
    enable = getattr(tuner, "_enable_peft_forward_hooks", None)
    if enable is None or getattr(enable, "_peftlab_guarded", False):
        return

    @contextmanager
    def guarded(*args, **kwargs):
        if kwargs.get("adapter_names") is None and kwargs.get("alora_offsets") is None:
            with enable(*args, **kwargs):  # no per-call hooks: nothing to guard (the usual forward)
                yield
            return
        enclosing = {(id(module), key) for module, key in _call_hooks(tuner)}
        try:
            with enable(*args, **kwargs):
                yield
        finally:
            remove_call_hooks(tuner, keep=enclosing)  # this call's hooks, if the forward raised

    guarded._peftlab_guarded = True
    tuner._enable_peft_forward_hooks = guarded


# Question answering drops the segment ids
# ----------------------------------------
# peft 0.21.2's PeftModelForQuestionAnswering.forward names token_type_ids and position_ids in its signature and,
# for every technique but prompt learning, calls the base model without them: a BERT-style reader trained or run
# through peft sees every passage token as segment 0, while the merged model (or plain transformers) is given the
# tokenizer's segment ids, and the two disagree (found here: tests/test_qa.py's merge check). The other peft task
# classes pass them on through **kwargs. The fix hands both on under the same names on the model instance, so
# training, evaluation, serving and the merged model all see the segments the tokenizer made. Remove it when peft
# passes them (canary: tests/test_compat.py::test_upstream_question_answering_still_drops_token_type_ids). A plain
# peft user of such an adapter gets the segment-less outputs until then (docs/question-answering.md says so).


def keep_question_answering_segments(model) -> None:
    """Make a question-answering peft model pass token_type_ids / position_ids to its base (in place)."""
    from peft import PeftModelForQuestionAnswering

    if not isinstance(model, PeftModelForQuestionAnswering) or getattr(model, "_peftlab_segments", False):
        return
    original = type(model).forward

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        if self.active_peft_config.is_prompt_learning:  # this path passes them on already
            return original(self, input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, **kwargs)
        # peft's own non-prompt-learning path (hooks for adapter_names, its special arguments removed), the segment
        # and position ids included (the original binds them to its parameters and drops them)
        extra = {k: v for k, v in (("token_type_ids", token_type_ids), ("position_ids", position_ids))
                 if v is not None}
        kwargs.pop("task_ids", None)
        with self._enable_peft_forward_hooks(**kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._peftlab_segments = True

"""Fixes for breakages in the current Hugging Face stack, each isolated and tested.

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
"""

from __future__ import annotations

import inspect
import types

from peft import PeftModel
from peft.utils import PeftType


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
    return model


# Generation with prompt-learning methods
# ---------------------------------------
# With transformers 5.2x, peft 0.21's cached generation for prompt-learning adapters drifts
# from the model's own forward pass: the prefix cache is handed over as `past_key_values`
# while generate() carries its own (empty) `cache=`, so seq2seq prefix tuning ignores the
# prefix, and decoder-only prefix / prompt / P-tuning decode at the wrong positions after
# the first token. Without the KV cache, peft rebuilds the virtual tokens at every step
# and greedy generation equals step-by-step argmax of the forward pass (tested for every
# technique x family in tests/test_generative.py). The cost is quadratic in the generated
# length, which is small for label and short-answer generation.


def generation_overrides(model) -> dict:
    """Extra generate() arguments that keep generation faithful to the forward pass."""
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return {"use_cache": False}
    return {}


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
    import hashlib
    import os

    from peftlab.errors import ConfigError

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


def restore_dropped_tensors(weights_file, expected: dict) -> list[str]:
    """Add to the saved safetensors file every non-LoRA tensor of ``expected`` it lacks; returns their names."""
    from safetensors.torch import load_file, save_file

    saved = load_file(str(weights_file))
    missing = [k for k in expected if k not in saved and "lora_" not in k]
    if missing:
        saved.update({k: expected[k].detach().to("cpu").contiguous() for k in missing})
        save_file(saved, str(weights_file), metadata={"format": "pt"})
    return missing

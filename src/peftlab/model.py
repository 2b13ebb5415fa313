"""Base model and tokenizer loading: names, revisions, dtypes, devices, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging as hf_logging
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from peftlab import placement
from peftlab.fastpath import base_dtype
from peftlab.offline_models import resolve_model_name
from peftlab.config import ModelConfig
from peftlab.errors import ConfigError



def _not_found(name: str, error: Exception) -> ConfigError:
    return ConfigError(
        f'could not load the model "{name}": {error}'.splitlines()[0],
        "check model.name (a Hub id or a local folder with config.json); offline, only local "
        "folders and cached models load (try offline:minilm)",
    )


def _base_name(model_cfg: ModelConfig) -> str:
    name = resolve_model_name(model_cfg.name)
    folder = Path(name)
    if folder.is_dir() and (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ConfigError(f"{model_cfg.name} is an adapter directory, not a base model",
                          "give the base model (a Hub id or a folder with config.json)")
    return name


def load_model_config(model_cfg: ModelConfig) -> PretrainedConfig:
    name = _base_name(model_cfg)
    try:
        return AutoConfig.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _not_found(model_cfg.name, error) from None


def load_tokenizer(model_cfg: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or the one saved at ``path``), with a pad token guaranteed."""
    name = path or _base_name(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=None if path else model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _not_found(name, error) from None
    if path is None:  # a tokenizer saved with an adapter already holds the added tokens
        add_new_tokens(tokenizer, model_cfg)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f'the tokenizer of "{model_cfg.name}" has neither a pad nor an eos token')
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training batches; generation pads left where it needs to
    return tokenizer


def pad_with_eos(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """A head that reads padded batches needs a pad token id: a model without one (decoder-only) pads with its eos."""
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def load_base(model_cfg: ModelConfig, auto_class: type, **kwargs: Any) -> transformers.PreTrainedModel:
    """The frozen base model through ``auto_class`` (e.g. AutoModelForSequenceClassification)."""
    name = _base_name(model_cfg)
    if placement.uses_placement(model_cfg) or model_cfg.quantization != "none":
        kwargs = {**placement.from_pretrained_kwargs(model_cfg, auto_class, load_model_config(model_cfg), **kwargs),
                  **kwargs}
    # The load report's "newly initialized head" is expected for a task head; keep it quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with placement.quiet_dispatch():
            model, info = auto_class.from_pretrained(
                name,
                revision=model_cfg.revision,
                trust_remote_code=model_cfg.trust_remote_code,
                dtype=base_dtype(model_cfg),
                **({"attn_implementation": model_cfg.attention} if model_cfg.attention != "auto" else {}),
                output_loading_info=True,
                **kwargs,
            )
        # what from_pretrained drew at random (a task head, DeBERTa's pooler): see untrained_modules()
        model._peftlab_new_weights = sorted(info.get("missing_keys") or ())
        return model
    except (OSError, ValueError) as error:
        if "offload" in str(error) and "device_map" in kwargs:  # device_map="auto" found too little memory
            raise ConfigError(f"{model_cfg.name} does not fit in memory, so some layers must go to disk",
                              "pass an offload folder (--offload-folder DIR, or model.offload_folder)") from None
        raise _not_found(model_cfg.name, error) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def new_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the base checkpoint did not hold: ``from_pretrained`` initialised them at random
    (transformers' "newly initialized" / MISSING load report), so each load of the base draws them anew."""
    return list(getattr(model, "_peftlab_new_weights", ()))


def untrained_modules(model: torch.nn.Module, saved: tuple[str, ...] = ()) -> list[str]:
    """The modules that hold the weights the checkpoint lacked (:func:`new_weights`), each as the outermost module
    all of whose parameters are new (DeBERTa's ``pooler``, ModernBERT's ``head``), by full name.

    An adapter must train and save them (peft's ``modules_to_save``): otherwise every reload draws them at random
    again and gives other outputs. Modules inside one whose name ends with one of ``saved`` (what peft saves
    already, by its own suffix rule: a SEQ_CLS adapter's ``classifier`` / ``score``) are left out.
    """
    missing = set(new_weights(model))
    if not missing:
        return []
    found: list[str] = []
    handled: list[str] = []  # modules saved already (peft's own) or found: their submodules are covered
    for name, module in model.named_modules():
        if not name or any(name.startswith(done + ".") for done in handled):
            continue
        own = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if any(name.endswith(s) for s in saved):
            handled.append(name)
        elif own and all(p in missing for p in own):
            handled.append(name)
            found.append(name)
    # a new weight beside old ones in the same module (a bias the checkpoint lacked): that module, whole
    for key in sorted(missing):
        owner = key.rpartition(".")[0]
        if owner and not any(key.startswith(done + ".") for done in handled):
            handled.append(owner)
            found.append(owner)
    return found


def max_positions(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest input the model takes (position table minus any offset, tokenizer limit)."""
    limit = int(tokenizer.model_max_length) if tokenizer.model_max_length < 1e9 else 10**9
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = (config.pad_token_id + 1) if config.model_type in {"roberta", "xlm-roberta", "camembert"} else 0
        limit = min(limit, positions - offset)
    return limit


# --- added tokens ----------------------------------------------------------------------
# One place for the vocabulary: training adds the configured tokens and grows the
# embeddings; loading an adapter grows the base to the size it was trained with, before
# peft attaches the adapter (docs/big-models.md, "Added tokens").


def add_new_tokens(tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig) -> list[int]:
    """Add ``model.add_tokens`` / ``model.add_special_tokens`` to the tokenizer; their ids."""
    if model_cfg.add_tokens:
        tokenizer.add_tokens(list(model_cfg.add_tokens))
    if model_cfg.add_special_tokens:  # keep the tokenizer's own extra special tokens (chat markers)
        tokenizer.add_special_tokens(dict(model_cfg.add_special_tokens), replace_extra_special_tokens=False)
    return new_token_ids(tokenizer, model_cfg)


def new_token_ids(tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig) -> list[int]:
    return sorted({tokenizer.convert_tokens_to_ids(token) for token in model_cfg.new_tokens()})


def embedding_rows(model: transformers.PreTrainedModel) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


@torch.no_grad()
def fit_embeddings(model: transformers.PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   size: int | None = None) -> int:
    """Grow the token embeddings to ``size`` rows (default: enough for every token of ``tokenizer``).

    New rows (input and, when untied, output) start as the mean of the old ones, so the
    same resize at load time rebuilds the same base (transformers' default draws them at
    random). Returns the number of rows added. Never shrinks.
    """
    rows = embedding_rows(model)
    size = size if size is not None else len(tokenizer)
    if size <= rows:
        return 0
    model.resize_token_embeddings(size, mean_resizing=False)
    layers = [model.get_input_embeddings()] + ([] if tied_embeddings(model) else [model.get_output_embeddings()])
    for layer in layers:
        weight = layer.weight
        weight[rows:] = weight[:rows].float().mean(0).to(weight.dtype)
        bias = getattr(layer, "bias", None)
        if bias is not None and bias.shape[0] == size:
            bias[rows:] = bias[:rows].float().mean().to(bias.dtype)
    return size - rows


def tied_embeddings(model: transformers.PreTrainedModel) -> bool:
    """Whether there is no separate output embedding (none, or one sharing the input's weights)."""
    output = model.get_output_embeddings()
    return output is None or output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def layer_name(model: torch.nn.Module, layer: torch.nn.Module | None) -> str | None:
    return next((name for name, module in model.named_modules() if module is layer), None)


# --- does an adapter fit a base? --------------------------------------------------------

def base_signature(config: PretrainedConfig, rows: int | None = None) -> dict[str, Any]:
    """What an adapter needs of its base: architecture, hidden size, vocabulary rows."""
    signature = {"model_type": config.model_type, "hidden_size": getattr(config, "hidden_size", None)}
    if rows is not None:
        signature["vocab_size"] = rows
    return signature


def describe_base(signature: dict[str, Any]) -> str:
    return f'a {signature["model_type"]} model with hidden size {signature["hidden_size"]}'

"""Base model and tokenizer loading: names, revisions, dtypes, devices, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging as hf_logging
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from peftlab.assets import resolve_model_name
from peftlab.config import ModelConfig
from peftlab.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype the frozen base is loaded in (``auto`` = float32 for now)."""
    return _DTYPES.get(model_cfg.dtype, torch.float32)


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
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f'the tokenizer of "{model_cfg.name}" has neither a pad nor an eos token')
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training batches; generation pads left where it needs to
    return tokenizer


def load_base(model_cfg: ModelConfig, auto_class: type, **kwargs: Any) -> transformers.PreTrainedModel:
    """The frozen base model through ``auto_class`` (e.g. AutoModelForSequenceClassification)."""
    name = _base_name(model_cfg)
    # The load report's "newly initialized head" is expected for a task head; keep it quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(
            name,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=torch_dtype(model_cfg),
            **kwargs,
        )
    except (OSError, ValueError) as error:
        raise _not_found(model_cfg.name, error) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def max_positions(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest input the model takes (position table minus any offset, tokenizer limit)."""
    limit = int(tokenizer.model_max_length) if tokenizer.model_max_length < 1e9 else 10**9
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = (config.pad_token_id + 1) if config.model_type in {"roberta", "xlm-roberta", "camembert"} else 0
        limit = min(limit, positions - offset)
    return limit

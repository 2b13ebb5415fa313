"""Shared fixtures: tiny random BERT / RoBERTa encoders and learnable synthetic data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from peftlab import build_config  # noqa: E402
from peftlab.testing import (chat_rows, keyword_rows, label_text_rows, make_tiny_model, write_csv,  # noqa: E402
                             write_jsonl)

hf_logging.disable_progress_bar()
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ("bert", "roberta")}


class _Encoders(dict):
    """Tiny random encoders by architecture (peftlab.testing), each built on first use and kept for the session."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        self[arch] = make_tiny_model(arch, self.root / arch)
        return self[arch]


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """Every encoder architecture the tests use (BERT, RoBERTa and peftlab.testing.ENCODER_ARCHS), built once per
    session however many test files ask (token classification, question answering, embeddings, encoder families)."""
    return _Encoders(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    """Tiny random generative models: t5, bart (encoder-decoders), llama, gpt2, llama-bias (decoder-only)."""
    root = tmp_path_factory.mktemp("lms")
    return {arch: make_tiny_model(arch, root / arch) for arch in ("t5", "llama", "gpt2", "bart", "llama-bias")}


@pytest.fixture(scope="session")
def generative_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-data")
    return {
        "train": write_csv(root / "train.csv", label_text_rows(256, seed=1)),
        "validation": write_csv(root / "validation.csv", label_text_rows(64, seed=2)),
        "chat_train": write_jsonl(root / "chat_train.jsonl", chat_rows(256, seed=1)),
        "chat_validation": write_jsonl(root / "chat_validation.jsonl", chat_rows(64, seed=2)),
    }


@pytest.fixture(scope="session")
def keyword_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_csv(root / "train.csv", keyword_rows(256, seed=1)),
        "validation": write_csv(root / "validation.csv", keyword_rows(64, seed=2)),
        "pair_train": write_csv(root / "pair_train.csv", keyword_rows(256, seed=3, pair=True)),
        "pair_validation": write_csv(root / "pair_validation.csv", keyword_rows(64, seed=4, pair=True)),
    }


@pytest.fixture
def make_config(tiny_models, keyword_data, tmp_path):
    """A small, fast seq-cls config on a tiny model; keyword overrides as dotted keys."""

    def make(arch: str = "bert", method: str = "lora", options: dict | None = None, **overrides):
        raw = {
            "model": {"name": str(tiny_models[arch])},
            "task": "seq-cls",
            "method": {"name": method, "options": options or {}},
            "data": {"train_file": str(keyword_data["train"]), "validation_file": str(keyword_data["validation"]),
                     "max_length": 32},
            "training": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-2, "progress": False,
                         "eval_strategy": "epoch", "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }
        return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])

    return make

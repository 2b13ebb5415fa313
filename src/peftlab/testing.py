"""Tiny, randomly initialised models of real architectures, and learnable synthetic data.

Used by the test suite and the benchmarks' ``--small`` mode: real transformers code paths
at a size that trains in seconds on a CPU, with no download.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
POSITIVE, NEGATIVE = "great", "awful"


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", POSITIVE, NEGATIVE, *WORDS]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=128)


def _roberta_tokenizer(folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    corpus = [" ".join(WORDS + [POSITIVE, NEGATIVE])] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    vocab_file, merges_file = bpe.save_model(str(folder))
    return RobertaTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=128)


def make_tiny_model(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``bert`` or ``roberta`` encoder (+ tokenizer) to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    if arch == "bert":
        tokenizer = _bert_tokenizer(folder)
        model = BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128, **common))
    elif arch == "roberta":
        tokenizer = _roberta_tokenizer(folder)
        model = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=130,
                                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, **common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def keyword_rows(n: int, seed: int = 0, pair: bool = False) -> list[dict[str, str]]:
    """A learnable task: "positive" iff the text holds the word ``great`` (not ``awful``).

    With ``pair=True`` the keyword sits in the second text (``text_pair``), so the model
    must read both texts.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        words.insert(rng.randint(0, len(words)), POSITIVE if positive else NEGATIVE)
        row = {"text": " ".join(words), "label": "positive" if positive else "negative"}
        if pair:
            row = {"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))), "text_pair": row["text"],
                   "label": row["label"]}
        rows.append(row)
    return rows


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path

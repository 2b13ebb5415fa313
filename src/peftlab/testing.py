"""Tiny, randomly initialised models of real architectures, and learnable synthetic data.

Used by the test suite and the benchmarks' ``--small`` mode: real transformers code paths
at a size that trains in seconds on a CPU, with no download.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
POSITIVE, NEGATIVE = "great", "awful"


def _bert_tokenizer(folder: Path, token_types: bool = True):
    """A WordPiece tokenizer; ``token_types=False`` for models that take no token_type_ids (DistilBERT, MPNet,
    ModernBERT: their real tokenizers return input_ids and attention_mask only)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", POSITIVE, NEGATIVE, *WORDS]
    extra = {} if token_types else {"model_input_names": ["input_ids", "attention_mask"]}
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=128, **extra)


def _roberta_tokenizer(folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    corpus = [" ".join(WORDS + [POSITIVE, NEGATIVE])] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    vocab_file, merges_file = bpe.save_model(str(folder))
    return RobertaTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=128)


PROMPT_WORDS = ["review", ":", "label", "positive", "negative", "user", "assistant"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _word_tokenizer():
    """A whitespace word-level tokenizer with bos/eos/pad and a chat template (for tiny LMs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", POSITIVE, NEGATIVE, *WORDS, *PROMPT_WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", model_max_length=128)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random model of a real architecture (+ tokenizer) to ``folder``.

    ``bert`` / ``roberta``: encoders (for classification), and the other encoder families (ENCODER_ARCHS:
    DeBERTa-v3-style ``deberta-v2``, ``deberta``, ``albert`` (embedding_size 16 < hidden_size 32), ``mpnet``,
    ``modernbert``, ``distilbert``, ``camembert``, ``xlm-roberta``, ``electra`` (embedding_size 16));
    ``t5`` / ``bart``: encoder-decoders;
    ``llama`` / ``gpt2`` / ``llama-bias``: decoder-only language models (``bart`` and ``llama-bias``, a
    Llama with biases in its projections as Qwen2 has, give BitFit biases to train; a real ``qwen2`` model type
    would make transformers 5 rebuild the test tokenizer as Qwen2's).
    """
    import torch
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    if arch in {"t5", "llama", "gpt2", "bart", "llama-bias"}:
        return _make_tiny_generative(arch, Path(folder), seed)
    if arch in ENCODER_ARCHS:
        return _make_tiny_encoder(arch, Path(folder), seed)

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


ENCODER_ARCHS = ("deberta-v2", "deberta", "albert", "mpnet", "modernbert", "distilbert", "camembert", "xlm-roberta",
                 "electra")


def _make_tiny_encoder(arch: str, folder: Path, seed: int) -> Path:
    """The encoder families beyond BERT / RoBERTa, each saved as its base model (no task head: as published
    checkpoints are, so from_pretrained draws the head, and DeBERTa's pooler / ModernBERT's head, at random)."""
    import torch
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  initializer_range=0.2)
    dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch in {"camembert", "xlm-roberta"}:
        tokenizer = _roberta_tokenizer(folder)
    else:
        tokenizer = _bert_tokenizer(folder, token_types=arch not in {"mpnet", "modernbert", "distilbert"})
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if arch == "deberta-v2":  # DeBERTa-v3's settings: relative attention, no absolute positions
        model = tf.DebertaV2Model(tf.DebertaV2Config(
            max_position_embeddings=128, relative_attention=True, pos_att_type=["p2c", "c2p"],
            position_biased_input=False, max_relative_positions=-1, position_buckets=32, norm_rel_ebd="layer_norm",
            share_att_key=True, type_vocab_size=0, pooler_hidden_size=32, pooler_dropout=0.0, **common, **dropout,
            **ids))
    elif arch == "deberta":
        model = tf.DebertaModel(tf.DebertaConfig(
            max_position_embeddings=128, relative_attention=True, pos_att_type=["p2c", "c2p"], type_vocab_size=0,
            pooler_hidden_size=32, pooler_dropout=0.0, **common, **dropout, **ids))
    elif arch == "albert":
        model = tf.AlbertModel(tf.AlbertConfig(embedding_size=16, max_position_embeddings=128,
                                               classifier_dropout_prob=0.0, **common, **dropout, **ids))
    elif arch == "electra":
        model = tf.ElectraModel(tf.ElectraConfig(embedding_size=16, max_position_embeddings=128, **common,
                                                 **dropout, **ids))
    elif arch == "mpnet":
        model = tf.MPNetModel(tf.MPNetConfig(max_position_embeddings=130, **common, **dropout, **ids))
    elif arch == "modernbert":
        special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
        model = tf.ModernBertModel(tf.ModernBertConfig(max_position_embeddings=128, local_attention=16, **common,
                                                       **special, **ids))
    elif arch == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0, initializer_range=0.2, **ids))
    else:  # camembert, xlm-roberta: RoBERTa's layout under their own model types
        config_cls, model_cls = ((tf.CamembertConfig, tf.CamembertModel) if arch == "camembert"
                                 else (tf.XLMRobertaConfig, tf.XLMRobertaModel))
        model = model_cls(config_cls(max_position_embeddings=130, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **common, **dropout, **ids))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _make_tiny_generative(arch: str, folder: Path, seed: int) -> Path:
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _word_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id, vocab_size=len(tokenizer))
    if arch == "t5":
        model = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                    decoder_start_token_id=tokenizer.pad_token_id,
                                                    dropout_rate=0.0, **ids))
    elif arch == "bart":
        model = BartForConditionalGeneration(BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, init_std=0.2, decoder_start_token_id=tokenizer.eos_token_id,
            forced_bos_token_id=None, forced_eos_token_id=None, **ids))
    elif arch == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                             mlp_bias=True, max_position_embeddings=256, initializer_range=0.2,
                                             **ids))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, initializer_range=0.2, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, **ids))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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


def tiny_model_rate(spec, task: str) -> float:
    """The learning rate at which the tiny random models here learn the keyword task within the tests' step budgets.

    Read from the method spec, the one table of rates (``peftlab.methods``): its ``test_learning_rate`` (the
    family's own in ``test_task_learning_rates``), where a tiny model needs a faster rate than the default for real
    models, else the default itself (``spec.learning_rate_for(task)``). ``spec``: a ``MethodSpec``.
    """
    if task in spec.test_task_learning_rates:
        return spec.test_task_learning_rates[task]
    if spec.test_learning_rate is not None:
        return spec.test_learning_rate
    return spec.learning_rate_for(task)


def label_text_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The keyword task with the label as the target text (seq2seq / causal LM)."""
    return [{"text": r["text"], "target": r["label"]} for r in keyword_rows(n, seed)]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """The keyword task as chat messages: the assistant answers with the label."""
    return [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]}
            for r in keyword_rows(n, seed)]


def tagging_rows(n: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """A learnable tagging task in IOB2: ``great`` and the word after it form a GOOD entity (B-GOOD I-GOOD), ``awful``
    alone is a BAD one (B-BAD); every other word is O. The I- tag needs the previous word: context, not the word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 9))
        for keyword in rng.sample([POSITIVE, NEGATIVE], k=rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words) - 1), keyword)
        tags, after_great = [], False
        for word in words:
            tags.append("B-GOOD" if word == POSITIVE else "B-BAD" if word == NEGATIVE else
                        "I-GOOD" if after_great else "O")
            after_great = word == POSITIVE
        rows.append({"tokens": words, "tags": tags})
    return rows


def _partner(word: str) -> str:
    """The word a query word stands for in its document (a fixed shift of WORDS): what an embedding must learn."""
    return WORDS[(WORDS.index(word) + 7) % len(WORDS)]


def embedding_rows(n: int, seed: int = 0, scored: bool = False) -> list[dict[str, Any]]:
    """A learnable retrieval task: a query of 2-3 words and its document, the same words each replaced by its
    partner (a fixed shift of WORDS) and shuffled; a random model cannot tell which document is a query's, a trained
    one learns the pairing. ``scored=True``: pairs with a 0-5 score, the share of the document's words that are the
    query's partners, times 5 (STS-B's scale)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        query = rng.sample(WORDS, k=rng.randint(2, 3))
        partners = [_partner(w) for w in query]
        if not scored:
            document = rng.sample(partners, k=len(partners))
            rows.append({"text": " ".join(query), "text_pair": " ".join(document)})
            continue
        keep = rng.randint(0, len(partners))
        others = [w for w in WORDS if w not in partners]
        document = partners[:keep] + rng.sample(others, k=len(partners) - keep)
        rng.shuffle(document)
        rows.append({"text": " ".join(query), "text_pair": " ".join(document),
                     "label": round(5.0 * keep / len(partners), 2)})
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def preference_rows(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    """The keyword task as preference pairs: the right label chosen, the wrong one rejected (``chat``: as messages)."""
    rows = []
    for r in keyword_rows(n, seed):
        wrong = "negative" if r["label"] == "positive" else "positive"
        if chat:
            rows.append({"prompt": [{"role": "user", "content": r["text"]}],
                         "chosen": [{"role": "assistant", "content": r["label"]}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            rows.append({"prompt": f"review : {r['text']} label :", "chosen": f" {r['label']}",
                         "rejected": f" {wrong}"})
    return rows

"""Sentence embeddings: one vector per text, trained contrastively, evaluated as retrieval or as STS.

Three kinds of rows, told apart by their columns:

- pairs (``text_column`` + ``text_pair_column``: a query and its positive, e.g. a question and its answer): the
  multiple-negatives ranking loss (in-batch negatives: every other row's positive is a negative), as
  sentence-transformers' ``MultipleNegativesRankingLoss`` computes it (cosine similarity x 20, cross-entropy);
- triplets (+ ``negative_column``: a hard negative): the same loss with the hard negatives as extra candidates;
- scored pairs (+ a numeric ``label_column``, e.g. STS-B's 0-5): cosine-similarity regression, the mean squared
  error between the pair's cosine and its score scaled to 0-1 (sentence-transformers' ``CosineSimilarityLoss``).

A text's vector is the base's own pooling (``model.pooling: auto`` reads the sentence-transformers
``1_Pooling`` config and its ``Normalize`` step shipped with the model; else the mean over the tokens), so an
adapter keeps the embedding space the model was published with. Prompt tuning / P-tuning prepend virtual tokens:
their outputs are left out of the pooling (only the text's own tokens are pooled).

Evaluation: pairs and triplets as retrieval over the eval split (each query's relevant document is its own
positive; the corpus holds every positive, and the negatives): recall@1/5/10, MRR@10, nDCG@10 (main metric);
scored pairs as STS: Spearman (main) and Pearson correlation of the cosines with the scores. The loss is reported
too (the training loss on eval batches).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModel, DataCollatorWithPadding, PreTrainedTokenizerBase

from peftlab.config import DataConfig, ModelConfig
from peftlab.data import require_columns, require_text
from peftlab.errors import ConfigError, DataError
from peftlab.model import load_base
from peftlab.offline_models import resolve_model_name
from peftlab.tasks.base import Baseline, Meta, model_device

SCALE = 20.0  # the similarity scale of the ranking loss (sentence-transformers' default)
CUTOFFS = (1, 5, 10)
_GROUPS = ("", "pair_", "negative_")  # the encoded texts of a row: anchor, positive, negative


@dataclass
class EmbeddingMeta:
    """What an embedding run learns from its data (``peftlab.json`` "meta" holds ``to_dict()``)."""

    mode: str = "pairs"  # pairs | triplets | scored
    score_min: float | None = None  # scored pairs: the training scores' range, mapped to 0-1
    score_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "score_min": self.score_min, "score_max": self.score_max}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> EmbeddingMeta:
        return cls(mode=raw.get("mode", "pairs"), score_min=raw.get("score_min"), score_max=raw.get("score_max"))

    @classmethod
    def of(cls, meta: Mapping[str, Any] | EmbeddingMeta) -> EmbeddingMeta:
        return meta if isinstance(meta, cls) else cls.from_dict(meta)

    def scaled(self, scores: list[float]) -> list[float]:
        low, high = self.score_min or 0.0, self.score_max if self.score_max is not None else 1.0
        return [(float(s) - low) / ((high - low) or 1.0) for s in scores]


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one vector: ``mean`` over the text's tokens or its first (``cls``) token, then
    optionally L2-normalised."""

    mode: str = "mean"
    normalize: bool = False


def base_pooling(model_cfg: ModelConfig, folder: str | None) -> Pooling:
    """The base's own pooling: ``model.pooling`` when set, else its sentence-transformers files (a local folder, or the
    Hub's copy when reachable), else mean without normalisation."""
    found = _sentence_transformers_pooling(folder, model_cfg)
    mode = model_cfg.pooling if model_cfg.pooling != "auto" else (found.mode if found else "mean")
    return Pooling(mode, found.normalize if found else False)


def _sentence_transformers_pooling(folder: str | None, model_cfg: ModelConfig) -> Pooling | None:
    def read(name: str) -> Any:
        if folder and Path(folder).is_dir():
            path = Path(folder) / name
            return json.loads(path.read_text()) if path.is_file() else None
        try:  # a Hub id: its files, when the Hub (or its cache) has them
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(model_cfg.name, name, revision=model_cfg.revision)).read_text())
        except Exception:  # noqa: BLE001 - no such file, offline: fall back to mean pooling
            return None

    modules = read("modules.json")
    if not isinstance(modules, list):
        return None
    pooling_path = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    config = read(f"{pooling_path}/config.json") if pooling_path else None
    if not isinstance(config, dict):
        return Pooling("mean", normalize)
    return Pooling("cls" if config.get("pooling_mode_cls_token") else "mean", normalize)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """One vector per row from the last hidden states; positions before the text's own (prompt learning's virtual
    tokens) are left out."""
    hidden = hidden[:, -attention_mask.shape[1]:].float()
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(vectors, dim=-1) if pooling.normalize else vectors


def pooling_of(model: torch.nn.Module) -> Pooling:
    """The pooling the embedding family put on the base model (``load_model``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "_peftlab_pooling", Pooling())


def embed_batch(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return pool(hidden, attention_mask, pooling_of(model))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T


def ranking_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
                 scale: float = SCALE) -> torch.Tensor:
    """Multiple-negatives ranking loss: each anchor against every positive (and hard negative) of the batch."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    scores = _cosine(anchors, candidates) * scale
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))


def cosine_loss(first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity regression: MSE between each pair's cosine and its 0-1 score."""
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)
    return torch.nn.functional.mse_loss(cosine, scores.to(cosine.dtype))


def retrieval_metrics(similarity: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """recall@k, MRR@10 and nDCG@10 (binary relevance) of queries against a corpus, as the IR literature and
    sentence-transformers' InformationRetrievalEvaluator define them; ``similarity``: queries x corpus."""
    top = similarity.topk(min(max(CUTOFFS), similarity.shape[1]), dim=1).indices.tolist()
    result = {f"recall@{k}": 0.0 for k in CUTOFFS}
    mrr = ndcg = 0.0
    for ranked, wanted in zip(top, relevant):
        for k in CUTOFFS:
            result[f"recall@{k}"] += len(wanted & set(ranked[:k])) / len(wanted)
        mrr += next((1 / (rank + 1) for rank, doc in enumerate(ranked[:10]) if doc in wanted), 0.0)
        dcg = sum(1 / math.log2(rank + 2) for rank, doc in enumerate(ranked[:10]) if doc in wanted)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(wanted), 10)))
        ndcg += dcg / ideal
    count = max(1, len(relevant))
    return {**{k: v / count for k, v in result.items()}, "mrr@10": mrr / count, "ndcg@10": ndcg / count}


class SentenceEmbedding:
    """texts -> vectors, trained on pairs / triplets / scored pairs, scored as retrieval (nDCG@10) or STS (Spearman)"""

    name = "embedding"
    peft_task_type = "FEATURE_EXTRACTION"
    meta_type = EmbeddingMeta
    packs = False
    pipeline_tag = "sentence-similarity"
    auto_class = AutoModel
    classifies = False
    generates = False
    chat = False
    embeds = True  # serving: /v1/embeddings
    base_is_reference = True  # the bare base already embeds: a comparison measures it
    config_section = None  # no run-config section of its own (see tasks.base.Task)

    def main_metric(self, meta: Meta) -> str:
        return "spearman" if EmbeddingMeta.of(meta).mode == "scored" else "ndcg@10"

    def check_model(self, config, model_name: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"{model_name} is an encoder-decoder model; sentence embeddings need an encoder",
                              "use e.g. sentence-transformers/all-MiniLM-L6-v2, BAAI/bge-small-en-v1.5, bert-base")

    # --- data -------------------------------------------------------------------------

    def _columns(self, data: DataConfig) -> dict[str, str | None]:
        return {"text_column": data.text_column, "text_pair_column": data.text_pair_column,
                "negative_column": data.negative_column}

    def inspect(self, splits: dict[str, datasets.Dataset], data: DataConfig) -> dict[str, Any]:
        if not data.text_pair_column:
            raise ConfigError("sentence embeddings train on pairs: set data.text_pair_column (the positive, or the "
                              "second text of a scored pair)", "e.g. --set data.text_column=prompt "
                                                               "--set data.text_pair_column=response")
        for name in ("train", "eval"):
            require_columns(splits[name], self._columns(data), f"the {name} split")
        train = splits["train"]
        scored = data.label_column in train.column_names and not data.negative_column
        if scored:
            scores = list(train[data.label_column])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
                raise DataError(f'the "{data.label_column}" column of a scored pair must be a number (e.g. STS-B\'s '
                                "0-5)", "point data.label_column at the scores, or drop it for pairs without scores")
            meta = EmbeddingMeta("scored", float(min(scores)), float(max(scores)))
        else:
            meta = EmbeddingMeta("triplets" if data.negative_column else "pairs")
        return meta.to_dict()

    def encode(self, dataset, tokenizer, data, meta, max_length, where):
        meta = EmbeddingMeta.of(meta)
        columns = [c for c in (data.text_column, data.text_pair_column,
                               data.negative_column if meta.mode == "triplets" else None) if c]
        require_columns(dataset, {"text_column": data.text_column}, where)
        for column in columns:
            if column in dataset.column_names:
                require_text(dataset[column], column, where)
        out: dict[str, list] = {}
        for prefix, column in zip(_GROUPS, columns):
            if column not in dataset.column_names:
                continue
            encoded = tokenizer([str(t) for t in dataset[column]], truncation=True, max_length=max_length)
            out[f"{prefix}input_ids"] = encoded["input_ids"]
            out[f"{prefix}attention_mask"] = encoded["attention_mask"]
        if meta.mode == "scored" and data.label_column in dataset.column_names:
            out["scores"] = meta.scaled(list(dataset[data.label_column]))
        return datasets.Dataset.from_dict(out)

    def collator(self, tokenizer: PreTrainedTokenizerBase):
        pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch: dict[str, torch.Tensor] = {}
            for prefix in _GROUPS:
                if f"{prefix}input_ids" in rows[0]:
                    padded = pad([{"input_ids": r[f"{prefix}input_ids"], "attention_mask": r[f"{prefix}attention_mask"]}
                                  for r in rows])
                    batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"] = (padded["input_ids"],
                                                                                      padded["attention_mask"])
            if "scores" in rows[0]:
                batch["scores"] = torch.tensor([r["scores"] for r in rows], dtype=torch.float32)
            return batch

        return collate

    def packed_collator(self, tokenizer) -> None:
        return None

    # --- training ---------------------------------------------------------------------

    def training_loss(self, meta: Meta):
        """The contrastive loss of the rows' kind (the model has none of its own)."""
        mode = EmbeddingMeta.of(meta).mode

        def loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            vectors = {prefix: embed_batch(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
                       for prefix in _GROUPS if f"{prefix}input_ids" in batch}
            if mode == "scored":
                return cosine_loss(vectors[""], vectors["pair_"], batch["scores"])
            return ranking_loss(vectors[""], vectors["pair_"], vectors.get("negative_"))

        return loss

    # --- the model card -------------------------------------------------------------------

    def card_columns(self, data: DataConfig) -> str:
        columns = " + ".join(f"`{c}`" for c in (data.text_column, data.text_pair_column, data.negative_column) if c)
        return f"texts {columns} (pairs{', triplets' if data.negative_column else ''}; a numeric `{data.label_column}`: " \
               "scored pairs)"

    def card_example(self, data: DataConfig | None, max_new_tokens: int) -> list[str]:
        return ["import torch", "",
                'inputs = tokenizer(["Your text here", "Another text"], padding=True, return_tensors="pt")',
                "hidden = model(**inputs).last_hidden_state",
                'mask = inputs["attention_mask"].unsqueeze(-1)',
                "vectors = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling (the base's own: see peftlab.yaml)",
                "print(torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0))"]

    # --- model --------------------------------------------------------------------------

    def model_kwargs(self, meta: Meta) -> dict[str, Any]:
        return {}

    def load_model(self, model: ModelConfig, meta: Meta):
        base = load_base(model, self.auto_class)
        base._peftlab_pooling = base_pooling(model, resolve_model_name(model.name))
        return base

    def meta_from_adapter(self, tensors: dict[str, tuple[int, ...]], base_config: Any) -> dict[str, Any]:
        return EmbeddingMeta("pairs").to_dict()

    def meta_for_base(self) -> dict[str, Any]:
        return EmbeddingMeta("pairs").to_dict()

    # --- evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, model, tokenizer, texts: list[str], max_length: int | None, batch_size: int) -> torch.Tensor:
        """The texts' vectors (float32, on the CPU), in order."""
        model.eval()
        device = model_device(model)
        pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        chunks = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], truncation=max_length is not None,
                                max_length=max_length)
            batch = pad([{"input_ids": ids, "attention_mask": mask}
                         for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])])
            chunks.append(embed_batch(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0)

    @torch.no_grad()
    def _loss(self, model, tokenizer, encoded, meta, batch_size: int) -> float:
        from torch.utils.data import DataLoader

        loss_of, device, total, count = self.training_loss(meta), model_device(model), 0.0, 0
        model.eval()
        for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=self.collator(tokenizer)):
            rows = len(batch["input_ids"])
            if rows < 2 and EmbeddingMeta.of(meta).mode != "scored":
                continue  # one row has no in-batch negative
            total += float(loss_of(model, {k: v.to(device) for k, v in batch.items()})) * rows
            count += rows
        return total / count if count else float("nan")

    def evaluate(self, model, tokenizer, raw, encoded, data, meta, max_length, batch_size):
        meta = EmbeddingMeta.of(meta)
        require_columns(raw, self._columns(data), "the evaluation data")
        first = self.embed(model, tokenizer, [str(t) for t in raw[data.text_column]], max_length, batch_size)
        result: dict[str, float] = {"loss": self._loss(model, tokenizer, encoded, meta, batch_size),
                                    "samples": float(len(raw))}
        if meta.mode == "scored":
            from scipy import stats

            require_columns(raw, {"label_column": data.label_column}, "the evaluation data")
            second = self.embed(model, tokenizer, [str(t) for t in raw[data.text_pair_column]], max_length,
                                batch_size)
            cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1).numpy()
            gold = np.array(raw[data.label_column], dtype=float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant input: correlation undefined (nan -> 0)
                result["spearman"] = float(np.nan_to_num(stats.spearmanr(cosine, gold)[0]))
                result["pearson"] = float(np.nan_to_num(stats.pearsonr(cosine, gold)[0]))
            return result
        corpus, relevant = self._corpus(raw, data, meta)
        vectors = self.embed(model, tokenizer, corpus, max_length, batch_size)
        result.update(retrieval_metrics(_cosine(first, vectors), relevant))
        return result

    def _corpus(self, raw, data, meta: EmbeddingMeta) -> tuple[list[str], list[set[int]]]:
        """The eval split as a retrieval task: the distinct documents (positives, then negatives) and each query's
        relevant ones (its positive; an identical text elsewhere is the same document)."""
        index: dict[str, int] = {}
        for column in (data.text_pair_column, data.negative_column if meta.mode == "triplets" else None):
            for text in (raw[column] if column else []):
                index.setdefault(str(text), len(index))
        return list(index), [{index[str(text)]} for text in raw[data.text_pair_column]]

    # --- prediction and serving --------------------------------------------------------------

    def predict(self, model, tokenizer, rows, data, meta, max_length, batch_size, generation=None):
        """One vector per row's text (``data.text_column``)."""
        missing = [i for i, r in enumerate(rows) if data.text_column not in r]
        if missing:
            raise DataError(f'the input has no "{data.text_column}" field (row {missing[0]})',
                            "set data.text_column or rename the field")
        texts = [str(r[data.text_column]) for r in rows]
        require_text(texts, data.text_column, "the input")
        vectors = self.embed(model, tokenizer, texts, max_length, batch_size)
        return [{"text": text, "embedding": vector.tolist()} for text, vector in zip(texts, vectors)]

    def encode_rows(self, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None):
        encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
        return [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i]}
                for i in range(len(texts))]

    def logits(self, model, tokenizer, features: list[dict], **forward_kwargs) -> torch.Tensor:
        """The rows' vectors in one padded pass (serving's batcher; ``forward_kwargs`` e.g. peft's adapter_names)."""
        model.eval()
        device = next(p for p in model.parameters()).device
        batch = DataCollatorWithPadding(tokenizer, return_tensors="pt")(features)
        with torch.no_grad():
            return embed_batch(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               **forward_kwargs).cpu()

    def needs_pairs(self, data: DataConfig) -> bool:
        return False

    def accepts_pairs(self, data: DataConfig) -> bool:
        return False

    def record(self, text: str, pair: str | None, row_logits: torch.Tensor, meta: Meta,
               probabilities: bool = False, features: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"text": text, "embedding": row_logits.tolist()}

    def baseline(self, splits, data, meta) -> Baseline | None:
        """None: no formula; the base model as it is (it already embeds) is the reference a comparison measures."""
        return None

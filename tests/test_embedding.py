"""Sentence embeddings: pooling as the base publishes it, the losses and the evaluators checked against
sentence-transformers on the same batch, every technique learning retrieval, scored pairs, plain-peft round trips,
predict (vectors, nearest neighbours), /v1/embeddings, merge."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from peftlab import build_config, load_adapter, merge, predict, train
from peftlab.config import ModelConfig
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.tasks import get_task
from peftlab.tasks.embedding import (Pooling, base_pooling, cosine_loss, pool, ranking_loss, retrieval_metrics)
from peftlab.testing import embedding_rows, tiny_model_rate, write_jsonl

FITS = [name for name, spec in METHODS.items() if "embedding" in spec.tasks]
QUERIES = ["alpha bravo", "charlie delta echo", "golf hotel"]
ARCHS = ["bert", "roberta", "deberta-v2", "distilbert", "electra"]


@pytest.fixture(scope="module")
def encoders(tiny_encoders):
    return tiny_encoders  # built once per session (conftest)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"train": write_jsonl(root / "train.jsonl", embedding_rows(256, seed=1)),
            "validation": write_jsonl(root / "validation.jsonl", embedding_rows(64, seed=2)),
            "scored_train": write_jsonl(root / "scored_train.jsonl", embedding_rows(256, seed=3, scored=True)),
            "scored_validation": write_jsonl(root / "scored_validation.jsonl", embedding_rows(64, seed=4, scored=True))}


def embedding_config(encoders, pair_data, tmp_path, arch="bert", method="lora", scored=False, **overrides):
    prefix = "scored_" if scored else ""
    raw = {"model": {"name": str(encoders[arch])}, "task": "embedding", "method": {"name": method},
           "data": {"train_file": str(pair_data[f"{prefix}train"]),
                    "validation_file": str(pair_data[f"{prefix}validation"]), "text_pair_column": "text_pair",
                    "max_length": 32},
           "training": {"epochs": 8, "batch_size": 16, "learning_rate": tiny_model_rate(METHODS[method], "embedding"),
                        "progress": False, "seed": 0, "eval_strategy": "no", "keep": "last"},
           "output_dir": str(tmp_path / f"run-{arch}-{method}{'-scored' if scored else ''}")}
    return build_config(raw, [f"{k}={v}" for k, v in overrides.items()])


def _vectors(model, tokenizer, texts=QUERIES):
    return get_task("embedding").embed(model, tokenizer, texts, 32, 8)


# --- the pieces against sentence-transformers ----------------------------------------------------

def test_losses_equal_sentence_transformers_on_the_same_batch():
    st_losses = pytest.importorskip("sentence_transformers.losses")
    torch.manual_seed(0)
    anchors, positives, negatives = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)

    class Fixed(torch.nn.Module):  # a "model" that returns the given vectors, as sentence-transformers calls it
        def __init__(self):
            super().__init__()
            self.queue = []

        def forward(self, features):
            return {"sentence_embedding": self.queue.pop(0)}

    fixed = Fixed()
    mnrl = st_losses.MultipleNegativesRankingLoss(fixed)
    fixed.queue = [anchors, positives, negatives]
    expected = mnrl([{}, {}, {}], None)
    torch.testing.assert_close(ranking_loss(anchors, positives, negatives), expected)
    fixed.queue = [anchors, positives]
    torch.testing.assert_close(ranking_loss(anchors, positives), mnrl([{}, {}], None))
    scores = torch.rand(6)
    fixed.queue = [anchors, positives]
    expected = st_losses.CosineSimilarityLoss(fixed)([{}, {}], scores)
    torch.testing.assert_close(cosine_loss(anchors, positives, scores), expected)


def test_the_bare_base_embeds_as_sentence_transformers_does_and_scores_as_its_evaluators(encoders, pair_data,
                                                                                        tmp_path):
    """Our mean pooling of the untrained base gives sentence-transformers' vectors for the same folder, and our
    retrieval and STS metrics equal its InformationRetrievalEvaluator's and EmbeddingSimilarityEvaluator's."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator, InformationRetrievalEvaluator

    folder = str(encoders["bert"])
    reference = st.SentenceTransformer(folder, device="cpu")
    task = get_task("embedding")
    config = embedding_config(encoders, pair_data, tmp_path)
    model = task.load_model(config.model, {})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.testing.assert_close(_vectors(model, tokenizer), reference.encode(QUERIES, convert_to_tensor=True),
                               rtol=1e-4, atol=1e-5)

    rows = [json.loads(line) for line in open(pair_data["validation"])]
    from datasets import Dataset

    raw = Dataset.from_list(rows)
    ours = task.evaluate(model, tokenizer, raw, task.encode(raw, tokenizer, config.data, {"mode": "pairs"}, 32, "x"),
                         config.data, {"mode": "pairs"}, 32, 16)
    documents, relevant = task._corpus(raw, config.data, task.meta_type())
    corpus = {str(i): text for i, text in enumerate(documents)}
    evaluator = InformationRetrievalEvaluator(
        {str(i): r["text"] for i, r in enumerate(rows)}, corpus,
        {str(i): {str(d) for d in docs} for i, docs in enumerate(relevant)},
        accuracy_at_k=[1, 5, 10], precision_recall_at_k=[1, 5, 10], mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[10],
        show_progress_bar=False, name="x")
    theirs = evaluator(reference)
    for ours_key, their_key in [("recall@1", "x_cosine_recall@1"), ("recall@5", "x_cosine_recall@5"),
                                ("recall@10", "x_cosine_recall@10"), ("mrr@10", "x_cosine_mrr@10"),
                                ("ndcg@10", "x_cosine_ndcg@10")]:
        assert ours[ours_key] == pytest.approx(theirs[their_key], abs=1e-6), ours_key

    scored = [json.loads(line) for line in open(pair_data["scored_validation"])]
    raw = Dataset.from_list(scored)
    meta = {"mode": "scored", "score_min": 0.0, "score_max": 5.0}
    ours = task.evaluate(model, tokenizer, raw, task.encode(raw, tokenizer, config.data, meta, 32, "x"),
                         config.data, meta, 32, 16)
    theirs = EmbeddingSimilarityEvaluator([r["text"] for r in scored], [r["text_pair"] for r in scored],
                                          [r["label"] / 5 for r in scored], name="s")(reference)
    assert ours["spearman"] == pytest.approx(theirs["s_spearman_cosine"], abs=1e-6)
    assert ours["pearson"] == pytest.approx(theirs["s_pearson_cosine"], abs=1e-6)


def test_retrieval_metrics_on_a_hand_made_ranking():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])  # query 0: doc 0 first; query 1: its doc 1 second
    metrics = retrieval_metrics(similarity, [{0}, {1}])
    assert metrics["recall@1"] == 0.5 and metrics["recall@5"] == 1.0
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2) / 2)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / torch.log2(torch.tensor(3.0)).item()) / 2)


def test_pooling_follows_the_published_sentence_transformers_config(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                   "pooling_mode_mean_tokens": False}))
    assert base_pooling(ModelConfig(name=str(tmp_path)), str(tmp_path)) == Pooling("cls", True)
    assert base_pooling(ModelConfig(name=str(tmp_path), pooling="mean"), str(tmp_path)) == Pooling("mean", True)
    assert base_pooling(ModelConfig(name=str(tmp_path / "x")), str(tmp_path / "x")) == Pooling("mean", False)
    hidden = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    mask = torch.tensor([[1, 1, 0]])  # prompt learning: one virtual position in front, left out
    torch.testing.assert_close(pool(hidden, mask, Pooling("mean")), torch.tensor([[4.5, 5.5, 6.5]]))
    torch.testing.assert_close(pool(hidden, mask, Pooling("cls")), torch.tensor([[3.0, 4.0, 5.0]]))


# --- training --------------------------------------------------------------------------------------

def _learned(result, metric="ndcg@10", gain=0.2):
    assert result.metrics["loss"] < result.initial_metrics["loss"], (result.initial_metrics, result.metrics)
    assert result.metrics[metric] > result.initial_metrics[metric] + gain, (result.initial_metrics, result.metrics)
    with torch.no_grad():
        before = _vectors(result.model, result.tokenizer)
        torch.testing.assert_close(_vectors(load_adapter(result.output_dir).model, result.tokenizer), before,
                                   rtol=1e-4, atol=1e-5)
    return before


@pytest.mark.parametrize("arch", [arch if arch in ("bert", "roberta") else  # the others: CI (slow)
                                  pytest.param(arch, marks=pytest.mark.slow) for arch in ARCHS])
def test_lora_learns_retrieval_and_plain_peft_gives_the_same_vectors(encoders, pair_data, tmp_path, arch):
    result = train(embedding_config(encoders, pair_data, tmp_path, arch), evaluate_before=True)
    before = _learned(result)
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(str(encoders[arch])), str(result.output_dir)).eval()
    plain.get_base_model()._peftlab_pooling = Pooling("mean")  # the tiny base publishes no pooling: mean
    torch.testing.assert_close(_vectors(plain, result.tokenizer), before, rtol=1e-4, atol=1e-5)


def test_scored_pairs_learn_the_similarity_scores(encoders, pair_data, tmp_path):
    result = train(embedding_config(encoders, pair_data, tmp_path, scored=True, **{"training.epochs": 12,
                                                                                  "data.max_train_samples": 128}),
                   evaluate_before=True)
    assert load_adapter(result.output_dir).meta == {"mode": "scored", "score_min": 0.0, "score_max": 5.0}
    # the cosines move toward the scores (the eval MSE falls by a third); Spearman on 64 tiny-model pairs is noisy
    assert result.metrics["loss"] < 0.75 * result.initial_metrics["loss"], (result.initial_metrics, result.metrics)
    _learned(result, "spearman", gain=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in FITS if m != "lora"])
def test_every_technique_learns_retrieval_and_reloads(encoders, pair_data, tmp_path, method):
    result = train(embedding_config(encoders, pair_data, tmp_path, method=method), evaluate_before=True)
    _learned(result, gain=0.1)


def test_pairs_are_required(encoders, pair_data, tmp_path):
    config = embedding_config(encoders, pair_data, tmp_path, **{"data.text_pair_column": "null"})
    with pytest.raises(ConfigError, match="set data.text_pair_column"):
        train(config)


# --- predict, serve, merge -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(encoders, pair_data, tmp_path_factory):
    config = embedding_config(encoders, pair_data, tmp_path_factory.mktemp("embedder"))
    return train(config), config


def test_eval_scores_the_saved_adapter_as_training_did(embedder):
    from peftlab import evaluate

    result, _ = embedder
    assert evaluate(result.output_dir)["ndcg@10"] == pytest.approx(result.metrics["ndcg@10"], abs=1e-6)


def test_predict_gives_vectors_and_nearest_neighbours(embedder, tmp_path):
    result, _ = embedder
    records = predict(result.output_dir, texts=QUERIES)
    vectors = _vectors(result.model, result.tokenizer)
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in records]), vectors, rtol=1e-4, atol=1e-5)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in ["india juliet", "kilo lima mike",
                                                                          "november oscar"]])
    [hit] = predict(result.output_dir, texts=["alpha bravo"], corpus=str(corpus), top_k=2)
    corpus_vectors = _vectors(result.model, result.tokenizer, ["india juliet", "kilo lima mike", "november oscar"])
    cosine = torch.nn.functional.cosine_similarity(vectors[:1], corpus_vectors)
    assert [n["index"] for n in hit["neighbours"]] == cosine.argsort(descending=True)[:2].tolist()
    assert hit["neighbours"][0]["score"] == pytest.approx(float(cosine.max()), abs=1e-5)


def test_v1_embeddings_answers_as_openai_does(embedder):
    from serve_helpers import Running

    from peftlab.serving import create_server

    result, config = embedder
    expected = _vectors(result.model, result.tokenizer)
    running = Running(create_server(config.model.name, {"emb": result.output_dir}))
    try:
        answer = running.openai.embeddings.create(model="emb", input=QUERIES)
        bare = running.http.post("/v1/embeddings", json={"model": "base", "input": QUERIES[0]}).json()
        wrong = running.http.post("/v1/classify", json={"model": "emb", "input": "x"})
    finally:
        running.stop()
    torch.testing.assert_close(torch.tensor([d.embedding for d in answer.data]), expected, rtol=1e-4, atol=1e-5)
    assert answer.usage.prompt_tokens > 0 and len(bare["data"][0]["embedding"]) == expected.shape[1]
    assert wrong.status_code == 400 and "/v1/embeddings" in wrong.json()["error"]["message"]


def test_merge_gives_a_plain_encoder_with_the_same_vectors(embedder, tmp_path):
    result, _ = embedder
    merged = merge(result.output_dir, tmp_path / "merged")
    model = AutoModel.from_pretrained(str(merged.output_dir)).eval()
    model._peftlab_pooling = Pooling("mean")
    torch.testing.assert_close(_vectors(model, result.tokenizer), _vectors(result.model, result.tokenizer),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # two trainings and a report (~20 s); CI runs it
def test_compare_measures_the_bare_base_as_the_reference(encoders, pair_data, tmp_path):
    """No formula baseline for embeddings: the base as it is (it already embeds) is measured, and trained adapters
    are compared against it."""
    from peftlab.comparison import compare

    config = embedding_config(encoders, pair_data, tmp_path, **{"training.epochs": 4})
    result = compare(config, methods=["lora", "ia3"], out_dir=tmp_path / "cmp", progress=False)
    assert not result.failed
    base = result.baselines["base_model"]
    assert base["metric"] == "ndcg@10" and 0 <= base["value"] < 0.3 and "majority" not in result.baselines
    assert all(row["main_value"] > base["value"] for row in result.rows), result.rows


def test_v1_embeddings_base64_is_little_endian_float32(embedder):
    import base64
    import struct

    from serve_helpers import Running

    from peftlab.serving import create_server

    result, config = embedder
    running = Running(create_server(config.model.name, {"emb": result.output_dir}))
    try:
        plain = running.http.post("/v1/embeddings", json={"model": "emb", "input": "alpha bravo"}).json()
        packed = running.http.post("/v1/embeddings", json={"model": "emb", "input": "alpha bravo",
                                                           "encoding_format": "base64"}).json()
        refused = running.http.post("/v1/embeddings", json={"model": "emb", "input": "x", "dimensions": 8})
    finally:
        running.stop()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert vector == pytest.approx(plain["data"][0]["embedding"], abs=1e-6)
    assert refused.status_code == 400 and "dimensions" in refused.json()["error"]["message"]

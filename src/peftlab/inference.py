"""Evaluation and prediction with a saved adapter (peftlab's or plain peft's)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from peftlab import compat, placement
from peftlab.adapters import LoadedAdapter, from_run, load_adapter
from peftlab.rundir import RunRecord
from pydantic import ValidationError

from peftlab.config import DataConfig, GenerationConfig, apply_overrides, readable_error
from peftlab.data import load_eval_file, load_splits
from peftlab.errors import ConfigError, DataError
from peftlab.model import max_positions
from peftlab.tasks.base import output_scores


def data_config(loaded: LoadedAdapter, file: str | None, overrides: list[str] | None) -> DataConfig:
    """The run's data config (or defaults for plain peft adapters), with overrides.

    ``loaded``: anything with the adapter's ``config`` and ``path`` (a LoadedAdapter or an AdapterSource).
    """
    raw = loaded.config.data.model_dump() if loaded.config else {}
    if file:
        raw.update(builtin=None, dataset=None, train_file=file, validation_file=None, test_file=None,
                   eval_split=None)
    elif not loaded.config:
        raise ConfigError(f"{loaded.path} was not made by peftlab, so it has no data of its own",
                          "pass --data FILE (CSV / JSON Lines / Parquet)")
    return _with_overrides(raw, overrides)


def _with_overrides(raw: dict[str, Any], overrides: list[str] | None) -> DataConfig:
    """Apply ``data.key=value`` overrides and validate, with the same messages as a config."""
    raw = apply_overrides({"data": raw}, overrides or [])
    if set(raw) != {"data"}:
        raise ConfigError("eval and predict take only data.* overrides", "e.g. --set data.text_column=review")
    try:
        return DataConfig.model_validate(raw["data"])
    except ValidationError as error:
        raise ConfigError(f"invalid data options: {readable_error(error, DataConfig, 'data.')}") from None


def input_limit(record: RunRecord, data: DataConfig, peft_config, model_config, tokenizer) -> int:
    """Longest input in tokens: the run's max_length, or what the model takes less any virtual tokens."""
    if record.max_length is not None:
        return min(data.max_length, record.max_length)
    reserved = getattr(peft_config, "num_virtual_tokens", 0) or 0
    return min(data.max_length, max_positions(model_config, tokenizer) - reserved)


def _max_length(loaded: LoadedAdapter, data: DataConfig) -> int:
    peft_config = getattr(loaded.model, "active_peft_config", None)  # None: a full fine-tuning run
    return input_limit(loaded.record, data, peft_config, loaded.model.config, loaded.tokenizer)


def _dataset(loaded: LoadedAdapter, data: DataConfig, file: str | None, split: str) -> datasets.Dataset:
    if file:
        return load_eval_file(file, data)
    splits = load_splits(data, seed=loaded.config.training.seed if loaded.config else 42)
    if split not in splits:
        raise DataError(f'no "{split}" split in the run\'s data', f"available: {', '.join(splits)}")
    return splits[split]


def evaluate(adapter_dir: Any, *, data: str | None = None, split: str = "eval",
             overrides: list[str] | None = None, base: str | None = None, batch_size: int = 64,
             device: str | None = None, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of an adapter on its run's evaluation split, another split, or a file.

    ``adapter_dir``: an adapter directory, a :class:`LoadedAdapter` or a ``RunResult`` (as for :func:`predict`);
    ``model_options`` place or quantize the base (``device_map``, ``max_memory``,
    ``offload_folder``, ``quantization``; docs/big-models.md).
    """
    loaded = _loaded(adapter_dir) or load_adapter(adapter_dir, base=base, device=device, model_options=model_options)
    inputs = evaluation_inputs(loaded, data=data, split=split, overrides=overrides)
    return loaded.task.evaluate(loaded.model, loaded.tokenizer, inputs.raw, inputs.encoded, inputs.data, loaded.meta,
                                inputs.max_length, batch_size)


@dataclass
class EvaluationInputs:
    """What a loaded adapter is evaluated on: the data config, the raw rows and their features."""

    data: DataConfig
    raw: datasets.Dataset
    encoded: datasets.Dataset
    max_length: int


def evaluation_inputs(loaded: LoadedAdapter, *, data: str | None = None, split: str = "eval",
                      overrides: list[str] | None = None) -> EvaluationInputs:
    """The rows :func:`evaluate` scores (the run's ``split`` or the file ``data``), encoded by the run's task."""
    cfg = data_config(loaded, data, overrides)
    dataset = _dataset(loaded, cfg, data, split)
    if len(dataset) == 0:
        raise DataError("the evaluation data is empty")
    max_length = _max_length(loaded, cfg)
    encoded = loaded.task.encode(dataset, loaded.tokenizer, cfg, loaded.meta, max_length, "the evaluation data")
    return EvaluationInputs(cfg, dataset, encoded, max_length)


def _loaded(source: Any) -> LoadedAdapter | None:
    """A LoadedAdapter for a LoadedAdapter or a RunResult (the trained model in memory); None for a path."""
    if isinstance(source, LoadedAdapter):
        return source
    if hasattr(source, "output_dir") and hasattr(source, "model"):  # a RunResult
        return from_run(source)
    return None


def logits(adapter: Any, texts: list[str], *, pairs: list[str] | None = None, max_length: int = 128,
           without_adapter: bool = False) -> torch.Tensor:
    """The model's raw output scores for ``texts`` (one forward pass, no generation), on the CPU.

    ``adapter``: a :class:`LoadedAdapter`, a ``RunResult`` (the trained model still in memory)
    or an adapter directory. Classifiers give one row of class logits per text; seq2seq models
    the first decoder step's vocabulary logits; causal LMs the logits at every position. Two
    models that hold the same adapter give the same tensor: this is how the notebooks check that
    a reloaded adapter is the trained one. ``without_adapter=True``: the same for the bare base
    model (the adapter switched off), which must differ.
    """
    loaded = _loaded(adapter) or load_adapter(adapter)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    keep = {"input_ids", "attention_mask"} | ({"token_type_ids"} if pairs else set())
    device = placement.input_device(model)
    inputs = {key: value.to(device) for key, value in batch.items() if key in keep}
    if getattr(model.config, "is_encoder_decoder", False):
        start = (getattr(model.config, "decoder_start_token_id", None)
                 or getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None))
        if start is None:
            start = tokenizer.pad_token_id
        inputs["decoder_input_ids"] = torch.full((len(texts), 1), int(start), dtype=torch.long, device=device)
    with torch.no_grad(), (compat.adapter_disabled(model) if without_adapter else nullcontext(model)) as runner:
        output = runner(**inputs)
    return output_scores(output).detach().float().cpu()


def predict(adapter_dir: Any, *, texts: list[str] | None = None,
            pairs: list[str] | None = None, file: str | None = None, overrides: list[str] | None = None,
            base: str | None = None, batch_size: int = 32, device: str | None = None,
            generation: dict[str, Any] | None = None,
            model_options: dict[str, Any] | None = None, corpus: str | None = None,
            top_k: int = 5) -> list[dict[str, Any]]:
    """Predictions for texts (optionally text pairs) or the rows of a file.

    Sentence embeddings: each record holds the text's vector; with ``corpus`` (a file whose rows have the run's text
    column) also its ``top_k`` nearest corpus rows by cosine similarity (``neighbours``: index, text, score).

    ``adapter_dir``: an adapter directory, a :class:`LoadedAdapter`, or a ``RunResult`` (the
    trained model still in memory). ``generation`` overrides the run's decoding settings for generative tasks
    (max_new_tokens, do_sample, temperature, top_p, num_beams, stop); ``model_options``
    place or quantize the base as for :func:`evaluate`.
    """
    loaded = _loaded(adapter_dir) or load_adapter(adapter_dir, base=base, device=device,
                                                  model_options=model_options)
    cfg = data_config(loaded, file or "<inline>", overrides)  # only the column names matter here
    if file:
        rows = list(load_eval_file(file, cfg))
    elif texts:
        if pairs and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} --text but {len(pairs)} --pair", "give one --pair per --text")
        task = loaded.task
        if (task.classifies or task.embeds) and task.needs_pairs(cfg) and not pairs:
            raise ConfigError(f"this adapter reads text pairs ({cfg.text_column}, {cfg.text_pair_column or 'text_pair'})",
                              "give a --pair for each --text")
        rows = [{cfg.text_column: t, **({cfg.text_pair_column or "text_pair": p} if pairs else {})}
                for t, p in zip(texts, pairs or [None] * len(texts))]
    else:
        raise ConfigError("nothing to predict", "pass --text \"...\" (repeatable) or --file FILE")
    decoding = decoding_options(loaded.config, generation)
    records = loaded.task.predict(loaded.model, loaded.tokenizer, rows, cfg, loaded.meta, _max_length(loaded, cfg),
                                  batch_size, decoding)
    if corpus is not None:
        _add_neighbours(loaded, records, corpus, cfg, top_k, batch_size)
    return records


def _add_neighbours(loaded: LoadedAdapter, records: list[dict[str, Any]], corpus: str, cfg: DataConfig, top_k: int,
                    batch_size: int) -> None:
    """Each record's ``top_k`` nearest rows of the ``corpus`` file (cosine similarity of the run's vectors)."""
    if not loaded.task.embeds:
        raise ConfigError(f"--corpus finds nearest neighbours by embedding; this is a {loaded.task.name} run",
                          "use it with a sentence-embedding run (task: embedding)")
    rows = list(load_eval_file(corpus, cfg))
    missing = [i for i, row in enumerate(rows) if not str(row.get(cfg.text_column) or "").strip()]
    if missing:
        raise DataError(f'the corpus {corpus} row {missing[0]} has no "{cfg.text_column}" text',
                        "give every corpus row its text (the run's data.text_column)")
    texts = [str(row[cfg.text_column]) for row in rows]
    vectors = loaded.task.embed(loaded.model, loaded.tokenizer, texts, _max_length(loaded, cfg), batch_size)
    queries = torch.tensor([record["embedding"] for record in records])
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(vectors, dim=-1).T
    best = scores.topk(min(top_k, len(texts)), dim=1)
    for record, values, indices in zip(records, best.values.tolist(), best.indices.tolist()):
        record["neighbours"] = [{"index": i, "text": texts[i], "score": v} for v, i in zip(values, indices)]


def decoding_options(config, generation: dict[str, Any] | None) -> GenerationConfig:
    """The run's decoding settings (``config``: its RunConfig or None), with ``generation`` on top."""
    decoding = config.generation if config else GenerationConfig()
    if generation:
        try:
            decoding = GenerationConfig.model_validate({**decoding.model_dump(), **generation})
        except ValidationError as error:
            raise ConfigError(f"invalid generation options: {readable_error(error, GenerationConfig)}") from None
    return decoding

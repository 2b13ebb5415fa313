"""Continuous batching: decoder-only generation one step at a time over a running batch.

transformers' ``generate()`` runs a batch from its first token to its last: a 1-token request
that arrives a moment after a 200-token one waits for all 200 steps, and a streamed request
could not share a batch at all. Here the worker advances every running row by one token per
forward pass; between passes, finished and cancelled rows leave at once and waiting rows join
(prefilled in one pass, then merged into the running batch). transformers' own continuous
batching packs rows into one sequence, which peft's per-row ``adapter_names`` cannot address;
this engine keeps a plain batch dimension so LoRA rows of different adapters still mix.

A *cohort* is the rows that share forward passes: one model, one KV cache
(:class:`transformers.DynamicCache`, rows left-padded to a common length), one attention mask,
each row's next position. Rows of a LoRA-like group that mixes (and rows for the bare base)
form one cohort with ``adapter_names``; any other adapter has a cohort of its own.

Rows are decoded as ``generate()`` decodes them (same positions from the attention mask, same
end-of-sequence ids, transformers' own temperature / top-k / top-p warpers), so a greedy row
gives what ``peftlab predict`` gives. What this loop does not reproduce stays with
``generate()`` (see :func:`Engine.takes`): encoder-decoder models, prompt-learning adapters
(virtual tokens), beam search, caches that are not plain dynamic layers (sliding windows), and
models whose generation config asks for more logits processing than sampling.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from peftlab.config import GenerationConfig
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import BASE, AdapterNotFound, Registry, ServedAdapter
from peftlab.tasks import generation as gen

# generation-config settings whose logits processing this loop does not apply (their defaults are off)
_UNSUPPORTED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                "forced_bos_token_id": None, "forced_eos_token_id": None, "min_new_tokens": None,
                "sequence_bias": None, "exponential_decay_length_penalty": None, "epsilon_cutoff": 0.0,
                "eta_cutoff": 0.0, "typical_p": 1.0, "min_p": None, "renormalize_logits": False,
                "diversity_penalty": 0.0, "watermarking_config": None}


class Cancelled(Exception):
    """The client went away; its rows were dropped."""


class TextStream:
    """Hands on only text that is final: what a non-streamed call returns, piece by piece.

    Leading and trailing space and a possible start of a stop string are held back. Fed token by
    token (``add``), or used as a transformers streamer (``put`` / ``end``; the first ``put`` is
    the prompt). ``check`` is called on every put: raising there aborts a ``generate()``.
    """

    def __init__(self, tokenizer, stop: list[str], emit: Callable[[str], None], check: Callable[[], None] = lambda: None):
        self.tokenizer, self.stop, self.emit, self.check = tokenizer, stop, emit, check
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = ""
        self.stopped = False

    def put(self, value) -> None:  # transformers' streamer interface
        self.check()
        if not self.prompt_seen:  # generate() first hands over the prompt (decoder start for seq2seq)
            self.prompt_seen = True
            return
        self.add([int(v) for v in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass

    def add(self, ids: list[int]) -> None:
        if self.stopped:
            return
        self.ids.extend(ids)
        eos = self.tokenizer.eos_token_id
        ids = self.ids[:self.ids.index(eos) + 1] if eos is not None and eos in self.ids else self.ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        cut = min((text.index(s) for s in self.stop if s in text), default=None)
        if cut is not None:
            text, self.stopped = text[:cut], True
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
            if text.endswith("\ufffd"):  # an incomplete character
                return
        self.send(text.rstrip())

    def send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text


def finished(tokenizer, ids: list[int], stop: list[str], limit: int, eos: set[int]) -> dict[str, Any]:
    """A generated row as the API returns it: text, token count and OpenAI's finish_reason."""
    text = gen.finish_text(tokenizer, ids, stop)
    raw = tokenizer.decode(ids, skip_special_tokens=True)
    ended = bool(ids) and ids[-1] in eos or any(s in raw for s in stop)
    return {"text": text, "tokens": len(ids), "finish_reason": "stop" if ended or len(ids) < limit else "length"}


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a row, as generate() reads them (the generation config's, and the tokenizer's)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@dataclass(eq=False)
class Row:
    """One prompt of a generation job, from waiting to finished."""

    job: Any  # batcher.Job
    index: int  # its place in the job
    adapter: ServedAdapter
    prompt: list[int]
    limit: int
    decoding: GenerationConfig
    stream: TextStream | None = None
    ids: list[int] = field(default_factory=list)  # generated so far
    done: bool = False

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter.group is not None else BASE


@dataclass(eq=False)
class Cohort:
    """Rows that share forward passes: one model, one KV cache, one attention mask."""

    key: tuple
    model: Any
    mixes: bool  # rows may name different adapters (peft's adapter_names)
    rows: list[Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # [rows, cached tokens]
    positions: torch.Tensor | None = None  # [rows]: the position of each row's next input
    eos: set[int] = field(default_factory=set)  # the ids that end a row


class Engine:
    """The running cohorts and the rows waiting to join them (used by the batcher's worker thread only)."""

    def __init__(self, registry: Registry, metrics: Metrics, max_batch: int):
        self.registry, self.metrics, self.max_batch = registry, metrics, max_batch
        self.cohorts: dict[tuple, Cohort] = {}
        self.waiting: list[Row] = []
        # every group is built from the one base (same class, config, generation config): decided once
        self.continuous = not registry.encoder_decoder and _supports(registry.base_model)

    # --- what it takes ----------------------------------------------------------------

    def takes(self, adapter: ServedAdapter, decoding: GenerationConfig) -> bool:
        """Whether rows of this adapter with these decoding options are decoded here (else by generate())."""
        if not self.continuous or decoding.num_beams > 1:
            return False
        return adapter.group is None or not adapter.group.prompt_learning

    @property
    def rows(self) -> int:
        return len(self.waiting) + sum(len(c.rows) for c in list(self.cohorts.values()))  # read by the event loop

    def all_rows(self) -> list[Row]:
        return [*self.waiting, *(row for cohort in list(self.cohorts.values()) for row in cohort.rows)]

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.cohorts)

    def add(self, job, rows: list[tuple[int, list[int], int]], stream: Callable[[str], None] | None) -> None:
        """Queue a job's rows (index, prompt ids, new-token limit) to join at the next step."""
        stop = list(job.decoding.stop)
        for index, prompt, limit in rows:
            text = TextStream(job.adapter.tokenizer, stop, stream) if stream else None
            if text is not None:
                text.prompt_seen = True
            self.waiting.append(Row(job, index, job.adapter, prompt, limit, job.decoding, text))

    # --- one step ---------------------------------------------------------------------

    def step(self, deliver: Callable[[Row, dict[str, Any]], None], fail: Callable[[Any, BaseException], None],
             started: Callable[[Any], None]) -> None:
        """Drop rows that are gone, admit waiting rows, and advance every cohort by one token."""
        self._drop_gone(fail)
        self._admit(deliver, fail, started)
        for key, cohort in list(self.cohorts.items()):
            try:
                self._decode(cohort, deliver)
            except Exception as error:  # noqa: BLE001 - the rows of this cohort fail, the others go on
                cohort.rows, failed = [], cohort.rows
                for row in failed:
                    fail(row.job, error)
            if not cohort.rows:
                del self.cohorts[key]

    def fail_waiting(self, fail: Callable[[Any, BaseException], None], error: BaseException) -> None:
        """Rows that have not started yet fail (shutdown: they get their 503 at once)."""
        for row in self.waiting:
            fail(row.job, error)
        self.waiting.clear()

    def fail_all(self, fail: Callable[[Any, BaseException], None], error: BaseException) -> None:
        for row in self.all_rows():
            fail(row.job, error)
        self.waiting.clear()
        self.cohorts.clear()

    def _drop_gone(self, fail) -> None:
        """Rows of a cancelled or failed job, or of an adapter deleted since they were queued, leave now."""
        def gone(row: Row) -> bool:
            if row.job.cancelled:
                fail(row.job, Cancelled("the client disconnected"))
                return True
            if row.job.settled:  # another row of its job failed
                return True
            if row.adapter.group is not None and self.registry.adapters.get(row.adapter.name) is not row.adapter:
                fail(row.job, AdapterNotFound(f'the adapter "{row.adapter.name}" was deleted'))
                return True
            return False

        dropped = [r for r in self.waiting if gone(r)]
        self.waiting = [r for r in self.waiting if r not in dropped]
        for key, cohort in list(self.cohorts.items()):
            keep = [i for i, row in enumerate(cohort.rows) if not gone(row)]
            if len(keep) < len(cohort.rows):
                self.metrics.cancel(len(cohort.rows) - len(keep))
                self._keep(cohort, keep)
            if not cohort.rows:
                del self.cohorts[key]
        if dropped:
            self.metrics.cancel(len(dropped))

    def _cohort_key(self, row: Row, forming: list[tuple]) -> tuple[tuple, Any, bool]:
        group = row.adapter.group
        if group is None:  # the bare base joins a cohort that mixes, running or forming now, when there is one
            mixing = next((k for k in [*self.cohorts, *forming] if k[0] == "mix"), None)
            if mixing is None:
                return ("base",), self.registry.base_model, False
            model = self.cohorts[mixing].model if mixing in self.cohorts else next(
                g.model for g in self.registry.groups if id(g) == mixing[1])
            return mixing, model, True
        if self.registry.mixed_batches and group.mixable:
            return ("mix", id(group)), group.model, True
        return ("one", row.adapter.name), group.model, False

    def _admit(self, deliver, fail, started) -> None:
        joining: dict[tuple, tuple[Any, bool, list[Row]]] = {}
        left: list[Row] = []
        # adapter rows first, so that rows for the bare base can join a cohort that mixes as it forms
        for row in sorted(self.waiting, key=lambda r: r.adapter.group is None):
            key, model, mixes = self._cohort_key(row, list(joining))
            running = len(self.cohorts[key].rows) if key in self.cohorts else 0
            entry = joining.setdefault(key, (model, mixes, []))
            if running + len(entry[2]) < self.max_batch:
                entry[2].append(row)
            else:
                left.append(row)
        self.waiting = [row for row in self.waiting if row in left]  # in their order of arrival
        for key, (model, mixes, rows) in joining.items():
            if not rows:
                continue
            try:
                self._prefill(key, model, mixes, rows, deliver, started)
            except Exception as error:  # noqa: BLE001
                for row in rows:
                    fail(row.job, error)

    # --- forward passes ------------------------------------------------------------------

    def _forward(self, model, rows: list[Row], mixes: bool, **inputs) -> torch.Tensor:
        names = [row.name for row in rows]
        extra: dict[str, Any] = {}
        if mixes and (len(set(names)) > 1 or names[0] == BASE):  # a group model: name its base explicitly
            extra["adapter_names"] = names
        elif rows[0].adapter.group is not None:
            model.set_adapter(rows[0].adapter.name)
        with torch.no_grad():
            output = model(**inputs, use_cache=True, **extra)
        self.metrics.forward(len(rows), set(names))
        return output.logits[:, -1, :].float()

    def _prefill(self, key: tuple, model, mixes: bool, rows: list[Row], deliver, started) -> None:
        tokenizer = rows[0].adapter.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(r.prompt) for r in rows)
        device = next(model.parameters()).device
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as generate() pads decoder-only prompts
            ids[i, width - len(row.prompt):] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=model.config)
        logits = self._forward(model, rows, mixes, input_ids=ids, attention_mask=mask, position_ids=positions,
                               **{_cache_argument(model): cache}, **_last_logits_only(model))
        for row in rows:
            started(row.job)
        new = Cohort(key, model, mixes, rows, cache, mask, positions[:, -1] + 1, eos_ids(model, tokenizer))
        self._advance(new, logits, deliver)
        if not new.rows:
            return
        if key in self.cohorts:
            self.cohorts[key] = _merge(self.cohorts[key], new)
        else:
            self.cohorts[key] = new

    def _decode(self, cohort: Cohort, deliver) -> None:
        device = cohort.mask.device
        last = torch.tensor([[row.ids[-1]] for row in cohort.rows], dtype=torch.long, device=device)
        cohort.mask = torch.cat([cohort.mask, torch.ones((len(cohort.rows), 1), dtype=cohort.mask.dtype,
                                                         device=device)], dim=1)
        logits = self._forward(cohort.model, cohort.rows, cohort.mixes, input_ids=last, attention_mask=cohort.mask,
                               position_ids=cohort.positions[:, None], **{_cache_argument(cohort.model): cohort.cache})
        cohort.positions = cohort.positions + 1
        self._advance(cohort, logits, deliver)

    def _advance(self, cohort: Cohort, logits: torch.Tensor, deliver) -> None:
        """Pick each row's next token; finished rows are delivered and leave the cohort."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for the batch; sampled rows are picked row by row
        eos = cohort.eos
        keep = []
        for i, row in enumerate(cohort.rows):
            token = _sample(row, logits[i], cohort.model) if row.decoding.do_sample else greedy[i]
            row.ids.append(token)
            tokenizer = row.adapter.tokenizer
            if row.stream is not None:
                row.stream.add([token])
            stop = row.decoding.stop
            hit_stop = bool(stop) and any(s in tokenizer.decode(row.ids, skip_special_tokens=True) for s in stop)
            if token in eos or hit_stop or len(row.ids) >= row.limit:
                result = finished(tokenizer, row.ids, list(stop), row.limit, eos)
                if row.stream is not None:
                    row.stream.send(result["text"])
                deliver(row, result)
            else:
                keep.append(i)
        if len(keep) < len(cohort.rows):
            self._keep(cohort, keep)

    def _keep(self, cohort: Cohort, keep: list[int]) -> None:
        """Keep only these rows (in order); drop the padding columns no row needs any more."""
        cohort.rows = [cohort.rows[i] for i in keep]
        if not keep or cohort.mask is None:
            return
        index = torch.tensor(keep, dtype=torch.long, device=cohort.mask.device)
        cohort.mask = cohort.mask.index_select(0, index)
        cohort.positions = cohort.positions.index_select(0, index)
        first = int(cohort.mask.any(dim=0).nonzero()[0]) if cohort.mask.any() else 0
        cohort.mask = cohort.mask[:, first:]
        for layer in cohort.cache.layers:
            if layer.keys is None:
                continue
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def _merge(old: Cohort, new: Cohort) -> Cohort:
    """One cohort of both: caches and masks left-padded to the longer one, then stacked."""
    width = max(old.mask.shape[1], new.mask.shape[1])

    def left_pad(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - tensor.shape[-dim_from_end]
        if missing == 0:
            return tensor
        return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0))

    for a, b in zip(old.cache.layers, new.cache.layers):
        if a.keys is None or b.keys is None:
            continue
        a.keys = torch.cat([left_pad(a.keys, 2), left_pad(b.keys, 2)])
        a.values = torch.cat([left_pad(a.values, 2), left_pad(b.values, 2)])
    old.mask = torch.cat([left_pad(old.mask, 1), left_pad(new.mask, 1)])
    old.positions = torch.cat([old.positions, new.positions])
    old.rows = old.rows + new.rows
    return old


def _sample(row: Row, scores: torch.Tensor, model) -> int:
    """A sampled next token, with transformers' own warpers (as generate() samples)."""
    decoding = row.decoding
    config = getattr(model, "generation_config", None)  # the model's top_k (the bare base's too), as generate()
    top_k = getattr(config, "top_k", 50) or 0
    warpers = LogitsProcessorList()
    if decoding.temperature not in (None, 1.0):
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if decoding.top_p not in (None, 1.0):
        warpers.append(TopPLogitsWarper(decoding.top_p))
    ids = torch.tensor([row.prompt + row.ids], dtype=torch.long, device=scores.device)
    warped = warpers(ids, scores[None])
    return int(torch.multinomial(torch.softmax(warped, dim=-1), 1))


@functools.lru_cache(maxsize=64)
def _forward_parameters(forward_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(forward_type.forward).parameters)


def _parameters(model) -> frozenset[str]:
    """The base model's forward parameters (read once per model class)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_parameters(type(target))


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in _parameters(model) else "past_key_values"


def _last_logits_only(model) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in _parameters(model) else {}


def _supports(model) -> bool:
    """A decoder-only model this loop decodes as generate() does: plain dynamic cache layers, no extra processing."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = _parameters(model)
    if not {"position_ids", "attention_mask"} <= params or _cache_argument(model) not in params:
        return False
    try:
        cache = DynamicCache(config=target.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: leave it to generate()
        return False
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return False
    config = getattr(target, "generation_config", None)
    return config is None or all(getattr(config, k, default) in (default, None) for k, default in _UNSUPPORTED.items())

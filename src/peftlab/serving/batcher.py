"""The worker that owns the models: a bounded queue, dynamic batches, mixed-adapter forward passes.

Requests are queued as jobs (a full queue refuses at once: HTTP 503 with Retry-After). One
worker thread takes what is waiting, collecting for up to ``max_wait_ms`` after the first job
or until ``max_batch`` rows, and sorts the jobs into buckets:

- rows for adapters of a group that mixes (LoRA-like; see registry) and rows for the bare base
  go into one forward pass with peft's ``adapter_names=[...]``, one name per row;
- other adapters (prompt learning, IA3, or any with ``mixed_batches=False``) are batched per
  adapter, after ``set_adapter``;
- generation rows share a pass only with the same decoding options (sampling, temperature,
  top-p, beams, stop strings); their token limits may differ.

A streamed completion runs alone. Loading and deleting adapters run on this thread too, so no
model changes under a forward pass. An exception fails only the jobs of its pass.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import GenerationConfig
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import BASE, AdapterNotFound, Registry, ServedAdapter
from peftlab.tasks import generation as gen
from peftlab.tasks.base import Classifier


class QueueFull(Exception):
    """The request queue is full."""


@dataclass(eq=False)
class Job:
    kind: str  # "classify" | "generate" | "control"
    adapter: ServedAdapter | None = None
    items: list[Any] = field(default_factory=list)  # classify: encoded rows; generate: prompt token ids
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    decoding: GenerationConfig | None = None
    limits: list[int] = field(default_factory=list)  # generate: new tokens per row
    stream: Callable[[str], None] | None = None  # generate: called with each new piece of text
    call: Callable[[], Any] | None = None  # control
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    results: list[Any] = field(default_factory=list)
    pending: int = 0

    @property
    def size(self) -> int:
        return max(1, len(self.items))


class Batcher:
    def __init__(self, registry: Registry, metrics: Metrics, *, max_batch: int = 16, max_wait_ms: float = 5.0,
                 queue_size: int = 64):
        self.registry = registry
        self.metrics = metrics
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the event loop's side -------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="peftlab-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; its future resolves on the event loop. Raises QueueFull when the queue is full."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        job.results = [None] * len(job.items)
        job.pending = len(job.items)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.metrics.reject()
            raise QueueFull from None
        return job.future

    # --- the worker thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            first = self.queue.get()
            if first is None:
                break
            jobs, rows = [first], first.size
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                        if deadline > time.monotonic() else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._stopping = True
                    break
                jobs.append(job)
                rows += job.size
            try:
                self._process(jobs)
            except BaseException as error:  # never let the worker die; fail what is left
                for job in jobs:
                    _fail(job, error)

    def _process(self, jobs: list[Job]) -> None:
        buckets: dict[tuple, list[Job]] = {}
        later: list[Job] = []
        for job in jobs:
            if job.kind == "control" or job.stream is not None:
                later.append(job)
            elif job.adapter.group is not None and self.registry.adapters.get(job.adapter.name) is not job.adapter:
                _fail(job, AdapterNotFound(f'the adapter "{job.adapter.name}" was deleted'))
            else:
                for i in range(len(job.items)):
                    buckets.setdefault(self._bucket(job), []).append((job, i))
        for key in [k for k in buckets if k[1] == "base"]:  # the bare base joins a mixed pass when there is one
            mixed = next((k for k in buckets if k[0] == key[0] and k[1] == "mix" and k[3:] == key[3:]), None)
            if mixed is not None:
                buckets[mixed].extend(buckets.pop(key))
        for key, rows in buckets.items():
            for start in range(0, len(rows), self.max_batch):
                chunk = rows[start:start + self.max_batch]
                try:
                    if key[0] == "cls":
                        self._classify(chunk)
                    else:
                        self._generate(chunk)
                except Exception as error:  # noqa: BLE001 - the jobs of this pass fail, the worker goes on
                    for job in {id(j): j for j, _ in chunk}.values():
                        _fail(job, error)
        for job in later:
            try:
                if job.kind == "control":
                    _resolve(job, job.call())
                else:
                    self._generate([(job, 0)], stream=job.stream)
            except Exception as error:  # noqa: BLE001
                _fail(job, error)

    def _bucket(self, job: Job) -> tuple:
        adapter = job.adapter
        kind = "cls" if job.kind == "classify" else "gen"
        if adapter.group is None:
            where: tuple = ("base", None)
        elif self.registry.mixed_batches and adapter.group.mixable:
            where = ("mix", id(adapter.group))
        else:
            where = ("one", adapter.name)
        options = ()
        if job.decoding is not None:
            d = job.decoding
            options = (d.do_sample, d.temperature, d.top_p, d.num_beams, tuple(d.stop))
        return (kind, *where, *options)

    def _model_for(self, adapters: list[ServedAdapter]) -> tuple[Any, list[str] | None]:
        """The model for a pass over rows of these adapters, and peft's adapter_names when they differ."""
        names = [a.name if a.group is not None else BASE for a in adapters]
        groups = {id(a.group): a.group for a in adapters if a.group is not None}
        if not groups:
            return self.registry.base_model, None
        group = next(iter(groups.values()))
        if len(set(names)) == 1:
            group.model.set_adapter(names[0])
            return group.model, None
        return group.model, names

    def _classify(self, chunk: list[tuple[Job, int]]) -> None:
        adapters = [job.adapter for job, _ in chunk]
        model, names = self._model_for(adapters)
        task: Classifier = adapters[0].task  # a family that classifies (checked by api.Server.adapter)
        extra = {"adapter_names": names} if names else {}
        logits = task.logits(model, adapters[0].tokenizer, [job.items[i] for job, i in chunk], **extra)
        self.metrics.forward(len(chunk), {a.name for a in adapters})
        for (job, i), row_logits in zip(chunk, logits):
            record = task.record(job.texts[i], job.pairs[i] if job.pairs else None, row_logits, job.adapter.meta,
                                 probabilities=True)
            _deliver(job, i, record)

    def _generate(self, chunk: list[tuple[Job, int]], stream: Callable[[str], None] | None = None) -> None:
        adapters = [job.adapter for job, _ in chunk]
        model, names = self._model_for(adapters)
        tokenizer = adapters[0].tokenizer
        decoding = chunk[0][0].decoding
        stop = list(decoding.stop)
        kwargs = gen.generation_kwargs(decoding, 1, tokenizer)
        limits = [job.limits[i] for job, i in chunk]
        streamer = _TextStreamer(tokenizer, stop, stream) if stream else None
        tokens = gen.generate_tokens(model, tokenizer, [job.items[i] for job, i in chunk], len(chunk), kwargs,
                                     decoder_only=not self.registry.encoder_decoder, adapter_names=names,
                                     limits=limits, streamer=streamer)
        self.metrics.forward(len(chunk), {a.name for a in adapters})
        for (job, i), ids, limit in zip(chunk, tokens, limits):
            tok = job.adapter.tokenizer
            text = gen.finish_text(tok, ids, stop)
            raw = tok.decode(ids, skip_special_tokens=True)
            ended = bool(ids) and ids[-1] == tok.eos_token_id or any(s in raw for s in stop)
            reason = "stop" if ended or len(ids) < limit else "length"
            if streamer is not None:
                streamer.finish(text)
            _deliver(job, i, {"text": text, "tokens": len(ids), "finish_reason": reason})


class _TextStreamer:
    """A transformers streamer that hands on only text that is final: what a non-streamed call returns,
    piece by piece (leading and trailing space and a possible start of a stop string are held back)."""

    def __init__(self, tokenizer, stop: list[str], emit: Callable[[str], None]):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = ""
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt (decoder start for seq2seq)
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
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
        self._send(text.rstrip())

    def end(self) -> None:
        pass

    def finish(self, final: str) -> None:
        self._send(final)

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
            self.sent = text


def _deliver(job: Job, index: int, value: Any) -> None:
    job.results[index] = value
    job.pending -= 1
    if job.pending <= 0:
        _resolve(job, job.results)


def _resolve(job: Job, value: Any) -> None:
    _settle(job, lambda future: future.set_result(value))


def _fail(job: Job, error: BaseException) -> None:
    _settle(job, lambda future: future.set_exception(error))


def _settle(job: Job, settle: Callable[[asyncio.Future], None]) -> None:
    """Complete the job's future on its event loop's thread (once; a closed loop has nobody left to tell)."""
    def on_loop() -> None:
        if not job.future.done():
            settle(job.future)

    if job.future is not None and job.loop is not None and not job.loop.is_closed():
        job.loop.call_soon_threadsafe(on_loop)

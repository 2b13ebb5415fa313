"""The worker that owns the models: a bounded queue, continuous batches, mixed-adapter forward passes.

Requests are queued as jobs (a full queue refuses at once: HTTP 503 with Retry-After). One
worker thread runs a loop; each turn it

1. takes what is waiting (when nothing runs, it collects for up to ``max_wait_ms`` after the
   first job or until ``max_batch`` rows; when rows are generating, it takes only what is
   already queued, so running rows are never held up);
2. runs control jobs (adapter loads and deletes: no model changes under a forward pass),
   classification passes, and generation that ``generate()`` must do (see below);
3. advances continuous generation by one token (:mod:`peftlab.serving.engine`): finished and
   cancelled rows leave, queued rows join. Streamed and non-streamed rows share these passes.

Classification and generate() rows are sorted into buckets: rows for adapters of a group that
mixes (LoRA-like; see registry) and rows for the bare base go into one forward pass with peft's
``adapter_names=[...]``, one name per row; other adapters are batched per adapter after
``set_adapter``; generate() rows share a pass only with the same decoding options. generate()
serves encoder-decoder models, prompt-learning adapters and beam search; a streamed request on
that path runs alone, and a client that leaves ends it at its next token.

An exception fails only the jobs of its pass. ``begin_shutdown`` refuses new jobs, answers
queued ones with :class:`ShuttingDown` and gives running rows until a deadline.
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
from peftlab.serving.engine import Cancelled, Engine, TextStream, eos_ids, finished
from peftlab.serving.metrics import Metrics
from peftlab.serving.registry import BASE, AdapterNotFound, Registry, ServedAdapter
from peftlab.tasks import generation as gen
from peftlab.tasks.base import Classifier


class QueueFull(Exception):
    """The request queue is full."""


class ShuttingDown(Exception):
    """The server is shutting down (HTTP 503)."""


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
    on_start: Callable[[], None] | None = None  # generate: called once its rows are generating
    call: Callable[[], Any] | None = None  # control
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    results: list[Any] = field(default_factory=list)
    pending: int = 0
    cancelled: bool = False  # set by the event loop when the client went away
    settled: bool = False  # its future has been given a result or an error (worker side)

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
        self.engine = Engine(registry, metrics, self.max_batch)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._deadline: float | None = None  # set by begin_shutdown: running rows end by then
        self._taken: list[Job] = []  # the jobs of the worker's current turn
        registry.in_use = self.in_use  # the adapter cap never evicts an adapter that has work

    # --- the event loop's side -------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._deadline = None
            self._thread = threading.Thread(target=self._run, name="peftlab-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the worker now: whatever is queued or running fails with ShuttingDown."""
        if self._thread is not None:
            self._stopping = True
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
            self._thread = None

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new jobs, answer queued ones 503, and let running rows finish for up to ``grace_s`` seconds."""
        if self._deadline is None:
            self._deadline = time.monotonic() + max(0.0, grace_s)
            try:
                self.queue.put_nowait(None)  # wake the worker
            except queue.Full:
                pass

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.draining

    def depth(self) -> int:
        return self.queue.qsize()

    def running(self) -> int:
        return self.engine.rows

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; its future resolves on the event loop. Raises QueueFull when the queue is full and
        ShuttingDown after begin_shutdown."""
        if self.draining or self._stopping:
            raise ShuttingDown
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

    @staticmethod
    def cancel(job: Job) -> None:
        """The client went away: its rows are dropped at the worker's next step (or when it is taken)."""
        job.cancelled = True

    def in_use(self, name: str) -> bool:
        """Whether requests for this adapter are queued, being handled or generating (worker thread)."""
        with self.queue.mutex:
            queued = list(self.queue.queue)
        jobs = [*queued, *self._taken, *(row.job for row in self.engine.all_rows())]
        return any(job is not None and job.adapter is not None and job.adapter.name == name for job in jobs)

    # --- the worker thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if self._stopping:
                self._fail_everything(jobs, ShuttingDown("the server stopped"))
                break
            if self.draining:  # nothing new starts: what waits is answered 503 now, running rows go on
                refused = ShuttingDown("the server is shutting down")
                for job in jobs:
                    _fail(job, refused)
                jobs = []
                self._idle_after_shutdown()
                self.engine.fail_waiting(_fail, refused)
                if not self.engine.busy or time.monotonic() >= self._deadline:
                    self.engine.fail_all(_fail, ShuttingDown("the server shut down before this generation ended"))
                    self._idle_after_shutdown()
                    break
            try:
                self._taken = jobs
                self._process(jobs)
                self._taken = []
                if self.engine.busy:
                    self.engine.step(lambda row, result: _deliver(row.job, row.index, result), _fail, started)
            except BaseException as error:  # never let the worker die: fail this turn's work, keep the queue
                for job in jobs:
                    _fail(job, error)
                self.engine.fail_all(_fail, error)
            finally:
                self._taken = []

    def _take(self) -> list[Job]:
        """What is queued; waits (for the first job, then up to max_wait) only when nothing is generating."""
        jobs: list[Job] = []
        rows = 0
        if not self.engine.busy:
            try:
                first = self.queue.get(timeout=0.1 if self.draining else None)
            except queue.Empty:
                return []
            if first is None:
                return []
            jobs, rows = [first], first.size
        deadline = time.monotonic() + (self.max_wait if not self.engine.busy else 0.0)
        while rows + len(self.engine.waiting) < self.max_batch:
            try:
                wait = deadline - time.monotonic()
                job = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                continue
            jobs.append(job)
            rows += job.size
        return jobs

    def _idle_after_shutdown(self) -> None:
        """After shutdown the worker is gone: anything still queued gets its 503 now."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _fail(job, ShuttingDown("the server is shutting down"))

    def _fail_everything(self, jobs: list[Job], error: BaseException) -> None:
        """The worker stops: everything taken, running or still queued fails with ``error``."""
        for job in jobs:
            _fail(job, error)
        self.engine.fail_all(_fail, error)
        self._idle_after_shutdown()

    def _control(self, job: Job) -> None:
        try:
            _resolve(job, job.call())
        except Exception as error:  # noqa: BLE001
            _fail(job, error)

    def _process(self, jobs: list[Job]) -> None:
        buckets: dict[tuple, list[tuple[Job, int]]] = {}
        alone: list[Job] = []
        for job in jobs:
            if job.kind == "control":
                self._control(job)
            elif job.cancelled:
                self.metrics.cancel(job.size)
                _fail(job, Cancelled("the client disconnected"))
            elif job.adapter.group is not None and self.registry.adapters.get(job.adapter.name) is not job.adapter:
                _fail(job, AdapterNotFound(f'the adapter "{job.adapter.name}" was deleted'))
            elif job.kind == "generate" and self.engine.takes(job.adapter, job.decoding):
                self.engine.add(job, [(i, job.items[i], job.limits[i]) for i in range(len(job.items))], job.stream)
            elif job.stream is not None:
                alone.append(job)
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
        for job in alone:
            try:
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
                                 probabilities=True, features=job.items[i])
            _deliver(job, i, record)

    def _generate(self, chunk: list[tuple[Job, int]], stream: Callable[[str], None] | None = None) -> None:
        """Rows that generate() decodes: encoder-decoder models, prompt learning, beam search."""
        adapters = [job.adapter for job, _ in chunk]
        model, names = self._model_for(adapters)
        tokenizer = adapters[0].tokenizer
        decoding = chunk[0][0].decoding
        stop = list(decoding.stop)
        kwargs = gen.generation_kwargs(decoding, 1, tokenizer)
        limits = [job.limits[i] for job, i in chunk]
        streamer = None
        if stream is not None:
            job = chunk[0][0]

            def check() -> None:  # raising in the streamer ends generate() at the next token
                if job.cancelled or self._stopping or (self._deadline and time.monotonic() >= self._deadline):
                    raise Cancelled("the client disconnected") if job.cancelled else ShuttingDown(
                        "the server shut down before this generation ended")

            streamer = TextStream(tokenizer, stop, stream, check)
        for job in {id(j): j for j, _ in chunk}.values():
            started(job)
        tokens = gen.generate_tokens(model, tokenizer, [job.items[i] for job, i in chunk], len(chunk), kwargs,
                                     decoder_only=not self.registry.encoder_decoder, adapter_names=names,
                                     limits=limits, streamer=streamer)
        self.metrics.forward(len(chunk), {a.name for a in adapters})
        eos = eos_ids(model, tokenizer)
        for (job, i), ids, limit in zip(chunk, tokens, limits):
            result = finished(job.adapter.tokenizer, ids, stop, limit, eos)
            if streamer is not None:
                streamer.send(result["text"])
            _deliver(job, i, result)


def started(job: Job) -> None:
    """Tell the job's waiter (once) that its rows are generating: a stream may send its headers."""
    call, job.on_start = job.on_start, None
    if call is not None:
        call()


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
    job.settled = True
    def on_loop() -> None:
        if not job.future.done():
            settle(job.future)

    if job.future is not None and job.loop is not None and not job.loop.is_closed():
        job.loop.call_soon_threadsafe(on_loop)

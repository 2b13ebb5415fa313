"""What a comparison measures around ``train()``: peak memory, throughput and the loss curve.

Peak memory is the accelerator's allocated memory where there is one (CUDA), otherwise the
process's resident memory (RSS), sampled by a background thread; both for the whole run and
for its training loop (what the technique costs to train, without the model-loading peak).
Throughput and the loss curve come from the step events ``train()`` emits; time spent in
evaluations during training is subtracted, so samples/s and tokens/s are training speed.

Speed is only comparable between runs made on a quiet machine. :class:`MachineLoad` records, for
each run, the CPU time other processes took meanwhile: the busy time of the CPUs this process may
run on (``/proc/stat`` through psutil) less this process tree's own CPU time, over the wall time,
in cores; and the 1-minute load average at the start and the end. A run is **under load** when
other processes kept more than ``LOAD_THRESHOLD`` (a quarter of a core) busy on average.
:func:`time_training` measures throughput again, a few times, on the run's own setup (``--repeat-timing``).
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Any, NamedTuple

import psutil
import torch

from peftlab.checkpoint import Checkpointer, TrainingState, directory_for
from peftlab.config import RunConfig
from peftlab.loop import Clock, fit
from peftlab.train import prepare

LOAD_THRESHOLD = 0.25  # other processes' mean CPU use, in cores, above which a measurement is "under load"
TIMING_STEPS = 20  # steps per --repeat-timing measurement (at most the run's own)


def release_memory() -> None:
    """Give freed memory back before a run, so one run's peak does not include the last one's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a run, and of its training loop.

    ``with PeakMemory() as peak:`` around the run, ``peak.step()`` at every optimizer step;
    then ``peak.run_bytes`` (the whole run: loading, training, evaluation, saving),
    ``peak.train_bytes`` (from the first optimizer step to the last: the training steps and
    evaluations between them, not loading the model or the final evaluation) and
    ``peak.start_bytes`` (what was held when the run started).
    """

    def __init__(self, interval: float = 0.02):
        self.kind = "cuda" if torch.cuda.is_available() else "rss"
        self.interval = interval
        self.start_bytes = self.run_bytes = self.train_bytes = 0
        self._since_first_step: int | None = None  # RSS peak since the first step (sampled)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _now(self) -> int:
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._process.memory_info().rss

    def _sample(self) -> None:
        while True:
            rss = self._now()
            self.run_bytes = max(self.run_bytes, rss)
            if self._since_first_step is not None:
                self._since_first_step = max(self._since_first_step, rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.start_bytes = self._now()
            self._thread = threading.Thread(target=self._sample, name="peftlab-peak-memory", daemon=True)
            self._thread.start()
        return self

    def step(self) -> None:
        """Called after each optimizer step: the training peak so far."""
        if self._since_first_step is None:  # the first step: measure the training loop from here
            if self.kind == "cuda":
                self.run_bytes = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            self._since_first_step = self._now()
        self.train_bytes = self._now() if self.kind == "cuda" else max(self._since_first_step, self._now())

    def __exit__(self, *exc: Any) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
        self.run_bytes = max(self.run_bytes, self._now(), self.train_bytes)
        if not self.train_bytes:  # no optimizer step
            self.train_bytes = self.run_bytes


class StepRecorder:
    """An ``on_event`` hook for ``train()``: keeps the loss curve and training-only time."""

    def __init__(self, forward=None, on_step=None):
        self.forward = forward or (lambda kind, data: None)
        self.on_step = on_step or (lambda: None)
        self.loss_curve: list[list[float]] = []
        self.steps = 0
        self.tokens = 0
        self.seconds = 0.0  # loop time at the last step
        self.eval_seconds = 0.0  # evaluations between steps
        self._last_step_at: float | None = None
        self._pending_eval = 0.0
        self._first: tuple[float, int] | None = None  # (seconds, tokens) at the first step

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "step":
            self.eval_seconds += self._pending_eval  # an evaluation inside the loop, before this step
            self._pending_eval = 0.0
            self.steps, self.tokens, self.seconds = data["step"], data["tokens"], data["seconds"]
            if self._first is None:
                self._first = (self.seconds, self.tokens)
            self.loss_curve.append([data["step"], round(data["loss"], 5)])
            self._last_step_at = now
            self.on_step()
        elif kind == "evaluation" and self._last_step_at is not None:
            self._pending_eval = now - self._last_step_at  # it ran right after that step
        self.forward(kind, data)

    def throughput(self, samples_per_step: int) -> dict[str, float | None]:
        seconds = self.seconds - self.eval_seconds
        if not self.steps or seconds <= 0:
            return {"samples_per_second": None, "tokens_per_second": None}
        return {"samples_per_second": round(self.steps * samples_per_step / seconds, 2),
                "tokens_per_second": round(self.tokens / seconds, 1)}

    def steady_throughput(self, samples_per_step: int) -> dict[str, float | None]:
        """Throughput after the first step (its one-time costs left out); with one step, :meth:`throughput`."""
        if self.steps < 2 or self._first is None:
            return self.throughput(samples_per_step)
        seconds = self.seconds - self._first[0] - self.eval_seconds
        if seconds <= 0:
            return {"samples_per_second": None, "tokens_per_second": None}
        return {"samples_per_second": round((self.steps - 1) * samples_per_step / seconds, 2),
                "tokens_per_second": round((self.tokens - self._first[1]) / seconds, 1)}


# --- the machine's load ----------------------------------------------------------------------

class Counters(NamedTuple):
    wall: float  # time.perf_counter()
    busy: float | None  # busy CPU seconds of the CPUs this process may use (all processes)
    own: float | None  # CPU seconds of this process and its children
    load_avg: float | None  # 1-minute load average


def _cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def _busy_seconds(cpus: list[int] | None) -> float:
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = [per_cpu[i] for i in cpus if i < len(per_cpu)] if cpus else per_cpu
    # guest time is counted in user time already (Linux); steal is time the hypervisor gave to others
    return sum(sum(value for key, value in t._asdict().items() if key not in {"idle", "iowait", "guest", "guest_nice"})
               for t in chosen or per_cpu)


def _own_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system  # ended children included
    for child in process.children(recursive=True):  # running children (compile workers, data loaders)
        try:
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
        except psutil.Error:
            pass
    return total


def read_counters() -> Counters:
    """The counters :class:`MachineLoad` compares; parts a platform cannot give are None."""
    try:
        busy, own = _busy_seconds(_cpus()), _own_seconds(psutil.Process())
    except (psutil.Error, OSError, AttributeError, IndexError):
        busy = own = None
    try:
        load_avg = os.getloadavg()[0]
    except (AttributeError, OSError):
        load_avg = None
    return Counters(time.perf_counter(), busy, own, load_avg)


def under_load(other_cpu_cores: float | None) -> bool:
    """Other processes kept more than ``LOAD_THRESHOLD`` cores busy on average (unknown: not marked)."""
    return other_cpu_cores is not None and other_cpu_cores > LOAD_THRESHOLD


def other_cpu_cores(start: Counters, end: Counters) -> float | None:
    """Cores other processes kept busy on average between two readings (None where not measurable)."""
    wall = end.wall - start.wall
    if None in (start.busy, start.own, end.busy, end.own) or wall <= 0:
        return None
    return max(0.0, ((end.busy - start.busy) - (end.own - start.own)) / wall)


class MachineLoad:
    """``with MachineLoad() as load:`` around a measurement; then ``load.record()``: the row's load fields.

    ``read``: where the counters come from (tests inject their own).
    """

    def __init__(self, read=read_counters):
        self.read = read
        self.start: Counters | None = None
        self.end: Counters | None = None

    def __enter__(self) -> MachineLoad:
        self.start = self.read()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end = self.read()

    def record(self) -> dict[str, Any]:
        cores = other_cpu_cores(self.start, self.end)
        rounded = lambda value: None if value is None else round(value, 2)  # noqa: E731
        wall = self.end.wall - self.start.wall
        own = (self.end.own - self.start.own) / wall if None not in (self.start.own, self.end.own) and wall > 0 \
            else None
        return {"other_cpu_cores": rounded(cores), "under_load": under_load(cores), "own_cpu_cores": rounded(own),
                "load_avg_start": rounded(self.start.load_avg), "load_avg_end": rounded(self.end.load_avg),
                "cpus": len(_cpus() or []) or os.cpu_count()}


# --- throughput, measured again --------------------------------------------------------------

def time_training(config: RunConfig, steps: int, repeats: int) -> list[dict[str, Any]]:
    """Training throughput measured ``repeats`` times on the run's own setup (model, technique, data order,
    batch size, fast path): ``steps`` optimizer steps each, nothing else (no evaluation, no saving), the
    first step of each (one-time costs) not timed. One model load serves every repeat; each starts again
    from step 0 of the same data order (the weights go on changing: the figures are speeds, not results).
    Each measurement: samples/s, tokens/s and the machine's load meanwhile."""
    training = config.training.model_copy(update={"max_steps": steps, "eval_strategy": "no", "progress": False,
                                                  "checkpoint_every": None, "report_to": []})
    probe = config.model_copy(update={"training": training})
    release_memory()
    run = prepare(probe, overwrite=True)
    run.evaluator.record = lambda state, steps_per_epoch: None  # timing only: no evaluation
    samples_per_step = training.batch_size * training.gradient_accumulation_steps
    measured = []
    try:
        for _ in range(repeats):
            recorder, clock = StepRecorder(), Clock()
            checkpointer = Checkpointer(directory_for(probe), run.accelerator, run.loop.model, run.loop.optimizer,
                                        run.loop.scheduler, probe, run.spec, None, 1, clock)
            with MachineLoad() as load:
                fit(run.loop, TrainingState(), run.evaluator, checkpointer, clock, recorder)
            record = load.record()
            measured.append({**recorder.steady_throughput(samples_per_step), "steps": recorder.steps,
                             "other_cpu_cores": record["other_cpu_cores"]})
    finally:
        del run
        release_memory()
    return measured


def timing_fields(measured: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """The row's fields for repeated timing: the medians become its throughput (the run's own kept as
    ``run_samples_per_second`` / ``run_tokens_per_second``), with their range and the repeats' load."""
    def median(key: str) -> float | None:
        values = [m[key] for m in measured if m.get(key) is not None]
        return statistics.median(values) if values else None

    def spread(key: str) -> list[float] | None:
        values = [m[key] for m in measured if m.get(key) is not None]
        return [min(values), max(values)] if values else None

    cores = median("other_cpu_cores")
    return {
        "run_samples_per_second": row.get("samples_per_second"), "run_tokens_per_second": row.get("tokens_per_second"),
        "samples_per_second": median("samples_per_second"), "tokens_per_second": median("tokens_per_second"),
        "samples_per_second_range": spread("samples_per_second"),
        "tokens_per_second_range": spread("tokens_per_second"),
        "timing": {"repeats": len(measured), "steps": measured[0]["steps"] if measured else 0,
                   "measurements": measured},
        "timing_other_cpu_cores": None if cores is None else round(cores, 2), "timing_under_load": under_load(cores),
    }

"""What a comparison measures around ``train()``: peak memory, throughput and the loss curve.

Peak memory is the accelerator's allocated memory where there is one (CUDA), otherwise the
process's resident memory (RSS), sampled by a background thread; both for the whole run and
for its training loop (what the technique costs to train, without the model-loading peak).
Throughput and the loss curve come from the step events ``train()`` emits; time spent in
evaluations during training is subtracted, so samples/s and tokens/s are training speed.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any

import psutil
import torch


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

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "step":
            self.eval_seconds += self._pending_eval  # an evaluation inside the loop, before this step
            self._pending_eval = 0.0
            self.steps, self.tokens, self.seconds = data["step"], data["tokens"], data["seconds"]
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

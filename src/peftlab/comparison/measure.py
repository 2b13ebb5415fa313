"""What a comparison measures around ``train()``: peak memory, throughput and the loss curve.

Peak memory is the accelerator's allocated memory where there is one (CUDA), otherwise the
process's resident memory (RSS), sampled by a background thread while the run trains.
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

MB = 1024 * 1024


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
    """``with PeakMemory() as peak: ...`` then ``peak.mb``, ``peak.start_mb`` and ``peak.kind``."""

    def __init__(self, interval: float = 0.02):
        self.kind = "cuda" if torch.cuda.is_available() else "rss"
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.start_bytes = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, name="peftlab-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak_bytes / MB

    @property
    def start_mb(self) -> float:
        return self.start_bytes / MB


class StepRecorder:
    """An ``on_event`` hook for ``train()``: keeps the loss curve and training-only time."""

    def __init__(self, forward=None):
        self.forward = forward or (lambda kind, data: None)
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
        elif kind == "evaluation" and self._last_step_at is not None:
            self._pending_eval = now - self._last_step_at  # it ran right after that step
        self.forward(kind, data)

    def throughput(self, samples_per_step: int) -> dict[str, float | None]:
        seconds = self.seconds - self.eval_seconds
        if not self.steps or seconds <= 0:
            return {"samples_per_second": None, "tokens_per_second": None}
        return {"samples_per_second": round(self.steps * samples_per_step / seconds, 2),
                "tokens_per_second": round(self.tokens / seconds, 1)}

"""Counters of the server: requests, latency, tokens per adapter; forward passes and their batches."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from typing import Any

LATENCY_WINDOW = 2048  # latencies kept per adapter for the percentiles


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)  # 4xx/5xx answered, by adapter ("-" when none)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latencies: dict[str, deque] = defaultdict(lambda: deque(maxlen=LATENCY_WINDOW))
        self.forward_passes = 0  # batched model calls (a decoding step, one generate() or a classification forward)
        self.batched_rows = 0
        self.mixed_passes = 0  # passes that held rows of more than one adapter
        self.rejected = 0  # 503: the queue was full
        self.cancelled_rows = 0  # rows dropped because their client went away (or their job failed)

    def request(self, adapter: str, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            self.requests[adapter] += 1
            self.latency_sum[adapter] += seconds
            self.latencies[adapter].append(seconds)
            self.prompt_tokens[adapter] += prompt_tokens
            self.completion_tokens[adapter] += completion_tokens

    def error(self, adapter: str | None) -> None:
        with self._lock:
            self.errors[adapter or "-"] += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def cancel(self, rows: int) -> None:
        with self._lock:
            self.cancelled_rows += rows

    def forward(self, rows: int, adapters: set[str]) -> None:
        with self._lock:
            self.forward_passes += 1
            self.batched_rows += rows
            self.mixed_passes += len(adapters) > 1

    def snapshot(self, queue_depth: int = 0, running: int = 0) -> dict[str, Any]:
        with self._lock:
            names = sorted(set(self.requests) | set(self.errors))
            adapters = {}
            for name in names:
                window = list(self.latencies[name])
                count = self.requests[name]
                adapters[name] = {
                    "requests": count, "errors": self.errors[name],
                    "prompt_tokens": self.prompt_tokens[name], "completion_tokens": self.completion_tokens[name],
                    "latency_mean_s": self.latency_sum[name] / count if count else None,
                    "latency_p50_s": _percentile(window, 0.5), "latency_p99_s": _percentile(window, 0.99),
                }
            return {
                "uptime_s": time.time() - self.started, "queue_depth": queue_depth, "running_rows": running,
                "requests": sum(self.requests.values()), "errors": sum(self.errors.values()),
                "rejected": self.rejected, "cancelled_rows": self.cancelled_rows, "forward_passes": self.forward_passes,
                "batched_rows": self.batched_rows, "mixed_passes": self.mixed_passes,
                "mean_batch_rows": self.batched_rows / self.forward_passes if self.forward_passes else None,
                "adapters": adapters,
            }

    def prometheus(self, queue_depth: int = 0, running: int = 0) -> str:
        """The same counters in Prometheus' text format."""
        snap = self.snapshot(queue_depth, running)
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP peftlab_{name} {help_}", f"# TYPE peftlab_{name} {kind}"])
            lines.extend(f"peftlab_{name}{labels} {value:g}" for labels, value in samples)

        per = snap["adapters"]

        def by_adapter(key: str) -> list[tuple[str, float]]:
            return [(f'{{adapter="{name}"}}', stats[key] or 0) for name, stats in per.items()]

        metric("requests_total", "counter", "Requests answered, by adapter.", by_adapter("requests"))
        metric("request_errors_total", "counter", "Requests refused or failed, by adapter.", by_adapter("errors"))
        metric("prompt_tokens_total", "counter", "Input tokens, by adapter.", by_adapter("prompt_tokens"))
        metric("completion_tokens_total", "counter", "Generated tokens, by adapter.", by_adapter("completion_tokens"))
        metric("request_latency_seconds_sum", "counter", "Total request latency, by adapter.",
               [(f'{{adapter="{n}"}}', self.latency_sum[n]) for n in per])
        metric("request_latency_seconds", "gauge", "Recent request latency percentiles, by adapter.",
               [(f'{{adapter="{n}",quantile="{q}"}}', s[f"latency_p{int(q * 100)}_s"] or 0)
                for n, s in per.items() for q in (0.5, 0.99)])
        metric("forward_passes_total", "counter", "Batched model calls.", [("", snap["forward_passes"])])
        metric("batched_rows_total", "counter", "Rows in batched model calls.", [("", snap["batched_rows"])])
        metric("mixed_passes_total", "counter", "Model calls that mixed several adapters.", [("", snap["mixed_passes"])])
        metric("rejected_total", "counter", "Requests answered 503 (queue full).", [("", snap["rejected"])])
        metric("cancelled_rows_total", "counter", "Rows dropped because their client went away.",
               [("", snap["cancelled_rows"])])
        metric("queue_depth", "gauge", "Requests waiting.", [("", queue_depth)])
        metric("running_rows", "gauge", "Rows generating or waiting to join the running batch.", [("", running)])
        return "\n".join(lines) + "\n"

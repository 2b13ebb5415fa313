"""The benchmark scripts run (CPU smoke tests); their figures are recorded in docs/performance.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # end to end in subprocesses: CI runs it; the everyday loop (-m "not slow ...") does not
def test_throughput_small_measures_every_variant(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--small", "--methods",
                           "full,lora,prefix", "--steps", "2", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for shape in ("roberta-tiny", "llama-tiny"):
        variants = {(r["method"], r["variant"]) for r in rows if r["shape"] == shape}
        assert ("full", "stock fp32") in variants and ("full", "stock bf16 autocast") in variants
        for method in ("lora", "prefix"):
            assert {(method, "stock fp32"), (method, "stock bf16 autocast"), (method, "peftlab")} <= variants
    fast = [r for r in rows if r["variant"] == "peftlab"]
    assert all(r["tokens_per_s"] > 0 and r["speedup_vs_best_stock"] > 0 for r in fast)
    assert all(0 < r["trainable"] < r["total"] for r in fast if r["method"] != "full")
    assert all(r["trainable"] == r["total"] for r in fast if r["method"] == "full")  # peftlab's `full` method
    assert "| shape | method | variant |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_qlora_check_says_it_needs_a_gpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_check.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr

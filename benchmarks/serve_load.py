"""Load benchmark for `peftlab serve`: mixed-adapter traffic, with and without cross-adapter batching.

    python benchmarks/serve_load.py [--adapters 4] [--requests 160] [--concurrency 16] [--max-tokens 16]
                                    [--hidden-size 256] [--layers 4] [--time-limit 60]

It builds a small random Llama (no download) and N LoRA adapters with random weights (saved as
plain peft adapters), then for each mode starts `peftlab serve` in a subprocess on a free
loopback port, sends --requests completions (round robin over the adapters and the base,
greedy, --max-tokens new tokens each) from --concurrency concurrent clients, and reports
throughput, p50/p99 latency and the server's forward passes. Bounded: at most --requests
requests and --time-limit seconds per mode; 127.0.0.1 only. Nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only


def build_models(root: Path, adapters: int, hidden: int, layers: int) -> tuple[Path, dict[str, Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from peftlab.testing import _word_tokenizer

    hf_logging.disable_progress_bar()

    torch.manual_seed(0)
    tokenizer = _word_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=512, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    base_dir = root / "base"
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    dirs = {}
    for i in range(adapters):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir)),
                                    LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        dirs[f"lora-{i}"] = root / f"lora-{i}"
        peft_model.save_pretrained(str(dirs[f"lora-{i}"]))
    return base_dir, dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(base: Path, adapters: dict[str, Path], port: int, mixed: bool, max_batch: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftlab", "serve", "--base", str(base), "--host", HOST, "--port", str(port),
               "--max-batch", str(max_batch), "--queue-size", "1024",
               "--mixed-batches" if mixed else "--no-mixed-batches"]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the server exited: {process.stderr.read()[-2000:]}")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit("the server did not start in time")


async def load(url: str, models: list[str], requests: int, concurrency: int, max_tokens: int,
               time_limit: float) -> dict:
    import httpx

    from peftlab.testing import WORDS

    prompts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)) for i in range(requests)]
    latencies: list[float] = []
    tokens = 0
    failures = 0
    next_index = 0
    deadline = time.monotonic() + time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, tokens, failures
        while next_index < requests and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for warm in models:  # one request per model first: lazy initialisation is not measured
            await client.post(f"{url}/v1/completions", json={"model": warm, "prompt": "alpha", "max_tokens": 2})
        before = (await client.get(f"{url}/v1/metrics")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = (await client.get(f"{url}/v1/metrics")).json()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))] if latencies else float("nan")

    passes = after["forward_passes"] - before["forward_passes"]
    return {"requests": len(latencies), "failures": failures, "seconds": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * pct(0.5), "p99_ms": 1000 * pct(0.99), "forward_passes": passes,
            "mixed_passes": after["mixed_passes"] - before["mixed_passes"],
            "rows_per_pass": (after["batched_rows"] - before["batched_rows"]) / passes if passes else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=160, help="per mode (at most 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (at most 64)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=60, help="seconds of load per mode (at most 600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.requests, args.concurrency = min(args.requests, 2000), min(max(1, args.concurrency), 64)
    args.time_limit = min(args.time_limit, 600)

    import peft
    import torch
    import transformers

    results = {}
    with tempfile.TemporaryDirectory(prefix="peftlab-serve-bench-") as tmp:
        base, adapters = build_models(Path(tmp), args.adapters, args.hidden_size, args.layers)
        models = [*adapters, "base"]
        for mode, mixed in (("mixed batches", True), ("one adapter per pass", False)):
            port = free_port()
            process = start_server(base, adapters, port, mixed, args.max_batch)
            try:
                url = f"http://{HOST}:{port}"
                asyncio.run(wait_ready(url, process))
                results[mode] = asyncio.run(load(url, models, args.requests, args.concurrency, args.max_tokens,
                                                 args.time_limit))
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(f"peftlab serve load: {args.adapters} LoRA adapters + base on a random Llama (hidden {args.hidden_size}, "
          f"{args.layers} layers), {args.requests} completions of {args.max_tokens} tokens, {args.concurrency} "
          f"concurrent clients, max batch {args.max_batch}")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, Python {platform.python_version()}")
    header = f"{'mode':22} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'passes':>7} {'mixed':>6} " \
             f"{'rows/pass':>9} {'failed':>6}"
    print(header)
    for mode, r in results.items():
        print(f"{mode:22} {r['requests_per_s']:7.1f} {r['tokens_per_s']:7.0f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} "
              f"{r['forward_passes']:7d} {r['mixed_passes']:6d} {r['rows_per_pass']:9.1f} {r['failures']:6d}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()

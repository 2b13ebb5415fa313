"""Load benchmark for `peftlab serve`: mixed-adapter traffic, streamed and not, and short requests behind long ones.

    python benchmarks/serve_load.py [--adapters 4] [--requests 192] [--clients 8,32,64] [--stream-shares 0,0.25]
                                    [--max-tokens 16] [--long-tokens 192] [--hidden-size 256] [--layers 4]
                                    [--time-limit 60] [--json FILE]

It builds a small random Llama (no download) and N LoRA adapters with random weights (saved as
plain peft adapters). For each mode (mixed batches, one adapter per pass) it starts `peftlab
serve` in a subprocess on a free loopback port and, for every client count and streamed share,
sends --requests completions (round robin over the adapters and the base, greedy, --max-tokens
new tokens each; the given share streamed with Server-Sent Events) and reports requests/s,
tokens/s, p50/p99 latency and forward passes. Then, in the mixed mode, it measures the latency
of a 1-token request on an idle server and behind --clients' smallest count of --long-tokens
generations (the continuous-batching check). Bounded: at most --requests requests and
--time-limit seconds per cell; 127.0.0.1 only. Nothing is left running.
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
    with torch.no_grad():  # EOS's logit is 0, below the best of the random others: every request runs its length
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
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


def start_server(base: Path, adapters: dict[str, Path], port: int, mixed: bool, max_batch: int,
                 max_tokens: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftlab", "serve", "--base", str(base), "--host", HOST, "--port", str(port),
               "--max-batch", str(max_batch), "--queue-size", "1024", "--max-tokens", str(max_tokens),
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


async def complete(client, url: str, body: dict, stream: bool) -> int:
    """One completion; returns its generated tokens (raises on any failure)."""
    if not stream:
        response = await client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]
    tokens, finished = 0, False
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                finished = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if not finished:
        raise RuntimeError("the stream ended without [DONE]")
    return tokens


def prompts_for(count: int) -> list[str]:
    from peftlab.testing import WORDS

    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)) for i in range(count)]


async def load(url: str, models: list[str], requests: int, clients: int, max_tokens: int, stream_share: float,
               time_limit: float) -> dict:
    import httpx

    prompts = prompts_for(requests)
    latencies: list[float] = []
    tokens = failures = next_index = 0
    deadline = time.monotonic() + time_limit
    every = round(1 / stream_share) if stream_share > 0 else 0  # every k-th request streams

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, tokens, failures
        while next_index < requests and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            body = {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            try:  # (not `tokens += await ...`: that reads `tokens` before the await and loses other clients' counts)
                got = await complete(client, url, body, stream=bool(every) and i % every == every - 1)
            except (httpx.HTTPError, RuntimeError):
                failures += 1
                continue
            tokens += got
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        for warm in models:  # one request per model first: lazy initialisation is not measured
            await client.post(f"{url}/v1/completions", json={"model": warm, "prompt": "alpha", "max_tokens": 2})
        before = (await client.get(f"{url}/v1/metrics")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
        after = (await client.get(f"{url}/v1/metrics")).json()
    latencies.sort()
    passes = after["forward_passes"] - before["forward_passes"]
    return {"clients": clients, "stream_share": stream_share, "requests": len(latencies), "failures": failures,
            "seconds": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99), "forward_passes": passes,
            "mixed_passes": after["mixed_passes"] - before["mixed_passes"],
            "rows_per_pass": (after["batched_rows"] - before["batched_rows"]) / passes if passes else 0.0}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def short_behind_long(url: str, models: list[str], long_requests: int, long_tokens: int,
                            repeats: int = 5) -> dict:
    """Latency of a 1-token request on the idle server, and while long generations run."""
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        short = {"model": models[0], "prompt": "alpha bravo", "max_tokens": 1, "temperature": 0}

        async def one() -> float:
            start = time.perf_counter()
            await complete(client, url, short, stream=False)
            return time.perf_counter() - start

        idle = [await one() for _ in range(repeats)]
        long_body = {"prompt": "charlie delta echo", "max_tokens": long_tokens, "temperature": 0}
        start = time.perf_counter()
        longs = [asyncio.create_task(complete(client, url, {**long_body, "model": models[i % len(models)]}, False))
                 for i in range(long_requests)]
        await asyncio.sleep(0.5)  # the long rows are generating
        behind = []
        for _ in range(repeats):
            behind.append(await one())
            await asyncio.sleep(0.05)
        long_tokens_done = sum(await asyncio.gather(*longs))
        long_wall = time.perf_counter() - start
    return {"idle_ms": 1000 * pct(idle, 0.5), "behind_long_ms": 1000 * pct(behind, 0.5),
            "behind_long_max_ms": 1000 * max(behind), "long_requests": long_requests, "long_tokens": long_tokens,
            "long_wall_s": long_wall, "decode_step_ms": 1000 * long_wall / max(1, long_tokens_done / long_requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=192, help="per cell (at most 2000)")
    parser.add_argument("--clients", default="8,32,64", help="concurrent client counts (each at most 64)")
    parser.add_argument("--stream-shares", default="0,0.25", help="shares of streamed requests")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=192, help="tokens of the long generations")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", default="mixed,unmixed", help="mixed (cross-adapter batches), unmixed, or both")
    parser.add_argument("--time-limit", type=float, default=60, help="seconds of load per cell (at most 600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.requests = min(args.requests, 2000)
    clients = [min(max(1, int(c)), 64) for c in args.clients.split(",")]
    shares = [min(max(0.0, float(s)), 1.0) for s in args.stream_shares.split(",")]
    modes = [m for m in args.modes.split(",") if m in ("mixed", "unmixed")]
    args.time_limit = min(args.time_limit, 600)

    import peft
    import torch
    import transformers

    rows, short = [], None
    with tempfile.TemporaryDirectory(prefix="peftlab-serve-bench-") as tmp:
        base, adapters = build_models(Path(tmp), args.adapters, args.hidden_size, args.layers)
        models = [*adapters, "base"]
        for mode in modes:
            port = free_port()
            process = start_server(base, adapters, port, mode == "mixed", args.max_batch,
                                   max(args.max_tokens, args.long_tokens))
            try:
                url = f"http://{HOST}:{port}"
                asyncio.run(wait_ready(url, process))
                for count in clients:
                    for share in shares:
                        result = asyncio.run(load(url, models, args.requests, count, args.max_tokens, share,
                                                  args.time_limit))
                        rows.append({"mode": mode, **result})
                        print(f"  {mode} {count} clients {share:.0%} streamed: {result['requests_per_s']:.1f} req/s",
                              flush=True)
                if mode == modes[0]:
                    short = asyncio.run(short_behind_long(url, models, min(clients), args.long_tokens))
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(f"peftlab serve load: {args.adapters} LoRA adapters + base on a random Llama (hidden {args.hidden_size}, "
          f"{args.layers} layers), {args.requests} completions of {args.max_tokens} tokens per cell, max batch "
          f"{args.max_batch}")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, Python {platform.python_version()}")
    print(f"{'mode':8} {'clients':>7} {'streamed':>8} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'passes':>7} {'rows/pass':>9} {'failed':>6} {'vs 0% streamed':>14}")
    for r in rows:
        plain = next((p["requests_per_s"] for p in rows if p["mode"] == r["mode"] and p["clients"] == r["clients"]
                      and p["stream_share"] == 0), None)
        ratio = f"{r['requests_per_s'] / plain:.2f}x" if plain else "-"
        print(f"{r['mode']:8} {r['clients']:7d} {r['stream_share']:8.0%} {r['requests_per_s']:7.1f} "
              f"{r['tokens_per_s']:7.0f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['forward_passes']:7d} "
              f"{r['rows_per_pass']:9.1f} {r['failures']:6d} {ratio:>14}")
    if short:
        print(f"1-token request: {short['idle_ms']:.0f} ms idle; {short['behind_long_ms']:.0f} ms (max "
              f"{short['behind_long_max_ms']:.0f}) behind {short['long_requests']} generations of "
              f"{short['long_tokens']} tokens (one decoding step: {short['decode_step_ms']:.1f} ms; those "
              f"generations took {short['long_wall_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "short_request": short}, indent=2) + "\n")


if __name__ == "__main__":
    main()

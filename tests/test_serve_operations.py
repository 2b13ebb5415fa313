"""peftlab serve as operators run it: streams share passes, short requests overtake long ones,
clients that leave stop costing, SIGTERM ends every answer cleanly, and a stream for an adapter
deleted a moment earlier is a 404 like any request."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from peftlab.serving import create_server
from peftlab.serving.batcher import Job
from peftlab.testing import _word_tokenizer

pytest.importorskip("uvicorn")
from serve_helpers import Running  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A random Llama with room for long generations that does not emit EOS (its output row is zero, and
    the largest of 60 random logits is above zero), and LoRA adapters with random weights."""
    root = tmp_path_factory.mktemp("ops")
    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()  # its logit is 0: below the best of the others
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(root / "base"))
    tokenizer.save_pretrained(str(root / "base"))
    dirs = {"base": root / "base"}
    for i, name in enumerate(("a", "b", "temp")):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(root / "base")),
                                    LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        peft_model.save_pretrained(str(root / "adapters" / name))
        dirs[name] = root / "adapters" / name
    return dirs


@pytest.fixture(scope="module")
def server(models):
    running = Running(create_server(str(models["base"]), {"a": models["a"], "b": models["b"]},
                                    adapter_root=models["a"].parent, max_tokens=1500, max_batch=16))
    yield running
    running.stop()


def _stream(http: httpx.Client, body: dict) -> tuple[str, list[dict], bool]:
    """A streamed completion read to its end: (text, events, saw [DONE])."""
    text, events, done = "", [], False
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                events.append(event)
                if "choices" in event and event["choices"]:
                    text += event["choices"][0]["text"]
    return text, events, done


def _wait(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_streams_share_forward_passes_and_equal_plain_requests(server):
    bodies = [{"model": name, "prompt": f"alpha bravo {word}", "max_tokens": 40, "temperature": 0}
              for name, word in (("a", "golf"), ("b", "kilo"), ("base", "lima"), ("a", "mike"))]
    plain = [server.http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    before = server.metrics()["forward_passes"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streamed = list(pool.map(lambda b: _stream(server.http, b), bodies))
        again = list(pool.map(lambda b: server.http.post("/v1/completions", json=b).json(), bodies))
    assert [s[0] for s in streamed] == plain and all(s[2] for s in streamed)
    assert [a["choices"][0]["text"] for a in again] == plain
    passes = server.metrics()["forward_passes"] - before
    # 8 requests of 40 tokens: alone they would take 320 passes; sharing them, well under half that
    assert passes < 160, passes


def test_a_one_token_request_overtakes_long_generations(server):
    metrics = server.metrics
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(server.http.post, "/v1/completions",
                             json={"model": "ab"[i % 2], "prompt": "echo foxtrot", "max_tokens": 600,
                                   "temperature": 0}) for i in range(3)]
        _wait(lambda: metrics()["running_rows"] >= 3)
        before = metrics()["forward_passes"]
        short = server.http.post("/v1/completions", json={"model": "b", "prompt": "golf", "max_tokens": 1})
        passes = metrics()["forward_passes"] - before
        still_running = sum(not f.done() for f in longs)
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 1
        assert still_running == 3, [f.result().text[:300] for f in longs if f.done()]  # it did not wait for them
        assert passes <= 8, passes  # its prefill and the running rows' steps around it
        assert all(f.result().json()["usage"]["completion_tokens"] == 600 for f in longs)


def test_clients_that_leave_are_cancelled(server):
    metrics = server.metrics
    before = metrics()
    # a stream abandoned after two events
    with server.http.stream("POST", "/v1/completions", json={"model": "a", "prompt": "alpha", "max_tokens": 1400,
                                                              "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # a plain request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"model": "b", "prompt": "bravo", "max_tokens": 1400},
                   timeout=0.5)
    _wait(lambda: metrics()["cancelled_rows"] - before["cancelled_rows"] >= 2)
    _wait(lambda: metrics()["running_rows"] == 0)
    after = metrics()
    # neither ran to its 1400 tokens: the server's passes since then are far fewer
    assert after["forward_passes"] - before["forward_passes"] < 1400
    short = server.http.post("/v1/completions", json={"model": "a", "prompt": "golf", "max_tokens": 1})
    assert short.status_code == 200


def test_a_stream_for_an_adapter_deleted_a_moment_earlier_is_404(server, models):
    assert server.http.post("/v1/adapters", json={"name": "temp", "path": "temp"}).status_code == 201
    batcher, registry = server.server.batcher, server.server.registry
    entered, gate = threading.Event(), threading.Event()
    batcher.queue.put(Job(kind="control", call=lambda: (entered.set(), gate.wait(30))))  # holds the worker
    try:
        assert entered.wait(30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"model": "temp", "prompt": "alpha", "max_tokens": 5, "stream": True}
            answer = pool.submit(server.http.post, "/v1/completions", json=body)
            _wait(lambda: batcher.depth() >= 1)  # validated and queued: the adapter existed
            batcher.queue.put(Job(kind="control", call=lambda: registry.remove("temp")))
            gate.set()
            response = answer.result(timeout=30)
    finally:
        gate.set()
    assert response.status_code == 404, response.text
    assert "temp" in response.json()["error"]["message"]


# --- SIGTERM on a real `peftlab serve` process -----------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a real server process: ~7 s (CI runs it)
def test_sigterm_ends_every_answer_and_exits_in_bounded_time(models):
    port = _port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "peftlab", "serve", "--base", str(models["base"]), "--adapter",
               f"a={models['a']}", "--port", str(port), "--max-batch", "4", "--max-tokens", "1800",
               "--shutdown-timeout", "1"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        http = httpx.Client(base_url=url, timeout=60)
        body = {"model": "a", "prompt": "alpha bravo", "max_tokens": 1800, "temperature": 0}

        def streamed():
            try:
                return _stream(http, body)
            except httpx.HTTPStatusError as error:
                return error

        def plain():
            return http.post("/v1/completions", json=body)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            streams = [pool.submit(streamed) for _ in range(4)]  # these run (max batch 4)
            _wait(lambda: http.get("/v1/metrics").json()["running_rows"] >= 4)
            queued = [pool.submit(plain) for _ in range(6)]  # these wait behind them
            _wait(lambda: http.get("/v1/metrics").json()["queue_depth"] + http.get("/v1/metrics").json()[
                "running_rows"] >= 10)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            results = [s.result(timeout=60) for s in streams]
            answers = [q.result(timeout=60) for q in queued]
        process.wait(timeout=30)
        took = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
    for text, events, done in results:  # every stream ends with an error event and [DONE]
        assert done and "error" in events[-1] and "shut" in events[-1]["error"]["message"]
    assert [a.status_code for a in answers] == [503] * 6
    assert all("shutting down" in a.json()["error"]["message"] for a in answers)
    assert took < 15, took


def test_max_adapters_evicts_the_least_recently_used_and_reloads_it_on_demand(models):
    running = Running(create_server(str(models["base"]), {"a": models["a"]}, adapter_root=models["a"].parent,
                                    max_adapters=1))
    try:
        http = running.http
        body = {"prompt": "alpha bravo", "max_tokens": 6, "temperature": 0}
        assert http.post("/v1/adapters", json={"name": "x", "path": "b"}).status_code == 201
        first = http.post("/v1/completions", json={**body, "model": "x"}).json()["choices"][0]["text"]
        assert http.post("/v1/adapters", json={"name": "y", "path": "temp"}).status_code == 201
        listed = {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}
        assert listed == {"base": True, "a": True, "x": False, "y": True}  # "a" was given at start: pinned
        again = http.post("/v1/completions", json={**body, "model": "x"})  # loaded again, "y" evicted
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == first
        listed = {m["id"]: m["loaded"] for m in http.get("/v1/models").json()["data"]}
        assert listed["x"] and not listed["y"]
        assert http.delete("/v1/adapters/y").status_code == 200  # an evicted adapter can be deleted
        assert "y" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    finally:
        running.stop()

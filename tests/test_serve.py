"""peftlab serve: a real uvicorn server on a loopback port, driven by httpx and the official
openai client. Outputs per adapter equal `peftlab predict`; mixed-adapter batches form one
forward pass and give what separate requests give; bad requests get their 4xx."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from safetensors.torch import load_file

from peftlab import build_config, predict, train
from peftlab.serving import create_server
from peftlab.serving.batcher import Job
from peftlab.testing import chat_rows, keyword_rows, label_text_rows, write_csv, write_jsonl
from serve_helpers import Running

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

TEXTS = ["alpha great bravo", "delta awful echo", "golf great", "awful kilo lima mike"]


# --- adapters, trained briefly (enough to differ from each other and from the base) ----------

def _flip(rows, key):
    swap = {"positive": "negative", "negative": "positive"}
    return [{**r, key: swap[r[key]]} for r in rows]


@pytest.fixture(scope="module")
def adapters(tiny_models, tiny_lms, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    files = {
        "cls": write_csv(root / "cls.csv", keyword_rows(96, seed=1)),
        "cls_flip": write_csv(root / "cls_flip.csv", _flip(keyword_rows(96, seed=1), "label")),
        "cls_val": write_csv(root / "cls_val.csv", keyword_rows(8, seed=2)),
        "gen": write_csv(root / "gen.csv", label_text_rows(96, seed=1)),
        "gen_val": write_csv(root / "gen_val.csv", label_text_rows(8, seed=2)),
        "chat": write_jsonl(root / "chat.jsonl", _chat_flipped(96)),
        "chat_val": write_jsonl(root / "chat_val.jsonl", chat_rows(8, seed=2)),
    }
    out = root / "adapters"

    def run(name, model, task, method, train_file, val, lr=5e-2, steps=8, **data):
        raw = {"model": {"name": str(model)}, "task": task, "method": {"name": method},
               "data": {"train_file": str(files[train_file]), "validation_file": str(files[val]), "max_length": 32,
                        **data},
               "training": {"max_steps": steps, "batch_size": 16, "learning_rate": lr, "progress": False, "seed": 0,
                            "eval_strategy": "no"},
               "output_dir": str(out / name)}
        train(build_config(raw))
        return out / name

    gen = {"target_column": "target", "target_max_length": 4}
    return {
        "cls-a": run("cls-a", tiny_models["bert"], "seq-cls", "lora", "cls", "cls_val"),
        "cls-b": run("cls-b", tiny_models["bert"], "seq-cls", "lora", "cls_flip", "cls_val"),
        "cls-ia3": run("cls-ia3", tiny_models["bert"], "seq-cls", "ia3", "cls", "cls_val", lr=1e-1),
        "lm-a": run("lm-a", tiny_lms["llama"], "causal-lm", "lora", "gen", "gen_val", steps=24,
                    prompt_template="review : {text} label :", **gen),
        "lm-chat": run("lm-chat", tiny_lms["llama"], "causal-lm", "lora", "chat", "chat_val", steps=24,
                       messages_column="messages", target_max_length=4),
        "lm-prompt": run("lm-prompt", tiny_lms["llama"], "causal-lm", "prompt", "gen", "gen_val", lr=1e-1,
                         prompt_template="review : {text} label :", **gen),
        "s2s": run("s2s", tiny_lms["t5"], "seq2seq", "lora", "gen", "gen_val", **gen),
        "_root": out,
    }


def _chat_flipped(n):
    rows = chat_rows(n, seed=1)
    swap = {"positive": "negative", "negative": "positive"}
    return [{"messages": [r["messages"][0], {"role": "assistant", "content": swap[r["messages"][1]["content"]]}]}
            for r in rows]


# --- a real server on a loopback port ------------------------------------------------------

@pytest.fixture(scope="module")
def cls_server(adapters, tiny_models):
    running = Running(create_server(str(tiny_models["bert"]), {n: adapters[n] for n in ("cls-a", "cls-b", "cls-ia3")},
                                    adapter_root=adapters["_root"], max_wait_ms=50, max_input_chars=500,
                                    max_input_tokens=32))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def lm_server(adapters, tiny_lms):
    running = Running(create_server(str(tiny_lms["llama"]), {n: adapters[n] for n in ("lm-a", "lm-chat", "lm-prompt")},
                                    max_wait_ms=50, max_tokens=64, max_input_tokens=32))
    yield running
    running.stop()


def _concurrently(calls):
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def _assert_error(response, status, *words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    for word in words:
        assert word in error["message"], error["message"]
    return error


# --- classification ---------------------------------------------------------------------------

def test_classification_equals_predict_per_adapter(cls_server, adapters):
    models = cls_server.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["base", "cls-a", "cls-b", "cls-ia3"]
    mixable = {m["id"]: m["mixed_batches"] for m in models}
    assert mixable["cls-a"] and mixable["cls-b"] and not mixable["cls-ia3"]  # IA3 cannot mix: grouped per adapter
    labels = {}
    for name in ("cls-a", "cls-b", "cls-ia3"):
        body = cls_server.http.post("/v1/classify", json={"model": name, "input": TEXTS}).json()
        expected = predict(adapters[name], texts=TEXTS)
        assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
        for got, want in zip(body["data"], expected):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert set(got["probabilities"]) == {"negative", "positive"}
            assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert got["probabilities"][got["label"]] == pytest.approx(got["score"])
        labels[name] = [d["label"] for d in body["data"]]
    assert labels["cls-a"] != labels["cls-b"]  # trained on flipped labels: the adapters really differ
    one = cls_server.http.post("/v1/classify", json={"model": "cls-a", "input": TEXTS[0]}).json()
    assert one["data"][0]["label"] == labels["cls-a"][0] and one["usage"]["prompt_tokens"] > 0


def test_mixed_adapter_batch_is_one_forward_and_equals_separate_requests(cls_server):
    def classify(name, text):
        return lambda: cls_server.http.post("/v1/classify", json={"model": name, "input": text}).json()["data"][0]

    calls = [(name, text) for text in TEXTS for name in ("cls-a", "cls-b", "cls-ia3")]
    alone = [classify(n, t)() for n, t in calls]
    before = cls_server.metrics()
    together = _concurrently([classify(n, t) for n, t in calls])
    after = cls_server.metrics()
    for got, want in zip(together, alone):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert after["mixed_passes"] > before["mixed_passes"]  # cls-a and cls-b rows shared a forward pass
    assert after["forward_passes"] - before["forward_passes"] < len(calls)

    cls_server.server.registry.mixed_batches = False  # the benchmark's --no-mixed-batches
    try:
        before = cls_server.metrics()
        separate = _concurrently([classify(n, t) for n, t in calls])
        assert cls_server.metrics()["mixed_passes"] == before["mixed_passes"]
        assert [s["label"] for s in separate] == [a["label"] for a in alone]
    finally:
        cls_server.server.registry.mixed_batches = True


def test_adapters_load_and_unload_at_run_time(cls_server, adapters, tmp_path):
    http = cls_server.http
    created = http.post("/v1/adapters", json={"name": "again", "path": "cls-b"})
    assert created.status_code == 201 and created.json()["id"] == "again"
    got = http.post("/v1/classify", json={"model": "again", "input": TEXTS}).json()["data"]
    want = http.post("/v1/classify", json={"model": "cls-b", "input": TEXTS}).json()["data"]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert "again" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.delete("/v1/adapters/again").json() == {"id": "again", "object": "model", "deleted": True}
    _assert_error(http.post("/v1/classify", json={"model": "again", "input": "x"}), 404, "again")
    _assert_error(http.delete("/v1/adapters/again"), 404)
    _assert_error(http.post("/v1/adapters", json={"name": "cls-a", "path": "cls-b"}), 409, "already")

    # only directories under the adapter root, only safetensors weights
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "../"}), 403, "outside")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "cls-a/../../.."}), 403, "outside")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": str(tmp_path)}), 403, "outside")
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapters["cls-a"], outside)
    (adapters["_root"] / "link").symlink_to(outside)
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "link"}), 403, "outside")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "missing"}), 404)
    pickled = adapters["_root"] / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["cls-a"] / "adapter_config.json", pickled)
    torch.save(load_file(str(adapters["cls-a"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "pickled"}), 400, "pickle")
    _assert_error(http.post("/v1/adapters", json={"name": "../x", "path": "cls-a"}), 400, "name")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": 3}), 400, "path")
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "lm"}), 404)
    _assert_error(http.post("/v1/adapters", json={"name": "x", "path": "lm-a"}), 400, "does not fit")
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "cls-a", "cls-b", "cls-ia3"]


def test_bad_classification_requests_get_4xx_and_the_server_lives(cls_server):
    http = cls_server.http
    post = lambda body: http.post("/v1/classify", json=body)  # noqa: E731
    _assert_error(post({"model": "nope", "input": "x"}), 404, "nope", "cls-a")
    _assert_error(post({"model": "cls-a", "input": 3}), 400, "input")
    _assert_error(post({"model": "cls-a", "input": ["ok", 3]}), 400, "input")
    _assert_error(post({"model": "cls-a", "input": ""}), 400, "empty")
    _assert_error(post({"model": "cls-a", "input": []}), 400, "empty")
    _assert_error(post({"model": "cls-a", "input": "great " * 200}), 400, "characters")  # max_input_chars=500
    error = _assert_error(post({"model": "cls-a", "input": "great " * 60}), 400, "tokens", "at most 32")
    assert error["code"] == "context_length_exceeded"
    _assert_error(post({"model": "cls-a", "input": "x", "input_pair": "y"}), 400, "single texts")
    _assert_error(post({"model": "base", "input": "x"}), 400, "head")
    _assert_error(post({"input": "x"}), 400, "model")
    _assert_error(post([1, 2]), 400, "JSON object")
    _assert_error(http.post("/v1/classify", content=b'{"model": "cls-a",', headers={"content-type": "application/json"}),
                  400, "JSON")
    _assert_error(http.post("/v1/completions", json={"model": "cls-a", "prompt": "x"}), 400, "/v1/classify")
    _assert_error(http.get("/v1/nothing"), 404, "no such endpoint")
    _assert_error(http.get("/v1/classify"), 405)
    _assert_error(http.post("/v1/classify", content=b"x" * (5 << 20), headers={"content-type": "application/json"}),
                  413, "larger")
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert http.post("/v1/classify", json={"model": "cls-a", "input": "golf great"}).status_code == 200
    assert "peftlab_request_errors_total" in http.get("/metrics").text


def test_full_queue_answers_503_with_retry_after(cls_server):
    batcher = cls_server.server.batcher
    entered, gate = threading.Event(), threading.Event()
    old = batcher.queue.maxsize
    batcher.queue.put(Job(kind="control", call=lambda: (entered.set(), gate.wait(30))))  # holds the worker
    assert entered.wait(30)
    batcher.queue.maxsize = 2
    try:
        body = {"model": "cls-a", "input": "golf great"}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(cls_server.http.post, "/v1/classify", json=body) for _ in range(2)]
            deadline = time.monotonic() + 10
            while batcher.depth() < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            refused = cls_server.http.post("/v1/classify", json=body)
            _assert_error(refused, 503, "busy")
            assert refused.headers["Retry-After"] == "1"
            gate.set()
            assert [f.result().status_code for f in waiting] == [200, 200]
    finally:
        gate.set()
        batcher.queue.maxsize = old
    assert cls_server.metrics()["rejected"] >= 1
    assert cls_server.http.post("/v1/classify", json=body).status_code == 200


# --- causal LM: completions, chat, streaming (official openai client) ---------------------------

def test_completions_and_chat_equal_predict(lm_server, adapters):
    client = lm_server.openai
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "lm-a", "lm-chat", "lm-prompt"}
    assert models["lm-prompt"].model_extra["mixed_batches"] is False  # prompt tuning: grouped per adapter
    outputs = {}
    for name in ("lm-a", "lm-chat", "lm-prompt"):
        # one predict() over all texts: prompt tuning's rows do not depend on their batch there either
        expected = [r["generated"] for r in predict(adapters[name], texts=TEXTS)]
        got = []
        for text in TEXTS:
            completion = client.completions.create(model=name, prompt=text)
            assert completion.object == "text_completion" and completion.model == name
            assert completion.usage.completion_tokens >= 1
            got.append(completion.choices[0].text)
        assert got == expected
        outputs[name] = got
    assert outputs["lm-a"] != outputs["lm-chat"]  # trained on flipped answers

    # chat: the chat adapter's answer to a user message is what predict gives for that text
    expected = [r["generated"] for r in predict(adapters["lm-chat"], texts=TEXTS[:2])]
    for text, want in zip(TEXTS[:2], expected):
        chat = client.chat.completions.create(model="lm-chat", messages=[{"role": "user", "content": text}])
        assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == want

    # max_tokens and stop as `peftlab predict --max-new-tokens --stop` gives them
    want = predict(adapters["lm-a"], texts=TEXTS[:1], generation={"max_new_tokens": 2})[0]["generated"]
    completion = client.completions.create(model="lm-a", prompt=TEXTS[0], max_tokens=2)
    assert completion.choices[0].text == want and completion.usage.completion_tokens <= 2
    base = client.completions.create(model="base", prompt="alpha bravo", max_tokens=6, stop=["kilo"])
    assert "kilo" not in base.choices[0].text
    assert base.choices[0].finish_reason in {"stop", "length"}


def test_streaming_equals_the_whole_text(lm_server):
    client = lm_server.openai
    for name in ("lm-a", "lm-prompt", "base"):
        for text in TEXTS[:2]:
            whole = client.completions.create(model=name, prompt=text, max_tokens=8)
            chunks = list(client.completions.create(model=name, prompt=text, max_tokens=8, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
            assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    whole = client.chat.completions.create(model="lm-chat", messages=[{"role": "user", "content": TEXTS[0]}])
    stream = client.chat.completions.create(model="lm-chat", messages=[{"role": "user", "content": TEXTS[0]}],
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = lm_server.http.post("/v1/completions", json={"model": "lm-a", "prompt": TEXTS[0], "stream": True})
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_generation_batches_mix_adapters_and_the_base(lm_server):
    def complete(name, text):
        return lambda: lm_server.http.post("/v1/completions", json={"model": name, "prompt": text,
                                                                     "max_tokens": 4}).json()["choices"][0]["text"]

    calls = [(name, text) for text in TEXTS for name in ("lm-a", "lm-chat", "base", "lm-prompt")]
    alone = [complete(n, t)() for n, t in calls]
    before = lm_server.metrics()
    together = _concurrently([complete(n, t) for n, t in calls])
    after = lm_server.metrics()
    assert together == alone
    assert after["mixed_passes"] > before["mixed_passes"]
    assert after["forward_passes"] - before["forward_passes"] < len(calls)
    assert after["adapters"]["lm-a"]["requests"] >= 2 * len(TEXTS)
    assert after["adapters"]["lm-a"]["completion_tokens"] > 0


def _streamed_text(http, body) -> str:
    text = ""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


@pytest.mark.slow  # ~3 s (CI runs it); the classification twin stays in the everyday loop
def test_under_load_prompt_learning_lora_base_and_streams_each_answer_as_alone(lm_server):
    """Continuous LoRA/base rows, generate() rows of a prompt-tuning adapter and streams, all at once."""
    http = lm_server.http
    calls = [({"model": name, "prompt": TEXTS[i % len(TEXTS)], "max_tokens": 2 + i % 11, "temperature": 0},
              i % 4 == 3) for i, name in enumerate(["lm-a", "lm-prompt", "base", "lm-chat"] * 12)]

    def send(body, streamed):
        if streamed:
            return _streamed_text(http, body)
        return http.post("/v1/completions", json=body).json()["choices"][0]["text"]

    alone = [send(body, False) for body, _ in calls]
    together = _concurrently([lambda b=body, s=streamed: send(b, s) for body, streamed in calls])
    assert together == alone


def test_under_load_classification_adapters_each_answer_as_alone(cls_server):
    http = cls_server.http
    calls = [{"model": name, "input": [TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)]}
             for i, name in enumerate(["cls-a", "cls-b", "cls-ia3"] * 12)]

    def labels(body):
        return [(d["label"], round(d["score"], 5)) for d in http.post("/v1/classify", json=body).json()["data"]]

    alone = [labels(body) for body in calls]
    assert _concurrently([lambda b=body: labels(b) for body in calls]) == alone


def test_bad_generation_requests_get_4xx_and_the_server_lives(lm_server):
    client, http = lm_server.openai, lm_server.http
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="lm-a", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="lm-a", prompt="x", n=2)
    post = lambda body, path="/v1/completions": http.post(path, json=body)  # noqa: E731
    _assert_error(post({"model": "lm-a", "prompt": "x", "max_tokens": "5"}), 400, "max_tokens")
    _assert_error(post({"model": "lm-a", "prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    _assert_error(post({"model": "lm-a", "prompt": "x", "temperature": -1}), 400, "temperature")
    _assert_error(post({"model": "lm-a", "prompt": "x", "stop": 5}), 400, "stop")
    _assert_error(post({"model": "lm-a", "prompt": "x", "stream": "yes"}), 400, "stream")
    _assert_error(post({"model": "lm-a", "prompt": "  "}), 400, "empty")
    _assert_error(post({"model": "lm-a", "prompt": None}), 400, "prompt")
    _assert_error(post({"model": "lm-a", "prompt": "great " * 40}), 400, "tokens")
    _assert_error(post({"model": "lm-a", "prompt": ["a", "b"], "stream": True}), 400, "single prompt")
    _assert_error(post({"model": "lm-a", "prompt": "x", "logprobs": 2}), 400, "logprobs")
    _assert_error(post({"model": "lm-a", "messages": []}, "/v1/chat/completions"), 400, "messages")
    _assert_error(post({"model": "lm-a", "messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions"),
                  400, "role")
    _assert_error(post({"model": "lm-a", "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions"),
                  400, "content")
    _assert_error(post({"model": "lm-a", "input": "x"}, "/v1/classify"), 400, "/v1/completions")
    several = post({"model": "lm-a", "prompt": TEXTS[:2], "max_tokens": 3}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1]
    assert http.get("/health").json()["status"] == "ok"


# --- seq2seq ------------------------------------------------------------------------------------

def test_seq2seq_completions_equal_predict(adapters, tiny_lms):
    running = Running(create_server(str(tiny_lms["t5"]), {"s2s": adapters["s2s"]}))
    try:
        expected = [r["generated"] for r in predict(adapters["s2s"], texts=TEXTS)]
        got = [running.openai.completions.create(model="s2s", prompt=t).choices[0].text for t in TEXTS]
        assert got == expected
        streamed = running.openai.completions.create(model="s2s", prompt=TEXTS[0], stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected[0]
        together = _concurrently([lambda t=t, m=m: running.openai.completions.create(model=m, prompt=t).choices[0].text
                                  for t in TEXTS for m in ("s2s", "base")])
        assert together[::2] == expected
        _assert_error(running.http.post("/v1/chat/completions", json={
            "model": "s2s", "messages": [{"role": "user", "content": "x"}]}), 400, "causal LM")
    finally:
        running.stop()


# --- the page in headless Chromium -----------------------------------------------------------

def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _page_dom(url: str, profile: Path) -> str:
    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
                          check=True, capture_output=True, timeout=120, text=True)
    return done.stdout


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not found (Debian: apt-get install chromium; "
                                                "scripts/setup.sh --dev installs it)")
def test_page_classifies_and_generates_in_headless_chromium(cls_server, lm_server, tmp_path):
    want = cls_server.http.post("/v1/classify", json={"model": "cls-b", "input": TEXTS[0]}).json()["data"][0]
    dom = _page_dom(f"{cls_server.url}/?model=cls-b&input={quote(TEXTS[0])}&run=1", tmp_path / "p1")
    assert 'data-state="done"' in dom, dom[-2000:]
    assert f'{want["label"]} ({want["score"]:.3f})' in dom
    assert dom.count('class="bar"') == 2  # one probability bar per label

    text = lm_server.openai.completions.create(model="lm-a", prompt=TEXTS[1], max_tokens=4,
                                               temperature=0).choices[0].text
    dom = _page_dom(f"{lm_server.url}/?model=lm-a&input={quote(TEXTS[1])}&max_tokens=4&run=1", tmp_path / "p2")
    assert 'data-state="done"' in dom, dom[-2000:]
    assert f'<div id="generated">{text}</div>' in dom


# --- the command line ---------------------------------------------------------------------------

def test_serve_command_refuses_bad_options_in_one_line(capsys, monkeypatch, tiny_models, adapters, tiny_lms):
    import sys

    from peftlab import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["peftlab", "serve", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code, capsys.readouterr().err

    bert = str(tiny_models["bert"])
    code, err = run("--base", bert, "--adapter", "no-equals-sign")
    assert code == 2 and "is not NAME=DIR" in err and "Traceback" not in err
    code, err = run("--base", bert, "--adapter", f"a={adapters['cls-a']}", "--adapter", f"a={adapters['cls-b']}")
    assert code == 2 and 'two adapters named "a"' in err
    code, err = run("--base", bert, "--adapter", f"a={adapters['cls-a']}", "--adapter", f"b={adapters['s2s']}")
    assert code == 2 and "does not fit" in err
    code, err = run("--base", str(tiny_lms["llama"]), "--adapter", f"a={adapters['cls-a']}")
    assert code == 2 and "does not fit" in err
    code, err = run("--base", bert)
    assert code == 2 and "--task" in err


def test_deberta_adapters_with_their_saved_pooler_serve_as_predict(tmp_path):
    """DeBERTa-v2's pooler is not in its base checkpoint: each adapter trains and saves its own (modules_to_save).
    Served side by side on one base, each adapter answers with its own pooler, as predict() does."""
    from peftlab.testing import make_tiny_model

    base = make_tiny_model("deberta-v2", tmp_path / "deberta")
    train_file = write_csv(tmp_path / "cls.csv", keyword_rows(64, seed=1))
    flipped = write_csv(tmp_path / "flip.csv", _flip(keyword_rows(64, seed=1), "label"))
    runs = {}
    for name, data in (("deb-a", train_file), ("deb-b", flipped)):
        train(build_config({"model": {"name": str(base)}, "method": {"name": "lora"},
                            "data": {"train_file": str(data), "validation_file": str(train_file), "max_length": 24},
                            "training": {"max_steps": 6, "batch_size": 16, "learning_rate": 5e-2, "progress": False,
                                         "eval_strategy": "no"},
                            "output_dir": str(tmp_path / name)}))
        runs[name] = tmp_path / name
    running = Running(create_server(str(base), runs, max_wait_ms=50))
    try:
        # its LoRA layers also see the relative position embeddings (not one row per input): no mixed batches,
        # and the failed probe leaves nothing behind (compat.guard_mixed_batch_hooks)
        models = {m["id"]: m for m in running.http.get("/v1/models").json()["data"]}
        assert not models["deb-a"]["mixed_batches"] and not models["deb-b"]["mixed_batches"]
        for name, path in runs.items():
            body = running.http.post("/v1/classify", json={"model": name, "input": TEXTS}).json()
            expected = predict(path, texts=TEXTS)
            assert [d["label"] for d in body["data"]] == [e["label"] for e in expected]
            for got, want in zip(body["data"], expected):
                assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    finally:
        running.stop()

"""peftlab serve's front door: the API key, input limits that come from the model, and input handling
(lone surrogates, a body limit on the bytes that arrive, parsing and tokenizing off the event loop).

Real uvicorn servers on loopback ports (serve_helpers.Running) over a tiny Llama whose tokenizer takes more
than data.max_length's default (128 tokens): the model has 256 positions."""

from __future__ import annotations

import json
import select
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from peftlab import build_config, predict, train
from peftlab.serving import create_server
from peftlab.testing import keyword_rows, write_csv
from serve_helpers import Running, openai

KEY = "test-key-7f3a9c"
POSITIONS = 256
ANSWER = " ".join(["great"] * 60)  # the adapters learn to go on and on: their outputs show max_tokens


def _assert_error(response, status, *words, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    for word in words:
        assert word in error["message"], error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- a tiny Llama (256 positions) and three adapters, trained briefly -------------------------

@pytest.fixture(scope="module")
def base(tiny_lms, tmp_path_factory) -> Path:
    """tiny_lms' Llama with its tokenizer's model_max_length (128) raised: the model takes its 256 positions."""
    folder = tmp_path_factory.mktemp("serve-api") / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    return folder


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-api-runs")
    rows = [{"text": r["text"], "target": ANSWER} for r in keyword_rows(64, seed=1)]
    train_file, val_file = write_csv(root / "long.csv", rows), write_csv(root / "long_val.csv", rows[:8])
    out = root / "adapters"

    def run(name, method, steps, lr, generation=None):
        raw = {"model": {"name": str(base)}, "task": "causal-lm", "method": {"name": method},
               "data": {"train_file": str(train_file), "validation_file": str(val_file), "target_column": "target",
                        "prompt_template": "review : {text} label :", "max_length": 32, "target_max_length": 64},
               "training": {"max_steps": steps, "batch_size": 16, "learning_rate": lr, "progress": False, "seed": 0,
                            "eval_strategy": "no"},
               "output_dir": str(out / name)}
        if generation:
            raw["generation"] = generation
        train(build_config(raw))
        return out / name

    return {"long": run("long", "lora", 24, 5e-2),
            "long-20": run("long-20", "lora", 24, 5e-2, {"max_new_tokens": 20}),  # the recipe sets max_new_tokens
            "soft": run("soft", "prompt", 2, 1e-1),  # prompt tuning: 20 virtual tokens
            "_root": out}


@pytest.fixture(scope="module")
def lm(base, adapters):
    """No key; --max-tokens 48; a large max_input_chars so that a ~3 MB chat body gets parsed and tokenized."""
    running = Running(create_server(str(base), {n: adapters[n] for n in ("long", "long-20", "soft")},
                                    max_tokens=48, max_input_chars=4_000_000))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def guarded(base, adapters):
    """--api-key KEY, --adapter-root; its httpx client sends no key (each test says what it sends)."""
    running = Running(create_server(str(base), {"long": adapters["long"]}, adapter_root=adapters["_root"],
                                    api_key=KEY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def capped(base, adapters):
    """--max-input-tokens 64, --enable-docs and a 64 KiB body limit."""
    running = Running(create_server(str(base), {"long": adapters["long"]}, max_input_tokens=64,
                                    max_body_bytes=64 * 1024, enable_docs=True))
    yield running
    running.stop()


def _text(running, model: str, tokens: int) -> str:
    """A completion prompt of exactly ``tokens`` tokens for ``model`` (its template and BOS included)."""
    server = running.server
    adapter = server.registry.get(model)
    words = tokens
    while len(server.prompt_ids(adapter, [" ".join(["golf"] * words)])[0]) > tokens:
        words -= 1
    text = " ".join(["golf"] * words)
    assert len(server.prompt_ids(adapter, [text])[0]) == tokens
    return text


def _chat_tokens(running, model: str, messages: list[dict]) -> int:
    server = running.server
    return len(server.chat_ids(server.registry.get(model), messages)[1][0])


# --- 5. authentication ------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/metrics", None),
    ("POST", "/v1/completions", {"model": "long", "prompt": "golf great", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "long", "messages": [{"role": "user", "content": "golf"}],
                                      "max_tokens": 2}),
    ("POST", "/v1/classify", {"model": "long", "input": "golf great"}),
    ("POST", "/v1/adapters", {"name": "again", "path": "long"}),
    ("DELETE", "/v1/adapters/long", None),
    ("GET", "/v1/nothing", None),
]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"])
def test_every_v1_route_needs_the_key(guarded, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for method, path, body in ROUTES:
        response = guarded.http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                              "type": "invalid_request_error", "param": None,
                                              "code": "invalid_api_key"}}
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert KEY not in response.text
    # the unauthenticated DELETE and POST changed nothing
    keyed = {"Authorization": f"Bearer {KEY}"}
    assert [m["id"] for m in guarded.http.get("/v1/models", headers=keyed).json()["data"]] == ["base", "long"]


def test_the_key_opens_every_v1_route(guarded):
    keyed = {"Authorization": f"Bearer {KEY}"}
    http = guarded.http
    for method, path, body in ROUTES[:4]:
        assert http.request(method, path, json=body, headers=keyed).status_code == 200, path
    _assert_error(http.post("/v1/classify", json=ROUTES[4][2], headers=keyed), 400, "/v1/completions")  # an LM
    created = http.post("/v1/adapters", json={"name": "again", "path": "long"}, headers=keyed)
    assert created.status_code == 201 and created.json()["id"] == "again"
    assert http.delete("/v1/adapters/again", headers=keyed).json() == {"id": "again", "object": "model",
                                                                       "deleted": True}
    _assert_error(http.get("/v1/nothing", headers=keyed), 404, "no such endpoint")
    # /health, / and /metrics stay open
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/").status_code == 200 and "<html" in http.get("/").text.lower()
    assert "peftlab_" in http.get("/metrics").text
    for path in ("/health", "/", "/metrics"):
        assert KEY not in http.get(path).text


def test_the_openai_client_sends_its_api_key(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["base", "long"]
    completion = client.completions.create(model="long", prompt="golf great", max_tokens=3)
    assert completion.usage.completion_tokens == 3
    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.completions.create(model="long", prompt="golf great", max_tokens=3)
    assert caught.value.code == "invalid_api_key"


def test_docs_are_off_unless_asked(guarded, capped):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert guarded.http.get(path).status_code == 404, path
    assert capped.http.get("/docs").status_code == 200
    schema = capped.http.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["properties"] and "content" in json.dumps(body)


def test_models_and_health_reveal_no_paths(guarded, base, adapters):
    keyed = {"Authorization": f"Bearer {KEY}"}
    answer = guarded.http.get("/v1/models", headers=keyed)
    for entry in answer.json()["data"]:
        assert "path" not in entry and entry["root"] == "llama"  # the folder's last component, not the folder
    created = guarded.http.post("/v1/adapters", json={"name": "again", "path": "long"}, headers=keyed)
    try:
        assert created.status_code == 201 and "path" not in created.json() and created.json()["root"] == "llama"
    finally:
        guarded.http.delete("/v1/adapters/again", headers=keyed)
    health = guarded.http.get("/health")
    assert health.json()["base"] == "llama"
    for text in (answer.text, created.text, health.text):
        assert str(base.parent) not in text and str(adapters["_root"]) not in text


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not found")
def test_the_page_stays_open_and_asks_for_the_key(guarded, tmp_path):
    import subprocess

    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          f"{guarded.url}/"], check=True, capture_output=True, timeout=120, text=True).stdout
    assert "could not list the models: missing API key" in dom
    assert 'class="row" id="key-row"' in dom  # the key field is shown (hidden until a 401)


def test_serve_command_forwards_the_new_options_and_never_prints_the_key(monkeypatch, capsys, base):
    from peftlab import cli, serving

    seen = {}
    monkeypatch.setattr(serving, "serve", lambda base, adapters, **options: seen.update(options))
    monkeypatch.setenv("PEFTLAB_API_KEY", KEY)
    monkeypatch.setattr(sys, "argv", ["peftlab", "serve", "--base", str(base), "--task", "causal-lm",
                                      "--enable-docs", "--max-input-tokens", "100", "--max-messages", "8"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 0
    assert seen["api_key"] == KEY and seen["enable_docs"] is True
    assert seen["max_input_tokens"] == 100 and seen["max_messages"] == 8
    monkeypatch.delenv("PEFTLAB_API_KEY")
    monkeypatch.setattr(sys, "argv", ["peftlab", "serve", "--base", str(base), "--task", "causal-lm"])
    with pytest.raises(SystemExit):
        cli.main()
    assert seen["api_key"] is None and seen["enable_docs"] is False and seen["max_input_tokens"] is None
    monkeypatch.setattr(sys, "argv", ["peftlab", "serve", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    out = capsys.readouterr()
    assert KEY not in out.out + out.err and "PEFTLAB_API_KEY" in out.out


# --- 6. input limits from the model ------------------------------------------------------------

def test_prompts_longer_than_128_tokens_within_the_models_positions_are_accepted(lm):
    for model in ("base", "long"):  # the base used data.max_length's default (128), the adapter its run's (32)
        text = _text(lm, model, 150)
        answer = lm.http.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == 150


def test_prompt_learning_adapters_keep_room_for_their_virtual_tokens(lm):
    limit = POSITIONS - 20
    text = _text(lm, "soft", limit + 1)
    error = _assert_error(lm.http.post("/v1/completions", json={"model": "soft", "prompt": text}), 400,
                          f"takes at most {limit}", code="context_length_exceeded")
    assert error["param"] == "prompt"
    answer = lm.http.post("/v1/completions", json={"model": "soft", "prompt": _text(lm, "soft", 150),
                                                   "max_tokens": 1})
    assert answer.status_code == 200, answer.text


def test_max_input_tokens_caps_every_model(capped):
    for model in ("base", "long"):
        assert capped.http.post("/v1/completions", json={"model": model, "prompt": _text(capped, model, 64),
                                                         "max_tokens": 1}).status_code == 200
        error = _assert_error(capped.http.post("/v1/completions", json={"model": model,
                                                                        "prompt": _text(capped, model, 65)}),
                              400, "65 tokens", "at most 64", code="context_length_exceeded")
        assert error["param"] == "prompt"


def test_prompt_and_max_tokens_over_the_positions_stay_refused(lm):
    text = _text(lm, "long", 220)
    error = _assert_error(lm.http.post("/v1/completions", json={"model": "long", "prompt": text, "max_tokens": 40}),
                          400, "220 tokens", f"{POSITIONS} positions", code="context_length_exceeded")
    assert error["param"] == "max_tokens"
    # without max_tokens, the default takes what is left of the context
    left = lm.http.post("/v1/completions", json={"model": "base", "prompt": _text(lm, "base", 245)}).json()
    assert left["usage"]["completion_tokens"] == POSITIONS - 245 < 16
    error = _assert_error(lm.http.post("/v1/completions", json={"model": "base", "prompt": _text(lm, "base", 256)}),
                          400, "no room", code="context_length_exceeded")
    assert error["param"] == "prompt"


def test_max_tokens_defaults_to_what_predict_generates_or_openais_16(lm, adapters):
    client = lm.openai
    # a peftlab run: its recipe's budget, as `peftlab predict` (target_max_length 64, capped by --max-tokens 48)
    default = client.completions.create(model="long", prompt="golf great")
    assert default.usage.completion_tokens == 48 and default.choices[0].finish_reason == "length"
    recipe = client.completions.create(model="long-20", prompt="golf great")  # generation.max_new_tokens: 20
    assert recipe.usage.completion_tokens == 20 and recipe.choices[0].finish_reason == "length"
    assert recipe.choices[0].text == predict(adapters["long-20"], texts=["golf great"])[0]["generated"]
    base = client.completions.create(model="base", prompt="golf great")  # no recipe: OpenAI's legacy default
    assert base.usage.completion_tokens <= 16
    asked = client.completions.create(model="long", prompt="golf great", max_tokens=30)
    assert asked.usage.completion_tokens == 30


def test_chat_defaults_to_the_rest_of_the_context_capped_by_max_tokens(lm):
    client = lm.openai
    short = [{"role": "user", "content": "golf great"}]
    chat = client.chat.completions.create(model="long", messages=short)
    assert chat.usage.completion_tokens == 48 and chat.choices[0].finish_reason == "length"  # --max-tokens 48
    long = [{"role": "user", "content": " ".join(["golf"] * 225)}]
    prompt = _chat_tokens(lm, "long", long)
    assert POSITIONS - 48 < prompt < POSITIONS - 1
    chat = client.chat.completions.create(model="long", messages=long)
    assert chat.usage.prompt_tokens == prompt
    assert chat.usage.completion_tokens == POSITIONS - prompt and chat.choices[0].finish_reason == "length"
    full = [{"role": "user", "content": " ".join(["golf"] * 300)}]
    _assert_error(lm.http.post("/v1/chat/completions", json={"model": "long", "messages": full}), 400, "tokens",
                  code="context_length_exceeded")


# --- 7. input handling ----------------------------------------------------------------------------

def _post_raw(running, path: str, raw: bytes):
    return running.http.post(path, content=raw, headers={"content-type": "application/json"})


def test_a_lone_surrogate_is_a_400_that_names_the_field(lm):
    cases = [
        ("/v1/completions", b'{"model": "long", "prompt": "\\ud800"}', "prompt", "prompt"),
        ("/v1/completions", b'{"model": "long", "prompt": ["fine", "golf \\udc00"]}', "prompt[1]", "prompt"),
        ("/v1/chat/completions",
         b'{"model": "long", "messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"},'
         b' {"role": "user", "content": "golf \\ud800 great"}]}', "messages[2].content", "messages"),
        ("/v1/classify", b'{"model": "long", "input": "\\ud800"}', "input", "input"),
    ]
    for path, raw, where, param in cases:
        error = _assert_error(_post_raw(lm, path, raw), 400, where, "surrogate")
        assert error["param"] == param
    fine = _post_raw(lm, "/v1/completions", b'{"model": "long", "prompt": "golf \\ud83d\\ude00", "max_tokens": 1}')
    assert fine.status_code == 200, fine.text  # a surrogate *pair* is one character
    assert lm.http.get("/health").json()["status"] == "ok"


def test_an_empty_body_says_so(lm):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/adapters"):
        error = _assert_error(_post_raw(lm, path, b""), 400, "the request body is empty; send a JSON object")
        assert "None" not in error["message"]
    _assert_error(_post_raw(lm, "/v1/completions", b"  \n"), 400, "empty")
    # the other body errors keep their messages
    _assert_error(_post_raw(lm, "/v1/completions", b'{"model": "long",'), 400, "the body is not valid JSON")
    _assert_error(_post_raw(lm, "/v1/completions", b"[1, 2]"), 400, "the body must be a JSON object")
    _assert_error(_post_raw(lm, "/v1/completions", b'{"prompt": "x"}'), 400, "missing required field: model")
    _assert_error(_post_raw(lm, "/v1/completions", b"\xff\xfe{}"), 400, "JSON")


def test_chat_messages_are_capped_in_number_and_in_characters_in_all(lm, capped):
    many = [{"role": "user", "content": "golf"}] * 257
    _assert_error(lm.http.post("/v1/chat/completions", json={"model": "long", "messages": many}), 400,
                  "257 messages", "at most 256")
    assert lm.http.post("/v1/chat/completions", json={"model": "long", "messages": many[:256],
                                                       "max_tokens": 1}).status_code != 500
    # capped: max_input_chars 20,000 (the default) applies to the sum; each message alone is under it
    three = [{"role": "user", "content": "golf " * 1600}] * 3
    error = _assert_error(capped.http.post("/v1/chat/completions", json={"model": "long", "messages": three}), 400,
                          "24000 characters in all", "at most 20000")
    assert error["param"] == "messages"


def test_a_chunked_body_over_the_limit_is_cut_off_as_it_arrives(capped):
    """No Content-Length: the 413 comes back while the client is still sending (the rest is never read into
    memory); before, the whole body was read first."""
    limit = capped.server.limits.max_body_bytes  # 64 KiB
    chunk, sent, answer = b"x" * 8192, 0, b""
    with socket.create_connection(("127.0.0.1", capped.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < 64 * limit:  # 4 MiB at most
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([sock], [], [], 0.005)[0]:
                break
        while b"request_too_large" not in answer and select.select([sock], [], [], 5)[0]:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:300])
    assert b"larger than 65536 bytes" in answer and b"request_too_large" in answer
    assert sent < 8 * limit, sent  # answered after about the limit, not after the body

    produced = []

    def body():  # httpx sends a generator chunked, without Content-Length
        for i in range(128):  # 8 MiB
            produced.append(i)
            yield b"y" * 65536

    response = httpx.post(f"{capped.url}/v1/completions", content=body(), timeout=60,
                          headers={"content-type": "application/json"})
    _assert_error(response, 413, "larger", code="request_too_large")
    _assert_error(capped.http.post("/v1/completions", content=b"z" * (limit + 1)), 413, "larger")  # Content-Length
    assert capped.http.get("/health").json()["status"] == "ok"
    assert capped.http.post("/v1/completions", json={"model": "long", "prompt": "golf", "max_tokens": 1}) \
        .status_code == 200


def test_health_answers_while_a_big_chat_body_is_parsed_and_tokenized(lm):
    content = "alpha great bravo " * 1100
    messages = [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(151)]
    raw = json.dumps({"model": "long", "messages": messages}).encode()
    assert 2.5e6 < len(raw) < lm.server.limits.max_body_bytes
    result = {}

    def big():
        start = time.perf_counter()
        result["response"] = httpx.post(f"{lm.url}/v1/chat/completions", content=raw, timeout=120,
                                        headers={"content-type": "application/json"})
        result["seconds"] = time.perf_counter() - start

    latencies = []
    with httpx.Client(base_url=lm.url, timeout=30) as client:
        client.get("/health")
        thread = threading.Thread(target=big)
        thread.start()
        while thread.is_alive():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
        thread.join()
    # about 500,000 tokens: tokenized (in a worker thread), then refused for its length
    _assert_error(result["response"], 400, "tokens", code="context_length_exceeded")
    # /health kept answering in milliseconds; before, it waited for the whole parse and tokenization
    assert len(latencies) >= 3, (result["seconds"], latencies)
    assert max(latencies) < min(0.5, result["seconds"] / 2), (max(latencies), result["seconds"])

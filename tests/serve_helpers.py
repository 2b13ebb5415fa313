"""A real `peftlab serve` app under uvicorn on a loopback port, in a thread (tests/test_serve*.py)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from peftlab.serving import create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


class Running:
    """``server`` (from ``create_server``) served on 127.0.0.1 until :meth:`stop`; ``http`` (httpx) and ``openai``
    clients on it. ``api_key``: sent by both clients as ``Authorization: Bearer``."""

    def __init__(self, server, api_key: str | None = None):
        self.server = server
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=self.url, timeout=60, headers=headers)
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        return self.http.get("/v1/metrics").json()

    def stop(self):
        self.http.close()
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


def save_random_adapter(base, folder, config, seed: int):
    """A plain-peft adapter on ``base`` whose trainable weights are random (so that it changes the output)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    model.save_pretrained(str(folder))
    return folder


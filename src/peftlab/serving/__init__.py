"""``peftlab serve``: one base model in memory, any number of adapters on it, over HTTP.

    from peftlab.serving import create_server, create_app, serve

    server = create_server("path/to/base", {"sentiment": "runs/sst2", "topic": "runs/topic"})
    app = create_app(server)          # a FastAPI app (run it with any ASGI server)
    serve("path/to/base", {...}, host="127.0.0.1", port=8000)   # or: uvicorn in this process

Layout: ``registry`` (the base, adapter groups, loading and fit checks), ``batcher`` (the
bounded queue and the worker that batches across adapters), ``api`` (the endpoints),
``metrics`` (counters), ``page.html`` (the page at ``/``).
"""

from __future__ import annotations

from pathlib import Path

from peftlab.errors import ConfigError


def _require_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"peftlab serve needs FastAPI and uvicorn ({error.name} is not installed)",
                          "pip install fastapi uvicorn (both are dependencies of peftlab; the install is incomplete)") from None


def create_server(base: str, adapters: dict[str, str | Path] | None = None, *, task: str | None = None,
                  adapter_root: str | Path | None = None, device: str | None = None, dtype: str = "auto",
                  mixed_batches: bool = True, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 64,
                  max_tokens: int = 256, max_input_chars: int = 20_000, max_inputs: int = 64,
                  max_input_tokens: int | None = None, max_messages: int = 256,
                  max_body_bytes: int = 4 * 1024 * 1024, api_key: str | None = None, enable_docs: bool = False,
                  max_adapters: int | None = None):
    """Load the base once and the adapters on it; returns the :class:`~peftlab.serving.api.Server`.

    ``adapters``: name -> adapter directory (all of one task family; ``task`` is needed only when
    there are none). ``adapter_root``: the folder run-time loads (``POST /v1/adapters``) may read
    from; ``None`` turns run-time loading off. ``mixed_batches=False`` batches each adapter apart.
    ``api_key``: required as ``Authorization: Bearer KEY`` on every ``/v1/*`` route (``None``: no key).
    ``enable_docs``: serve ``/docs`` and ``/openapi.json``. ``max_input_tokens`` caps every model's
    input (default: what the model takes); ``max_messages`` caps a chat request's messages.
    ``max_adapters``: the most adapters loaded at run time kept in memory (least recently used
    evicted, loaded again on demand; the ``adapters`` given here are never evicted).
    """
    _require_stack()
    from peftlab.serving.api import Limits, Server, check_api_key

    check_api_key(api_key)  # before the models load
    from peftlab.serving.registry import Registry, infer_task

    adapters = dict(adapters or {})
    registry = Registry(base, infer_task(adapters, base, task), adapter_root=adapter_root, device=device,
                        dtype=dtype, mixed_batches=mixed_batches, max_adapters=max_adapters)
    for name, path in adapters.items():
        registry.add(name, path)
    limits = Limits(max_tokens=max_tokens, max_input_chars=max_input_chars, max_inputs=max_inputs,
                    max_input_tokens=max_input_tokens, max_messages=max_messages, max_body_bytes=max_body_bytes)
    return Server(registry, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                  api_key=api_key, enable_docs=enable_docs)


def create_app(server):
    """The FastAPI app of a server made by :func:`create_server`."""
    _require_stack()
    from peftlab.serving.api import create_app as make

    return make(server)


def serve(base: str, adapters: dict[str, str | Path] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", shutdown_timeout: float = 10.0, **options) -> None:
    """Load and serve until SIGTERM / Ctrl-C (uvicorn in this process).

    On the signal the server stops accepting connections, answers queued requests 503, lets
    running generations finish for up to ``shutdown_timeout`` seconds and then ends them (a
    stream gets an error event and ``[DONE]``), and exits.
    """
    _require_stack()
    import uvicorn

    server = create_server(base, adapters, **options)

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server.batcher.begin_shutdown(shutdown_timeout)
            super().handle_exit(sig, frame)

    names = ", ".join(server.registry.names())
    print(f"peftlab serve: {server.registry.task.name} on {base}; models: {names}; page http://{host}:{port}/",
          flush=True)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    Graceful(config).run()


__all__ = ["create_app", "create_server", "serve"]

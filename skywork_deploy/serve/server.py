"""Run the API over an export bundle: load it, start the engine, serve with uvicorn.

`serve_bundle(...)` blocks until Ctrl-C or SIGTERM (what `skywork-deploy serve BUNDLE` runs);
`start_in_thread(...)` serves from a background thread and returns a handle with the bound URL (tests, and
`bench` on a local bundle, which measures through the same HTTP path a remote endpoint takes).
"""
import logging
import threading
import time

from ..base.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_PORT = 9900


def load_engine(target, threads=None, int8_accuracy="exact", max_batch=8, max_queue=64):
    """An export bundle (or a build folder holding one) -> (engine started, tokenizer, bundle)."""
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from .engine import Engine

    if max_batch < 1 or max_queue < 1:
        raise ConfigError(f"--max-batch {max_batch} / --max-queue {max_queue}: both must be at least 1")
    bundle = open_bundle(target)
    tokenizer = load_tokenizer(bundle)
    backend = make_backend("onnxruntime", bundle, threads=threads, int8_accuracy=int8_accuracy)
    engine = Engine(backend, tokenizer, bundle.eos_ids(tokenizer), bundle.pad_id(tokenizer), max_batch, max_queue)
    return engine.start(), tokenizer, bundle


def build_app(engine, tokenizer, bundle, api_key=None, max_request_bytes=1 << 20):
    from .app import create_app

    name = bundle.folder.resolve().name
    return create_app(engine, name, tokenizer, bundle.spec.max_positions, api_key, max_request_bytes)


class Running:
    """A uvicorn server on a background thread: `.url` (http://host:port/v1), `.engine`, `.stop()`."""

    def __init__(self, server, thread, engine, host):
        self.server, self.thread, self.engine = server, thread, engine
        port = server.servers[0].sockets[0].getsockname()[1]
        self.port, self.url = port, f"http://{host}:{port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def _uvicorn(app, host, port, log_level):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, limit_concurrency=1000)
    return uvicorn.Server(config)


def start_in_thread(target=None, host="127.0.0.1", port=0, api_key=None, threads=None, int8_accuracy="exact",
                    max_batch=8, max_queue=64, max_request_bytes=1 << 20, loaded=None, log_level="warning"):
    """Serve `target` (or `loaded` = (engine, tokenizer, bundle)) on a thread; returns a Running once bound."""
    engine, tokenizer, bundle = loaded or load_engine(target, threads, int8_accuracy, max_batch, max_queue)
    server = _uvicorn(build_app(engine, tokenizer, bundle, api_key, max_request_bytes), host, port, log_level)
    server.install_signal_handlers = lambda: None  # the main thread keeps its own handlers
    thread = threading.Thread(target=server.run, name="skywork-deploy-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.stop()
            raise ConfigError(f"cannot listen on {host}:{port} (the port is taken? pass another --port)")
        time.sleep(0.02)
    return Running(server, thread, engine, host)


def serve_bundle(target, host="127.0.0.1", port=DEFAULT_PORT, api_key=None, threads=None, int8_accuracy="exact",
                 max_batch=8, max_queue=64, max_request_bytes=1 << 20, on_ready=None, log_level="info"):
    """Serve until Ctrl-C / SIGTERM (uvicorn's own handlers), then stop the engine."""
    engine, tokenizer, bundle = load_engine(target, threads, int8_accuracy, max_batch, max_queue)
    server = _uvicorn(build_app(engine, tokenizer, bundle, api_key, max_request_bytes), host, port, log_level)
    if on_ready is not None:  # once the socket listens, not before
        def watch():
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                on_ready(f"http://{host}:{port}/v1", bundle.folder.resolve().name)

        threading.Thread(target=watch, daemon=True).start()
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started:
        raise ConfigError(f"cannot listen on {host}:{port} (the port is taken? pass another --port)")

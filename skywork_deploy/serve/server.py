"""Run the API over an export bundle: load it, start the engine, serve with uvicorn, drain on a signal.

`serve_bundle(...)` blocks until SIGTERM / SIGINT (what `skywork-deploy serve BUNDLE` runs) and then drains:
new requests get 503 with `Retry-After`, running ones may finish for `drain_timeout` seconds, then each remaining
stream ends with an error event and `[DONE]` and each non-streamed request with a 503 body; it returns normally
(exit 0). A second signal ends the drain at once. `start_in_thread(...)` serves from a background thread and
returns a handle with the bound URL (tests, and `bench` on a local bundle).
"""
import logging
import signal
import threading
import time

from ..base.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_PORT = 9900
DEFAULT_DRAIN_TIMEOUT_S = 30.0
GENERIC_NAMES = {"weights", "model", "patch", "quantize", "calib", "export", "onnx", "checkpoint", "hf", "."}


SERVE_EXTRA = ("fastapi", "uvicorn", "sse_starlette", "httpx")


def require_serve_extra(modules=SERVE_EXTRA, what="serving"):
    """One line naming the install command when the `[serve]` extra is missing (before anything imports it)."""
    import importlib

    from ..base.errors import BackendUnavailableError

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise BackendUnavailableError(f"{what} needs the [serve] extra ({', '.join(missing)} not installed): "
                                      "pip install 'skywork-deploy[serve]'")


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


def model_name(bundle):
    """The model's own name: the folder the stages started from (runtime.bundle's source chain), or its parent's
    name when that folder has a generic name (`weights`, `model`, `patch`...)."""
    chain = bundle.source_chain()
    path = chain[-1] if chain else bundle.folder.resolve()
    for part in (path, *path.parents):
        if part.name and part.name not in GENERIC_NAMES:
            return part.name
    return bundle.folder.resolve().name


def build_app(engine, tokenizer, bundle, api_key=None, max_request_bytes=1 << 20, served_name=None):
    from .app import create_app

    return create_app(engine, served_name or model_name(bundle), tokenizer, bundle.spec.max_positions, api_key,
                      max_request_bytes)


class Running:
    """A uvicorn server on a background thread: `.url` (http://host:port/v1), `.engine`, `.app`, `.stop()`."""

    def __init__(self, server, thread, engine, host, app):
        self.server, self.thread, self.engine, self.app = server, thread, engine, app
        port = server.servers[0].sockets[0].getsockname()[1]
        self.port, self.url = port, f"http://{host}:{port}/v1"

    def drain(self, timeout, abort=None):
        """Stop admitting, wait up to `timeout` s for running requests (or until `abort` is set), end the rest
        with 503 / an error event. Returns the number of requests ended that way."""
        self.app.state.draining = True
        deadline = time.monotonic() + timeout
        while not self.engine.idle() and time.monotonic() < deadline and not (abort and abort.is_set()):
            time.sleep(0.05)
        left = self.engine.stats()
        if not self.engine.idle():
            self.engine.abort_all(f"the server shut down before this request finished (--drain-timeout {timeout:g} s"
                                  " passed); retry it")
        time.sleep(0.2)  # the error events reach their responses before the sockets close
        return left["running"] + left["waiting"]

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
                    max_batch=8, max_queue=64, max_request_bytes=1 << 20, loaded=None, log_level="warning",
                    served_name=None):
    """Serve `target` (or `loaded` = (engine, tokenizer, bundle)) on a thread; returns a Running once bound."""
    engine, tokenizer, bundle = loaded or load_engine(target, threads, int8_accuracy, max_batch, max_queue)
    app = build_app(engine, tokenizer, bundle, api_key, max_request_bytes, served_name)
    server = _uvicorn(app, host, port, log_level)
    server.install_signal_handlers = lambda: None  # the main thread keeps its own handlers
    thread = threading.Thread(target=server.run, name="skywork-deploy-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.stop()
            raise ConfigError(f"cannot listen on {host}:{port} (the port is taken? pass another --port)")
        time.sleep(0.02)
    return Running(server, thread, engine, host, app)


def serve_bundle(target, host="127.0.0.1", port=DEFAULT_PORT, api_key=None, threads=None, int8_accuracy="exact",
                 max_batch=8, max_queue=64, max_request_bytes=1 << 20, on_ready=None, log_level="info",
                 served_name=None, drain_timeout=DEFAULT_DRAIN_TIMEOUT_S, on_drain=None):
    """Serve until SIGTERM / SIGINT, then drain (module docstring). `on_ready(url, name)` once listening,
    `on_drain(running_requests)` when the drain starts."""
    signalled = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: signalled.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = start_in_thread(target, host, port, api_key, threads, int8_accuracy, max_batch, max_queue,
                                  max_request_bytes, log_level=log_level, served_name=served_name)
        try:
            if on_ready is not None:
                on_ready(running.url, running.app.state.model_name)
            while not signalled.wait(0.5) and running.thread.is_alive():
                pass
            signalled.clear()  # a second signal from here on ends the drain at once
            if on_drain is not None:
                on_drain(running.engine.stats())
            return running.drain(drain_timeout, abort=signalled)
        finally:
            running.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

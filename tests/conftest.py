"""Shared fixtures: tiny random Qwen2 checkpoints (transformers' own Qwen2ForCausalLM) built in tmp folders.

Tests are offline: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
Fixtures here import only the light parts of skywork_deploy, so the source_code compatibility tests also
run in a transformers 4.45.2 environment.

Tests clean up what they write: `pytest.ini` keeps a test's `tmp_path` only when the test failed, and a
module- or session-scoped fixture's own `tmp_path_factory.mktemp` folders are removed when that fixture is
torn down, unless a test has failed by then (see `_scoped_tmp_cleanup`).
"""
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# tests/vendor runs in the vendor's pinned venv only (.ci/run); its checks reach this run through test_source_code.py
collect_ignore = ["vendor"]

# Configurations the parity tests cover; "gqa" is the default tiny model.
TINY_CONFIGS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "mha": {"num_key_value_heads": 4},
    "theta1e6": {"rope_theta": 1000000.0},
}


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(name="gqa", tokenizer=True, **overrides) -> a cached folder with a random Qwen2 checkpoint.

    With tokenizer=True the vocabulary is the real Qwen BPE (151,936 rows); without, 1,024 rows.
    Callers that modify the folder must copy it first (`copy_model`).
    """
    from skywork_deploy.base.synth import make_random_qwen2

    cache = {}

    def make(name="gqa", tokenizer=True, **overrides):
        values = {**TINY_CONFIGS.get(name, {}), **overrides}
        key = (name, tokenizer, tuple(sorted(values.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[key] = make_random_qwen2(folder / "model", preset="tiny", tokenizer=tokenizer, **values)
        return cache[key]

    return make


@pytest.fixture
def tiny_model(tiny_model_factory, tmp_path):
    """A private copy of the default tiny model (GQA, untied, real tokenizer) that a test may change."""
    return copy_model(tiny_model_factory(), tmp_path / "model")


@pytest.fixture(scope="session")
def world(tiny_model_factory, tmp_path_factory):
    """A model, a patched copy and an fp32 export bundle, shared (read only) by the safety tests."""
    from skywork_deploy.export import export_model
    from skywork_deploy.patch import patch_model

    base = tmp_path_factory.mktemp("safety")
    model = base / "model"
    shutil.copytree(tiny_model_factory(), model)
    patched = base / "patched"
    patch_model(model, out=patched)
    bundle = base / "bundle"
    export_model(patched, bundle, dtype="fp32", simplify=False)
    return {"model": model, "patched": patched, "bundle": bundle}


@pytest.fixture(scope="session")
def serve_bundle(tiny_model_factory, tmp_path_factory):
    """An fp32 export bundle of the default tiny model (peaky logits: no greedy near-ties), for the server tests."""
    from skywork_deploy.export import export_model

    model = tiny_model_factory("gqa", initializer_range=0.2)
    out = tmp_path_factory.mktemp("serve") / "tiny-bundle"
    export_model(model, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def serve_loaded(serve_bundle):
    """(engine started, tokenizer, bundle) on `serve_bundle`: 2 threads, batches of 8, a queue of 16."""
    from skywork_deploy.serve.server import load_engine

    engine, tokenizer, bundle = load_engine(serve_bundle, threads=2, max_batch=8, max_queue=16)
    yield engine, tokenizer, bundle
    engine.stop()


@pytest.fixture(scope="session")
def serve_server(serve_loaded):
    """Our server on `serve_loaded`, on a free loopback port, serving the name "tiny-bundle" (64 KiB bodies)."""
    from skywork_deploy.serve.server import start_in_thread

    running = start_in_thread(loaded=serve_loaded, max_request_bytes=64 * 1024, served_name="tiny-bundle")
    yield running
    running.server.should_exit = True
    running.thread.join(30)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The shipped demo model (448-token vocabulary, 512 positions) exported to fp32 ONNX."""
    from skywork_deploy.demo_model import demo_model_path
    from skywork_deploy.export import export_model

    bundle = tmp_path_factory.mktemp("demo-served") / "onnx"
    export_model(demo_model_path(), bundle, dtype="fp32", simplify=False)
    return bundle


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def sigint_default():
    """preexec_fn for a child that a test interrupts with SIGINT: the default disposition, as in a terminal.

    A shell without job control (CI scripts run in the background) starts its commands with SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler: Ctrl-C tests would see nothing happen.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---- removing what module- and session-scoped fixtures wrote ----
_OWNER = {}  # code object -> the live module/session FixtureDef whose function it is (or is nested in)
_WRITTEN = {}  # FixtureDef -> the folders made by that code with tmp_path_factory.mktemp


def _codes(code):
    """A function's code object and those of the functions defined inside it (e.g. a factory it returns)."""
    yield code
    for const in code.co_consts:
        if hasattr(const, "co_consts"):
            yield from _codes(const)


@pytest.fixture(scope="session", autouse=True)
def _scoped_tmp_cleanup(tmp_path_factory):
    """Record each mktemp folder with the module/session fixture whose code made it (the caller's frame).

    That covers a fixture's body and the factories it returns (they live as long as it does). Folders made
    elsewhere (a test's own tmp_path, a helper) are left to pytest's retention (pytest.ini).
    """
    mktemp = tmp_path_factory.mktemp

    def recorded(basename, numbered=True):
        path = mktemp(basename, numbered=numbered)
        fixturedef = _OWNER.get(sys._getframe(1).f_code)
        if fixturedef is not None:
            _WRITTEN.setdefault(fixturedef, []).append(path)
        return path

    tmp_path_factory.mktemp = recorded
    yield
    tmp_path_factory.mktemp = mktemp


class _FixtureFolders:
    """Hooks registered as a plugin (conftest hooks never see the setup of session-scoped fixtures)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        code = getattr(getattr(fixturedef.func, "__func__", fixturedef.func), "__code__", None)
        if fixturedef.scope != "function" and code is not None:
            _OWNER.update(dict.fromkeys(_codes(code), fixturedef))
        return (yield)

    def pytest_fixture_post_finalizer(self, fixturedef, request):
        for code in [c for c, owner in _OWNER.items() if owner is fixturedef]:
            del _OWNER[code]
        folders = _WRITTEN.pop(fixturedef, [])
        if request.session.testsfailed:
            return  # keep what a failed run's fixtures wrote, as pytest keeps a failed test's tmp_path
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_configure(config):
    config.pluginmanager.register(_FixtureFolders(), "skywork-deploy-fixture-folders")

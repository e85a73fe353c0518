"""`serve`: the OpenAI API over ONNX Runtime (a real uvicorn server on a loopback port and the real httpx
client), continuous batching, errors, the vastgenx launcher with a stand-in executable, and the serving bench.

One fp32 bundle of a tiny random Qwen2 is exported once per session; one server runs on it (tests/conftest.py).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from skywork_deploy.base.errors import EndpointError, ExternalToolError, NetworkError
from skywork_deploy.serve.client import EndpointClient
from skywork_deploy.serve.server import start_in_thread

PROMPTS = ["Hi", "What is the capital of France? Answer briefly.", "写一首关于春天的诗", "1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def bundle_dir(serve_bundle):
    return serve_bundle


@pytest.fixture(scope="module")
def loaded(serve_loaded):
    return serve_loaded


@pytest.fixture(scope="module")
def server(serve_server):
    return serve_server


@pytest.fixture(scope="module")
def client(server):
    with EndpointClient(server.url) as c:
        yield c


def _cli(*args, env=None):
    from click.testing import CliRunner

    from skywork_deploy.cli import cli

    return CliRunner(env=env).invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _run_greedy(bundle_dir, prompt, n, *extra):
    result = _cli("run", bundle_dir, "-p", prompt, "--max-new-tokens", n, "--threads", 2, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["outputs"][0]


def _wait_idle(engine, timeout=20.0):
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)


def test_chat_and_completions_equal_run_greedy(client, bundle_dir, server):
    assert client.models() == ["tiny-bundle"]
    ref = _run_greedy(bundle_dir, PROMPTS[1], 24)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    [choice] = client.chat(messages, max_tokens=24)
    assert choice.text == ref["text"] and len(choice.text) > 0
    assert (choice.finish_reason, choice.completion_tokens) == ("length", 24)
    assert choice.prompt_tokens == ref["prompt_tokens"]
    events = list(client.stream_chat(messages, max_tokens=24))
    assert "".join(e.text for e in events) == ref["text"]
    assert sum(1 for e in events if e.text) > 5  # really streamed, chunk by chunk
    assert events[-1].usage == {"prompt_tokens": ref["prompt_tokens"], "completion_tokens": 24, "total_tokens":
                                ref["prompt_tokens"] + 24}
    assert [e.finish_reason for e in events if e.finish_reason] == ["length"]
    raw = _run_greedy(bundle_dir, PROMPTS[3], 16, "--no-chat-template")
    assert client.complete(PROMPTS[3], max_tokens=16)[0].text == raw["text"]
    assert "".join(e.text for e in client.stream_complete(PROMPTS[3], max_tokens=16)) == raw["text"]
    # `run --endpoint` goes through the same client and prints the same text as `run BUNDLE`
    remote = _cli("run", "--endpoint", server.url, "-p", PROMPTS[1], "--max-new-tokens", 24)
    assert remote.exit_code == 0, remote.output
    assert remote.stdout == ref["text"] + "\n" and "time to first token" in remote.stderr


def test_concurrent_requests_are_batched_and_each_equals_its_solo_answer(client, server):
    lengths = [40, 25, 33, 18]  # rows finish at different steps: the batch drops them one by one
    solo = [client.complete(p, max_tokens=n, ignore_eos=True)[0].text for p, n in zip(PROMPTS, lengths)]
    engine = server.engine
    steps_before = engine.stats()["decode_steps"]
    got = {}

    def ask(i, delay):
        time.sleep(delay)  # the later ones join a batch that is already decoding
        got[i] = client.complete(PROMPTS[i], max_tokens=lengths[i], ignore_eos=True)[0].text

    threads = [threading.Thread(target=ask, args=(i, 0.0 if i < 2 else 0.15)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(len(PROMPTS))] == solo
    steps = engine.stats()["decode_steps"] - steps_before
    assert steps < sum(n - 1 for n in lengths) * 0.75, steps  # decode steps were shared, not serialized


def test_sampling_options(client):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    greedy = client.chat(messages, max_tokens=20, ignore_eos=True)[0].text
    sampled = client.chat(messages, max_tokens=20, temperature=1.0, seed=5, n=2, ignore_eos=True)
    assert len(sampled) == 2 and sampled[0].text != sampled[1].text  # each choice its own seed
    again = client.chat(messages, max_tokens=20, temperature=1.0, seed=5, n=2, ignore_eos=True)
    assert [c.text for c in again] == [c.text for c in sampled]
    assert client.chat(messages, max_tokens=20, temperature=1.0, top_k=1, seed=3, ignore_eos=True)[0].text == greedy
    many = client.chat(messages, max_tokens=8, temperature=1.0, seed=5, n=11, ignore_eos=True)  # > --max-batch 8
    assert len(many) == 11 and all(c.completion_tokens == 8 for c in many)
    assert [c.text for c in many[:2]] == [c.text for c in client.chat(messages, max_tokens=8, temperature=1.0,
                                                                      seed=5, n=2, ignore_eos=True)]
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    cut = client.chat(messages, max_tokens=20, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[:greedy.index(stop)]
    streamed = list(client.stream_chat(messages, max_tokens=20, stop=stop, ignore_eos=True))
    assert "".join(e.text for e in streamed) == cut.text
    body = {"model": "tiny-bundle", "messages": messages, "max_completion_tokens": 3}
    data = httpx.post(client.url + "/chat/completions", json=body).json()
    assert data["usage"]["completion_tokens"] == 3 and data["object"] == "chat.completion"


def test_bad_requests_get_openai_errors(server, loaded):
    url = server.url
    chat = {"model": "tiny-bundle", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        ({**chat, "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
        ({**chat, "max_tokens": -1}, 400, "max_tokens -1: must be at least 1"),
        ({**chat, "max_tokens": 0}, 400, "must be at least 1"),
        ({**chat, "max_tokens": 10 ** 9}, 400, "exceed the model's context of 4096"),
        ({**chat, "temperature": -1}, 400, "temperature"),
        ({**chat, "messages": []}, 400, "messages"),
        ({**chat, "n": 99}, 400, "n:"),
        ({"model": "tiny-bundle", "prompt": [5] * 4100, "max_tokens": 1}, 400, "the model's context is 4096"),
        ({"model": "tiny-bundle", "prompt": [10 ** 7], "max_tokens": 1}, 400, "outside the vocabulary"),
    ]
    for body, status, message in cases:
        path = "/completions" if "prompt" in body else "/chat/completions"
        r = httpx.post(url + path, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["type"] and "Traceback" not in r.text
    r = httpx.post(url + "/chat/completions", content=b'{"model": "tiny-bundle", "messages": [',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", json={"prompt": "x" * 70000, "max_tokens": 1})
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["error"]["message"]
    chunked = httpx.post(url + "/completions", content=iter([b'{"prompt": "', b"x" * 70000, b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    small = httpx.post(url + "/completions", content=iter([b'{"prompt": "Hi", ', b'"max_tokens": 2}']),
                       headers={"Content-Type": "application/json"})
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(EndpointError, match="404: model 'nope'"):
        EndpointClient(url, model="nope").chat(chat["messages"], max_tokens=2)
    # --api-key: a second front end on the same engine
    keyed = start_in_thread(loaded=loaded, api_key="s3cret", served_name="tiny-bundle")
    try:
        r = httpx.get(keyed.url + "/models")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(keyed.url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert EndpointClient(keyed.url, api_key="s3cret").models() == ["tiny-bundle"]
    finally:
        keyed.server.should_exit = True
        keyed.thread.join(30)
    assert server.engine.thread.is_alive()


def test_disconnect_mid_stream_frees_the_slot(server, client):
    engine = server.engine
    body = {"model": "tiny-bundle", "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/completions", json=body) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break
            assert engine.stats()["running"] == 1
    _wait_idle(engine)  # the server noticed, dropped the row and goes on serving
    assert client.complete("Hello", max_tokens=2)[0].completion_tokens == 2


def test_full_queue_answers_429(loaded):
    from skywork_deploy.serve.engine import Engine

    _, tokenizer, bundle = loaded
    idle = Engine(loaded[0].backend, tokenizer, bundle.eos_ids(tokenizer), bundle.pad_id(tokenizer), 2, 1)
    running = start_in_thread(loaded=(idle, tokenizer, bundle), served_name="tiny-bundle")  # not started: requests wait
    body = {"prompt": "Hi", "max_tokens": 2}
    first = {}
    waiter = threading.Thread(target=lambda: first.update(r=httpx.post(running.url + "/completions", json=body,
                                                                        timeout=60)))
    try:
        waiter.start()
        deadline = time.monotonic() + 10
        while not idle.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(running.url + "/completions", json=body)
        assert r.status_code == 429 and "queue holds 1" in r.json()["error"]["message"] and r.headers["retry-after"]
        idle.start()  # now the waiting request runs
        waiter.join(60)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 2
    finally:
        running.stop()


def test_client_reports_an_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NetworkError, match=rf"cannot reach http://127.0.0.1:{port}/v1: .*start the server"):
        EndpointClient(f"http://127.0.0.1:{port}").models()
    result = _cli("run", "--endpoint", f"http://127.0.0.1:{port}", "-p", "x")
    assert result.exit_code == 1 and "cannot reach" in result.output and "Traceback" not in result.output


def test_serving_bench_on_a_bundle_and_an_endpoint(bundle_dir, server):
    local = _cli("bench", bundle_dir, "--concurrency", "1,2", "--input-len", 8, "--output-len", 5,
                 "--num-prompts", 2, "--threads", 2, "--json")
    assert local.exit_code == 0, local.output
    report = json.loads(local.stdout)
    assert [r["concurrency"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["requests"] == 2 and row["total_output_tokens"] == 10 and row["total_input_tokens"] == 16
        assert row["output_token_throughput"] > 0 and row["request_throughput"] > 0
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert 0 < row[metric]["median"] <= row[metric]["p99"], (metric, row[metric])
        assert row["e2el_ms"]["mean"] > row["ttft_ms"]["mean"]
    remote = _cli("bench", "--endpoint", server.url, "--concurrency", 2, "--input-len", 8, "--output-len", 3,
                  "--num-prompts", 2)
    assert remote.exit_code == 0, remote.output
    assert "TTFT mean" in remote.stdout and "model tiny-bundle" in remote.stdout


def test_serve_command_drains_on_sigterm(bundle_dir):
    """SIGTERM: new requests 503 + Retry-After, a short running request finishes, long ones end with an error
    event + [DONE] (stream) or a 503 body after --drain-timeout, exit 0; `--json` prints the address once ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skywork_deploy", "serve", str(bundle_dir), "--port", str(port),
                             "--threads", "1", "--api-key", "k", "--drain-timeout", "4", "--json"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer k"}
    long = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}
    got = {}

    def stream():
        with httpx.stream("POST", url + "/completions", json={**long, "stream": True}, headers=auth,
                          timeout=60) as r:
            got["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

    def post(key, body):
        got[key] = httpx.post(url + "/completions", json=body, headers=auth, timeout=60)

    try:
        ready = json.loads(proc.stdout.readline())  # one line once the socket listens
        assert ready["url"] == url and ready["model"].startswith("tiny-gqa") and ready["ok"], ready
        workers = [threading.Thread(target=stream), threading.Thread(target=post, args=("long", long))]
        for t in workers:
            t.start()
        short = threading.Thread(target=post, args=("short", {"prompt": "Hi", "max_tokens": 30, "ignore_eos": True}))

        def wait_running(n):
            deadline = time.monotonic() + 30
            while httpx.get(url.replace("/v1", "/health"), headers=auth).json()["running"] < n:
                assert time.monotonic() < deadline
                time.sleep(0.01)

        wait_running(2)
        short.start()
        wait_running(3)
        proc.send_signal(signal.SIGTERM)
        for line in proc.stderr:
            if line.startswith("draining:"):
                break
        refused = httpx.post(url + "/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "draining"
        for t in workers + [short]:
            t.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got["short"].status_code == 200 and got["short"].json()["usage"]["completion_tokens"] == 30
    assert got["long"].status_code == 503 and "drain-timeout" in got["long"].json()["error"]["message"]
    assert got["long"].headers["retry-after"]
    *_, error, done = got["stream"]
    assert json.loads(error[5:])["error"]["code"] == 503 and done.strip() == "data: [DONE]"
    with pytest.raises(NetworkError):
        EndpointClient(url).models()


# -- vastgenx ---------------------------------------------------------------------------------------------
STAND_IN = r'''#!PYTHON
"""Stand-in vastgenx: checks its arguments like the vendor's CLI, starts a helper child, serves /v1/models."""
import http.server, json, os, subprocess, sys, time
args = sys.argv[1:]
want = ["serve", "--model", None, "--host", "127.0.0.1", "--port", None, "--llm_devices", "[0,1]"]
if len(args) != len(want) or any(w is not None and a != w for a, w in zip(args, want)):
    print("vastgenx: bad arguments", args, flush=True)
    sys.exit(2)
model, port = args[2], int(args[6])
if not os.path.isdir(model):
    print("vastgenx: no model folder", model, flush=True)
    sys.exit(3)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["STAND_IN_PIDS"], "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
print("vastgenx: loading", model, flush=True)
time.sleep(0.5)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": os.path.basename(model.rstrip("/"))}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("vastgenx: serving on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def compiled(tmp_path):
    workspace = tmp_path / "vacc_deploy"
    folder = workspace / "tiny-int8-tp2-1024"
    folder.mkdir(parents=True)
    (folder / "model.vacc").write_bytes(b"compiled")
    (workspace / "tiny-int8-tp2-1024.manifest.json").write_text(json.dumps(
        {"format": "skywork-deploy", "stage": "compile", "settings": {"tp": 2}, "output_dir": str(folder)}))
    exe = tmp_path / "vastgenx"
    exe.write_text(STAND_IN.replace("PYTHON", sys.executable))
    exe.chmod(0o755)
    return folder, exe


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_vastgenx_launch_readiness_and_shutdown(compiled, tmp_path):
    folder, exe = compiled
    port, pids = _free_port(), tmp_path / "pids"
    env = {**os.environ, "SKYWORK_DEPLOY_VASTGENX": str(exe), "STAND_IN_PIDS": str(pids)}
    proc = subprocess.Popen([sys.executable, "-m", "skywork_deploy", "serve", str(folder.parent), "--port", str(port)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stderr:  # the launcher streams vastgenx's log, then says it is ready
            lines.append(line)
            if "vastgenx serving" in line:
                break
        assert any("vastgenx: loading" in ln for ln in lines), lines
        assert lines[-1].startswith(f"vastgenx serving tiny-int8-tp2-1024 at http://127.0.0.1:{port}/v1"), lines
        assert EndpointClient(f"http://127.0.0.1:{port}").models() == ["tiny-int8-tp2-1024"]
        server_pid, child_pid = map(int, pids.read_text().split())
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM  # stopped by SIGTERM: 143, as every command
    deadline = time.monotonic() + 10
    while (_alive(server_pid) or _alive(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid) and not _alive(child_pid)  # nothing it started is left


def test_vastgenx_errors(compiled, tmp_path, monkeypatch):
    from skywork_deploy.serve.vastgenx import serve_compiled

    folder, exe = compiled
    monkeypatch.setenv("STAND_IN_PIDS", str(tmp_path / "pids"))
    monkeypatch.delenv("SKYWORK_DEPLOY_VASTGENX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = _cli("serve", folder)
    assert result.exit_code == 1 and "vastgenx not found" in result.output
    assert "--vastgenx not given, SKYWORK_DEPLOY_VASTGENX not set" in result.output
    assert "pass --vastgenx PATH" in result.output and "Traceback" not in result.output
    with pytest.raises(ExternalToolError, match=r"exited with code 2 before serving[\s\S]*bad arguments"):
        serve_compiled(folder, port=_free_port(), devices="3,4", vastgenx=str(exe),
                       echo=open(os.devnull, "w"))
    result = _cli("serve", folder, "--devices", "0,1,2")
    assert result.exit_code != 0 and "3 dies given but tiny-int8-tp2-1024 was compiled for tp 2" in result.output
    (tmp_path / "empty").mkdir()
    result = _cli("serve", tmp_path / "empty", "--engine", "vastgenx")
    assert result.exit_code != 0 and "no compiled VACC folder" in result.output


def test_help_does_not_import_the_server_stack():
    code = ("import sys; from click.testing import CliRunner; from skywork_deploy.cli import cli; "
            "r = CliRunner().invoke(cli, ['serve', '--help']); assert r.exit_code == 0, r.output; "
            "print([m for m in ('torch', 'fastapi', 'httpx', 'uvicorn', 'onnxruntime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("blocked, args, names", [
    (("fastapi", "sse_starlette"), ["serve", "BUNDLE", "--port", "0"], "fastapi, sse_starlette"),
    (("httpx",), ["run", "--endpoint", "http://127.0.0.1:9", "-p", "x"], "httpx"),
])
def test_without_the_extra_the_install_line(bundle_dir, blocked, args, names):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {blocked!r}:\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from skywork_deploy.cli import main\n"
            f"sys.argv = ['skywork-deploy'] + {[str(bundle_dir) if a == 'BUNDLE' else a for a in args]!r}\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "pip install 'skywork-deploy[serve]'" in result.stderr and f"({names} not installed)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

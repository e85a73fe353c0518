"""The engine's fairness path: a long prompt prefilled beside the running batch (serve/engine.py BackgroundPrefill)
joins it with every answer equal to its solo answer, and streams keep decoding meanwhile."""
import threading

import httpx

from skywork_deploy.serve.engine import PREFILL_INLINE_TOKENS

BODY = {"model": "tiny-bundle", "temperature": 0, "ignore_eos": True}


def _complete(url, prompt, n):
    r = httpx.post(url + "/completions", json={**BODY, "prompt": prompt, "max_tokens": n}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_long_prompt_prefills_beside_running_streams(serve_server):
    engine, url = serve_server.engine, serve_server.url
    long_prompt = list(range(1000, 3000))  # 2,000 token ids
    solo = [_complete(url, "Hello", 150), _complete(url, long_prompt, 12)]
    before = engine.stats()["background_prefills"]
    engine.prefill_inline_tokens = 256
    got = {}
    try:
        first = threading.Thread(target=lambda: got.update(a=_complete(url, "Hello", 150)))
        first.start()
        while engine.stats()["running"] < 1:
            pass
        got["b"] = _complete(url, long_prompt, 12)
        first.join(120)
    finally:
        engine.prefill_inline_tokens = PREFILL_INLINE_TOKENS
    assert [got["a"], got["b"]] == solo
    assert engine.stats()["background_prefills"] == before + 1

"""The engine's fairness path: a long prompt prefilled beside the running batch (serve/engine.py BackgroundPrefill)
joins it with every answer equal to its solo answer, and streams keep decoding meanwhile."""
import json

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
    solo_head, solo_long = _complete(url, "Hello", 40), _complete(url, long_prompt, 12)
    before = engine.stats()["background_prefills"]
    engine.prefill_inline_tokens = 256
    text = ""
    try:
        body = {**BODY, "prompt": "Hello", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            for line in lines:  # the stream is decoding ...
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if len(text) >= 3:
                        break
            assert _complete(url, long_prompt, 12) == solo_long  # ... when the long prompt arrives and joins
            for line in lines:
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if len(text) >= len(solo_head):
                        break
    finally:
        engine.prefill_inline_tokens = PREFILL_INLINE_TOKENS
    assert text.startswith(solo_head)  # greedy: the long run's first 40 tokens are the 40-token answer
    assert engine.stats()["background_prefills"] == before + 1

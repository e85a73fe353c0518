"""What scoring clients need, driven with the official `openai` SDK: logprobs / top_logprobs (chat and completions),
echo with prompt log-probs equal to the in-process scores of the bundle (runtime/score.py), token-array and
string-array prompts, min_tokens, and the models endpoints."""
import numpy as np
import openai
import pytest

from skywork_deploy.serve.engine import Params, Request
from skywork_deploy.serve.rows import Row

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk(serve_server):
    with openai.OpenAI(base_url=serve_server.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(serve_loaded):
    """A second ONNX Runtime backend on the same bundle: the in-process side of the comparison."""
    from skywork_deploy.runtime.backends import make_backend

    return make_backend("onnxruntime", serve_loaded[2], threads=1)


def test_models_endpoints(sdk):
    assert [m.id for m in sdk.models.list()] == ["tiny-bundle"]
    assert sdk.models.retrieve("tiny-bundle").id == "tiny-bundle"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4", messages=MSG, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny-bundle", messages=MSG, max_tokens=2, logit_bias={"5": 1})
    assert err.value.param == "logit_bias"


def test_chat_logprobs_streamed_and_not(sdk):
    kw = dict(model="tiny-bundle", messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    choice = sdk.chat.completions.create(**kw).choices[0]
    content = choice.logprobs.content
    assert len(content) == 12
    for entry in content:  # greedy: the chosen token is the most likely one, with its log-prob
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == choice.message.content
    streamed = [e for chunk in sdk.chat.completions.create(**kw, stream=True) for c in chunk.choices
                if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = sdk.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == choice.message.content


def test_echo_scores_equal_in_process_scores(sdk, serve_loaded, reference):
    from skywork_deploy.runtime.score import loglikelihood, score_ids

    _, tokenizer, _ = serve_loaded
    context = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    continuation = tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    ids = context + continuation
    # lm-eval's local-completions loglikelihood request: token-array prompts, echo, logprobs 1, one new token
    out = sdk.completions.create(model="tiny-bundle", prompt=[ids, ids[:4]], max_tokens=1, temperature=0,
                                 logprobs=1, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = score_ids(reference, ids, top=1)
    assert np.allclose(lp.token_logprobs[1:len(ids)], [w[1] for w in want], atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert out.choices[0].text.startswith(tokenizer.decode(ids))
    total, greedy = loglikelihood(reference, context, continuation)
    served = sum(lp.token_logprobs[len(context):len(ids)])
    assert abs(served - total) <= 1e-4 * len(continuation)
    tops = lp.top_logprobs[len(context):len(ids)]
    assert greedy == all(max(t, key=t.get) == tok for t, tok in zip(tops, lp.tokens[len(context):len(ids)]))
    # echo only (max_tokens 0), streamed: the prompt and its scores in the first chunk
    chunks = list(sdk.completions.create(model="tiny-bundle", prompt=ids, max_tokens=0, logprobs=0, echo=True,
                                         stream=True))
    scored = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert scored[0] is None and np.allclose(scored[1:], [w[1] for w in want], atol=1e-4)


def test_string_array_prompts_n_and_min_tokens(sdk):
    out = sdk.completions.create(model="tiny-bundle", prompt=["1 2 3", "Hello"], max_tokens=5, temperature=0, n=2,
                                 extra_body={"ignore_eos": True})
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
    alone = sdk.completions.create(model="tiny-bundle", prompt="Hello", max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert alone.choices[0].text == texts[2] and out.usage.completion_tokens == 20
    greedy = sdk.completions.create(model="tiny-bundle", prompt="Hello", max_tokens=8, temperature=0).choices[0].text
    stop = greedy[:1]
    cut = sdk.completions.create(model="tiny-bundle", prompt="Hello", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == "" and cut.choices[0].finish_reason == "stop"
    held = sdk.completions.create(model="tiny-bundle", prompt="Hello", max_tokens=8, temperature=0, stop=[stop],
                                  extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens >= 3 and held.choices[0].text.startswith(greedy[:1])


def test_min_tokens_masks_eos(serve_loaded):
    """A row whose logits favour EOS does not end before min_tokens (the real Row on real arrays)."""
    _, tokenizer, _ = serve_loaded
    events = []
    req = Request([1, 2], Params(max_tokens=6, temperature=0, min_tokens=3, logprobs=1), events.append)
    row = Row(req, 0, tokenizer, {7})
    logits = np.zeros(100, dtype=np.float32)
    logits[7], logits[9] = 5.0, 1.0  # EOS (7) is the greedy pick
    picks = []
    while not row.done:
        picks.append(row.step(logits))
    assert picks == [9, 9, 9, 7]  # three tokens, then EOS
    finish = [e for e in events if e["type"] == "finish"]
    assert finish[0]["reason"] == "stop" and finish[0]["tokens"] == 4
    scored = [entry for e in events for entry in e.get("logprobs", [])]
    assert [t for t, _, _ in scored] == picks and scored[-1][2][0][0] == 7

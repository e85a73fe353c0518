"""Serve a deployment over the OpenAI API, and talk to any OpenAI-compatible server.

- `server` / `app` / `engine`: an export bundle on ONNX Runtime behind FastAPI + uvicorn, with continuous
  batching (every running request shares each decode graph run) and a graceful drain on SIGTERM / Ctrl-C;
  `protocol` (the request bodies, checked completely before the engine), `tokens` (text <-> ids off the event
  loop; control tokens in content stay text), `rows` (one choice: sampling, stop strings, log-probs, echo
  scoring), `responses` (OpenAI's bodies and chunks);
- `vastgenx`: a compiled VACC folder served by the vendor's `vastgenx serve`, started, watched and stopped;
- `client`: `EndpointClient`, the OpenAI-protocol client `run`, `bench` and `eval` use with `--endpoint`;
- `loadgen`: the vendor's serving benchmark (TTFT, TPOT, ITL, E2E latency, throughput at each concurrency).
Nothing here is imported by `skywork-deploy --help`.
"""

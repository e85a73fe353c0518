"""Serve a deployment over the OpenAI API, and talk to any OpenAI-compatible server.

- `server` / `app` / `engine`: an export bundle on ONNX Runtime behind FastAPI + uvicorn, with continuous
  batching (every running request shares each decode graph run);
- `vastgenx`: a compiled VACC folder served by the vendor's `vastgenx serve`, started, watched and stopped;
- `client`: `EndpointClient`, the OpenAI-protocol client `run`, `bench` and `eval` use with `--endpoint`;
- `loadgen`: the vendor's serving benchmark (TTFT, TPOT, ITL, E2E latency, throughput at each concurrency).
Nothing here is imported by `skywork-deploy --help`.
"""

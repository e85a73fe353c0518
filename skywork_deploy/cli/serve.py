"""`skywork-deploy serve`: thin CLI over skywork_deploy.serve (ONNX Runtime server or the vastgenx launcher)."""
import json
import sys

import click

from ..serve.server import DEFAULT_DRAIN_TIMEOUT_S
from .common import handle_errors, json_option

ENGINES = ("auto", "onnxruntime", "vastgenx")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=9900, show_default=True)
@click.option("--api-key", envvar="SKYWORK_DEPLOY_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every request (env SKYWORK_DEPLOY_API_KEY).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="auto: vastgenx for a compiled VACC folder, else ONNX Runtime on the export bundle.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime CPU threads (default: the number of physical cores).")
@click.option("--int8-accuracy", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
              help="int8 bundles: exact W8A16 arithmetic, or fast MatMulNBits with int8 activations.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows decoded together in one graph run (a request with n choices takes n).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a batch slot; beyond that the server answers 429.")
@click.option("--max-request-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True)
@click.option("--served-model-name", default=None,
              help="The model name the API reports and requests must use (default: the model's own name, from "
                   "the stage manifests; not the bundle's folder name).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_TIMEOUT_S, show_default=True,
              help="On SIGTERM / Ctrl-C: seconds running requests may still take; the rest then end with a 503 "
                   "(streams: an error event and [DONE]). A second signal ends the drain at once.")
@json_option
@click.option("--devices", default=None, help="vastgenx: dies to run on, e.g. 0,1,2,3 (default 0..tp-1).")
@click.option("--vastgenx", "vastgenx_path", default=None,
              help="Path of vastgenx (else $SKYWORK_DEPLOY_VASTGENX, else PATH).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="vastgenx: seconds to wait for /v1/models to answer.")
@handle_errors
def serve(target, host, port, api_key, engine, threads, int8_accuracy, max_batch, max_queue, max_request_bytes,
          served_model_name, drain_timeout, as_json, devices, vastgenx_path, ready_timeout):
    """Serve TARGET over the OpenAI API until Ctrl-C.

    An export bundle (or a build folder holding one) runs on ONNX Runtime: GET /v1/models, POST
    /v1/chat/completions and /v1/completions, streamed or not, with concurrent requests batched. A
    compiled VACC folder (a real `compile` output) is served by the vendor's `vastgenx serve`, started,
    watched until /v1/models answers, and stopped with everything it started on Ctrl-C or SIGTERM.

    On SIGTERM or Ctrl-C the ONNX Runtime server drains: new requests get 503 with Retry-After, running ones
    finish within --drain-timeout, the rest end with a 503 / an error event; then it exits 0. With --json,
    one line {"ok": true, "url": ..., "model": ...} is printed on stdout once the server listens.

    \b
    Examples:
      skywork-deploy serve ./or1-7b-onnx --port 9900
      skywork-deploy serve ./or1-7b-int8-onnx --int8-accuracy fast --threads 8 --api-key secret
      skywork-deploy serve ./vacc_deploy/or1-7b-int8-tp4-1024-2048 --devices 12,13,14,15
      curl http://127.0.0.1:9900/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "or1-7b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}'
    """
    from ..serve.vastgenx import find_compiled

    compiled = find_compiled(target) if engine != "onnxruntime" else None
    if engine == "vastgenx" or compiled is not None:
        from ..serve.vastgenx import serve_compiled

        if api_key:
            click.echo("note: --api-key is not passed to vastgenx (it has no such option)", err=True)

        def ready(url, models):
            click.echo(f"vastgenx serving {', '.join(models) or '?'} at {url} (Ctrl-C stops it)", err=True)
            if as_json:
                click.echo(json.dumps({"ok": True, "url": url, "model": models[0] if models else None,
                                       "engine": "vastgenx"}))
                sys.stdout.flush()

        serve_compiled(target, host, port, devices, vastgenx_path, ready_timeout, on_ready=ready)
        return
    if devices or vastgenx_path:
        raise click.UsageError("--devices and --vastgenx apply to a compiled VACC folder only")
    from ..serve.server import require_serve_extra, serve_bundle

    require_serve_extra()

    def ready(url, name):
        click.echo(f"serving {name} at {url} (ONNX Runtime; Ctrl-C stops it)", err=True)
        if as_json:
            click.echo(json.dumps({"ok": True, "url": url, "model": name, "engine": "onnxruntime"}))
            sys.stdout.flush()

    def drain(stats):
        click.echo(f"draining: {stats['running']} running, {stats['waiting']} waiting (--drain-timeout "
                   f"{drain_timeout:g} s)", err=True)

    ended = serve_bundle(target, host, port, api_key, threads, int8_accuracy, max_batch, max_queue,
                         max_request_bytes, on_ready=ready, served_name=served_model_name,
                         drain_timeout=drain_timeout, on_drain=drain)
    click.echo(f"stopped ({ended} request(s) ended by the drain timeout)" if ended else "stopped", err=True)
